import pytest

from thyroid_classifier.labels import canonical_label_names, normalize_label, sort_labels


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("normal thyroid", "normal"), ("Normal", "normal"), ("normal_thyroid", "normal"),
        ("benign", "benign"), ("Benign", "benign"), ("benin", "benign"), (" BENIGN ", "benign"),
        ("malignant", "malignant"), ("Malignant", "malignant"), ("malin", "malignant"),
        ("TIRADS-3", "TIRADS-3"), ("cyst", "cyst"),
    ],
)
def test_normalize_label(folder, label):
    assert normalize_label(folder) == label


def test_empty_name_is_an_error():
    with pytest.raises(ValueError):
        normalize_label("  ")


def test_label_order_is_clinical_then_alphabetical():
    assert sort_labels(["malignant", "zeta", "benign", "alpha", "normal"]) == ["normal", "benign", "malignant", "alpha", "zeta"]
    assert canonical_label_names(["Malignant", "normal thyroid", "benin", "Normal"]) == ["normal", "benign", "malignant"]
