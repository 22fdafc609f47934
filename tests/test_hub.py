"""Model cards and pushes, offline: the HTTP boundary is a fake HfApi that records what it is sent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from thyroid_classifier.card import render_card
from thyroid_classifier.hub import main as hub_main
from thyroid_classifier.locations import HubUnreachableError
from thyroid_classifier.publish import check_push_access, files_to_push, push_folder
from thyroid_classifier.training import main as train_main

EXPECTED = {
    "model.safetensors", "config.json", "preprocessor_config.json", "ultrasound_preprocessing.json", "README.md",
    "ultrasound_processor.py", "ultrasound_crop.py",  # the crop as an image processor for pipeline(trust_remote_code=True)
    "answer_rule.py", "thyroid_pipeline.py",  # the folder's own pipeline: the answer, set, flag and why
    "metrics.json", "fingerprints.json", "loss.png", "auc.png", "roc.png", "confusion_matrix.png",
    "reliability.json", "guard.safetensors",  # the Predictor of a Hub model flags and sets answers as the local one does
}


def fake_hf_api(fail: str | None = None):
    """An autospec of ``HfApi`` (a call with a wrong name or signature fails as against the real class) that
    keeps a copy of every uploaded folder in ``.uploaded``; ``fail`` names the method that raises."""
    from unittest import mock

    from huggingface_hub import HfApi

    api = mock.create_autospec(HfApi, instance=True)
    api.uploaded = {}
    api.whoami.return_value = {"name": "tester"}

    def upload_folder(*, folder_path, repo_id, **kwargs):
        api.uploaded = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}

    api.upload_folder.side_effect = upload_folder
    if fail:
        getattr(api, fail).side_effect = ConnectionError(f"{fail} failed")
    return api


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_card_parses_back_and_its_numbers_are_metrics_json(short_run, name):
    from huggingface_hub import ModelCard

    out, _ = short_run
    folder = out / name
    assert (folder / "README.md").is_file()  # training renders the card
    card = ModelCard.load(folder / "README.md")
    metrics = json.loads((folder / "metrics.json").read_text())
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0" and "thyroid" in data.tags
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"accuracy", "roc_auc", "f1", "balanced_accuracy"}
    for key, metric_type in (("accuracy", "accuracy"), ("roc_auc", "roc_auc"), ("f1_macro", "f1"), ("balanced_accuracy", "balanced_accuracy")):
        assert results[metric_type].metric_value == pytest.approx(metrics["test"][key]["value"], abs=1e-4)
        assert results[metric_type].dataset_split == "test" and results[metric_type].task_type == "image-classification"
    text = card.content
    for section in ("## Intended use", "## Training data", "## Preprocessing", "## Training procedure", "## Evaluation",
                    "## Calibration", "## Where the model looks", "## Plots", "## Limitations and bias", "## How to use"):
        assert section in text
    assert "not a diagnostic device" in text and "SYNTHETIC" in text
    assert metrics["training"]["preprocessing"]["split_views"] and "split into its views" in text  # short_run splits them
    low, high = metrics["test"]["roc_auc"]["ci"]
    assert f"[{low:.3f}, {high:.3f}]" in text


def test_card_cites_ddti_and_states_tirads(short_run, tmp_path):
    out, _ = short_run
    folder = tmp_path / "ddti-model"
    folder.mkdir()
    for name in ("metrics.json", "config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((out / "tiny-resnet" / name).read_bytes())
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["data"]["data_dir"] = "/data/shared/data/ddti/images"
    metrics["data"].pop("dataset", None)  # as in a run on DDTI: recognised from its folder
    (folder / "metrics.json").write_text(json.dumps(metrics))
    audit = json.loads((out / "tiny-resnet" / "audit.json").read_text())
    audit["class_cues"] = {"split screen": {"benign": 0.098, "malignant": 0.406}}  # what DDTI's audit finds
    (folder / "audit.json").write_text(json.dumps(audit))
    text = render_card(folder).content
    assert "Pedraza L" in text and "doi:10.1117/12.2073532" in text and "TI-RADS" in text
    assert "instead of the nodule: split screen (benign 10%, malignant 41%)" in text


def test_push_uploads_exactly_the_publishable_files(short_run, tmp_path, monkeypatch):
    out, _ = short_run
    folder = tmp_path / "tiny-vgg"  # a copy: a push re-renders the folder's card, and short_run is shared
    shutil.copytree(out / "tiny-vgg", folder)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value_123")
    api = fake_hf_api()
    names = push_folder(folder, "someone/thyroid-vgg", private=True, api=api)
    assert set(names) == set(api.uploaded) == EXPECTED
    api.create_repo.assert_called_once_with("someone/thyroid-vgg", private=True, exist_ok=True, repo_type="model")
    # One commit, which also removes whatever an earlier push left that this one does not upload.
    api.upload_folder.assert_called_once()
    assert api.upload_folder.call_args.kwargs["delete_patterns"] == "*"
    assert (folder / "checkpoints").is_dir() and (folder / "training_args.bin").is_file()  # exist locally, never pushed
    for name, content in api.uploaded.items():
        assert b"hf_secret_token_value_123" not in content, name
    pushed_metrics = json.loads(api.uploaded["metrics.json"])
    assert "/" not in pushed_metrics["data"]["data_dir"]  # no local paths leave the machine
    assert "someone/thyroid-vgg" in api.uploaded["README.md"].decode()
    assert set(files_to_push(folder)) == EXPECTED


def test_push_without_network_says_so_and_keeps_the_folder(short_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        check_push_access("someone/x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubUnreachableError, match="Nothing was trained"):
        check_push_access("someone/x", api=fake_hf_api(fail="whoami"))
    out, _ = short_run
    before = sorted(p.name for p in (out / "tiny-resnet").iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_main(["push", str(out / "tiny-resnet"), "someone/x"]) == 2
    assert sorted(p.name for p in (out / "tiny-resnet").iterdir()) == before


def test_push_access_creates_the_repository_and_checks_write_before_training(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = fake_hf_api()
    check_push_access("someone/x", private=True, api=api)
    api.create_repo.assert_called_once_with("someone/x", private=True, exist_ok=True, repo_type="model")
    api.auth_check.assert_called_once_with("someone/x", repo_type="model", write=True)
    for step, words in (("create_repo", "cannot create the repository"), ("auth_check", "cannot check write access")):
        with pytest.raises(HubUnreachableError, match=f"{words}.*write access.*Nothing was trained"):
            check_push_access("someone/x", api=fake_hf_api(fail=step))


def test_train_with_push_offline_fails_before_training(sample_dir, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train_main(["--data_dir", str(sample_dir), "--model", str(tiny_models["tiny-resnet"]), "--output_dir", str(tmp_path),
                       "--push_to_hub", "--hub_model_id", "someone/thyroid"])
    assert code == 2
    assert "push" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no training time spent


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-vgg"])
def test_pushed_layout_loads_with_pipeline_and_predictor(short_run, tmp_path, name, sample_dir):
    """What a push uploads is enough for pipeline() and the project's Predictor (both architectures)."""
    from PIL import Image
    from transformers import pipeline

    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    api = fake_hf_api()
    shutil.copytree(out / name, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))  # the push rewrites the card
    push_folder(tmp_path / name, f"someone/{name}", api=api)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for rel, content in api.uploaded.items():
        (snapshot / rel).write_bytes(content)
    image = Image.open(sample_dir / "benign" / "2000_1.png")
    answer = pipeline("image-classification", model=str(snapshot), device="cpu", trust_remote_code=True)(image, top_k=3)
    assert len(answer["scores"]) == 3 and answer["answer"] and "reason" in answer and "prediction_set" in answer
    with pytest.raises(ValueError, match="trust_remote_code"):  # bare scores are not an answer: the folder's pipeline or an explicit class
        pipeline("image-classification", model=str(snapshot), device="cpu")
    predictor = Predictor.from_pretrained(str(snapshot))
    assert predictor.preprocessor.crop and predictor.info["split"] == "test"
    assert predictor.predict([image])[0].overlay.shape[:2] == (image.height, image.width)


def test_evaluate_a_hub_model_checks_the_pushed_fingerprints(short_run, sample_dir, tmp_path, monkeypatch):
    """``evaluate MODEL_ID``: the fingerprints come with the model's inference files from the Hub (here a
    stand-in snapshot_download serving the files a push uploads), and a training image is reported."""
    import huggingface_hub

    from thyroid_classifier import predict
    from thyroid_classifier.evaluate import main as evaluate_main
    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    hub = tmp_path / "hub"
    push_folder(shutil.copytree(out / "tiny-resnet", tmp_path / "copy"), "someone/thyroid-resnet", api=(api := fake_hf_api()))
    for rel, content in api.uploaded.items():
        (hub / rel).parent.mkdir(parents=True, exist_ok=True)
        (hub / rel).write_bytes(content)

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        assert repo_id == "someone/thyroid-resnet"
        snap = tmp_path / "snapshot"
        snap.mkdir(exist_ok=True)
        for name in allow_patterns:
            if (hub / name).is_file():
                shutil.copy(hub / name, snap / name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    load = Predictor.from_pretrained.__func__

    def from_hub(cls, name, **kwargs):  # the weights as transformers would load them; the rest through _hub_folder
        predictor = load(cls, str(hub), **kwargs)
        predictor.folder = predict._hub_folder(name, local_only=False)
        return predictor

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(from_hub))
    external = tmp_path / "hospital_b"
    for label in ("benign", "malignant"):
        shutil.copytree(sample_dir / label, external / label, ignore=lambda d, names: [n for n in names if not n.startswith(("20", "30"))])
    assert evaluate_main(["someone/thyroid-resnet", str(external), "--out", str(tmp_path / "eval"), "--bootstrap", "20", "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert (tmp_path / "snapshot" / "fingerprints.json").is_file()
    assert len(report["training_overlap"]) > 0  # the sample's own frames: the model trained on some of them
