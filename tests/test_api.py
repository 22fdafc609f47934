"""The public API: the names in ``thyroid_classifier.__all__`` do what the README says."""

import subprocess
import sys

import pytest

import thyroid_classifier


def test_import_is_cheap_and_names_are_public():
    code = "import sys, thyroid_classifier as t; print('torch' in sys.modules, sorted(t.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")  # nothing heavy until a name is used
    assert set(thyroid_classifier.__all__) >= {"Predictor", "ModelFolder", "train", "evaluate"}
    with pytest.raises(AttributeError):
        thyroid_classifier.not_a_name  # noqa: B018


@pytest.mark.slow
def test_train_then_evaluate_then_predict(tiny_models, sample_dir, tmp_path):
    from thyroid_classifier import ModelFolder, Predictor, evaluate, train

    with pytest.raises(TypeError, match="unknown setting 'epochs'"):
        train(str(sample_dir), model=str(tiny_models["tiny-resnet"]), epochs=1)
    results = train(str(sample_dir), model=str(tiny_models["tiny-resnet"]), output_dir=str(tmp_path / "out"), image_size=32,
                    num_train_epochs=1, bootstrap_resamples=20)
    folder = ModelFolder(tmp_path / "out" / "tiny-resnet")
    assert results["tiny-resnet"]["model"] == folder.metrics()["model"] == "tiny-resnet"
    import thyroid_classifier.evaluate  # noqa: F401 - the submodule shadows the function: it must still be callable

    report = evaluate(str(folder.path), str(sample_dir), out_dir=str(tmp_path / "eval"), bootstrap=20, progress=False)
    n_images = sum(1 for p in sample_dir.rglob("*.png"))
    assert report["external"]["n"] == n_images
    assert len(report["training_overlap"]) >= results["tiny-resnet"]["data"]["counts"]["train"]["benign"]  # its own data: leakage found
    prediction = Predictor.from_pretrained(str(folder.path)).predict([next((sample_dir / "benign").glob("*.png"))], explain=False)[0]
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5
