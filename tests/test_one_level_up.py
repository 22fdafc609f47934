"""Tests at the level a user meets a behaviour (issue 32): the run's own loss, the Predictor's heatmap,
the page's headline, the fitted thresholds, the decoder's budget, the upload clock. Each names, in its
docstring, the realistic bug that was put in by hand to see it fail: the helper it calls may be tested
elsewhere, but a product that stops calling it (or calls it wrongly) must fail here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F


def _recorded_run(tiny_models, data_dirs: list[Path], out: Path):
    """One tiny ResNet trained one epoch on ``data_dirs`` (each a source): the Trainer it used, its metrics, its folder."""
    from thyroid_classifier import fit
    from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run

    made = []
    original = fit.SampleWeightedTrainer

    def recording(**kwargs):
        made.append(original(**kwargs))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "SampleWeightedTrainer", recording)
        run(DataArguments(data_dir=[str(d) for d in data_dirs]), ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
            RunArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=8, bootstrap_resamples=20, early_stopping_patience=0,
                         # levels at which a few validation frames a class give finite sets, and at which the guard's
                         # conformal rank differs from its off-by-one neighbours (checked in the test)
                         conformal_alpha=0.5, guard_coverage=0.5))
    [trainer] = made
    folder = out / "tiny-resnet"
    return trainer, json.loads((folder / "metrics.json").read_text()), folder


@pytest.fixture(scope="module")
def one_source_run(tiny_models, sample_dir, tmp_path_factory):
    return _recorded_run(tiny_models, [sample_dir], tmp_path_factory.mktemp("one-source"))


@pytest.fixture(scope="module")
def two_source_run(tiny_models, two_sources, tmp_path_factory):
    return _recorded_run(tiny_models, list(two_sources), tmp_path_factory.mktemp("two-sources"))


def _whole_train_set(trainer) -> dict:
    """Every training row as one batch, in the dataset's order (what the Trainer's loss sees, unshuffled)."""
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(trainer.train_dataset, batch_size=len(trainer.train_dataset), shuffle=False, collate_fn=trainer.data_collator)))


@pytest.mark.parametrize("sources", [1, 2], ids=["one source", "two sources"])
def test_the_runs_loss_weighs_examples_as_its_metrics_say(sources, request):
    """Bugs: the Trainer's loss built without the class weights (``make_loss(None, ...)``) while
    metrics.json and the card list them; with exactly two sources, training falling back to plain class
    weights (``len(set(sources)) > 2``) while the metrics report source x class weights."""
    trainer, metrics, _ = request.getfixturevalue("one_source_run" if sources == 1 else "two_source_run")
    training, labels = metrics["training"], metrics["labels"]
    smoothing = training["label_smoothing"]
    batch = _whole_train_set(trainer)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
        got = trainer.compute_loss(model, dict(batch)).item()
    y = batch["labels"]
    plain = F.cross_entropy(logits, y, label_smoothing=smoothing).item()
    if sources == 1:
        assert training["source_class_weights"] is None and "sample_weight" not in batch
        weights = torch.tensor(training["class_weights"])
        assert len(set(weights.tolist())) > 1  # the sample's classes are imbalanced in train: the weights matter
        assert got == pytest.approx(F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing).item(), rel=1e-3)
    else:
        rows = trainer.train_dataset.with_format(None)
        expected = torch.tensor([training["source_class_weights"][f"{s}|{labels[k]}"] for s, k in zip(rows["source"], rows["label"], strict=True)])
        assert "sample_weight" in batch, "two sources trained without per-example source x class weights"
        np.testing.assert_allclose(batch["sample_weight"].numpy(), expected.numpy(), atol=1e-3)
        per_example = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
        assert got == pytest.approx(((per_example * expected).sum() / expected.sum()).item(), rel=1e-3)
    assert got != pytest.approx(plain, rel=1e-3)  # the weighting changes the loss the run minimises


def _validation_frames(trainer) -> tuple[list[str], list[int]]:
    """The run's validation frames (paths) and labels, one per frame."""
    rows = trainer.eval_dataset.with_format(None)
    seen: dict[str, int] = {}
    for path, label in zip(rows["path"], rows["label"], strict=True):
        seen.setdefault(path, int(label))
    return list(seen), list(seen.values())


def test_the_saved_sets_and_guard_are_fitted_on_what_the_predictor_will_score(one_source_run):
    """Bugs: conformal sets fitted on uncalibrated validation probabilities and applied to calibrated
    ones; the guard calibrated on the training images' scores (or fitted on validation); the guard's
    direction turned (``score < threshold`` flags). Checked as a user meets them: the folder's sets
    and guard against the scores its Predictor gives the run's own validation frames."""
    import math

    from thyroid_classifier.predict import Predictor
    from thyroid_classifier.reliability import Reliability

    trainer, metrics, folder = one_source_run
    predictor = Predictor.from_pretrained(str(folder))
    assert abs(predictor.temperature - 1.0) > 0.02  # calibration changes the probabilities: the order of the two steps matters
    paths, y = _validation_frames(trainer)
    results = predictor.predict(paths, explain=False)
    probs = np.array([[r.probabilities[c] for c in predictor.labels] for r in results])
    reliability = Reliability.from_pretrained(folder)
    alpha = reliability.conformal.alpha
    assert any(math.isfinite(t) for t in reliability.conformal.thresholds)  # else every set holds every class: nothing checked
    for k, threshold in enumerate(reliability.conformal.thresholds):
        scores = np.sort(1.0 - probs[np.asarray(y) == k, k])
        rank = math.ceil((len(scores) + 1) * (1 - alpha))
        expected = scores[rank - 1] if 0 < rank <= len(scores) else math.inf
        assert threshold == pytest.approx(expected, abs=1e-5), f"class {k}: sets not fitted on the calibrated validation probabilities"
    guard = reliability.guard
    scores = np.array([r.in_domain_score for r in results])
    n = len(scores)
    rank = min(n, math.ceil((n + 1) * guard.coverage))
    assert rank not in (math.ceil(n * guard.coverage), n), "at this n an off-by-one rank would go unnoticed"
    assert guard.threshold == pytest.approx(np.sort(scores)[rank - 1], rel=1e-4), "the guard was not calibrated on the validation frames"
    flagged = np.array([r.flagged for r in results])
    np.testing.assert_array_equal(flagged, scores > guard.threshold)
    assert flagged.sum() == len(scores) - rank  # the highest scores are the ones flagged


def test_the_predictor_explains_the_class_it_was_asked_for(saved_folder, sample_dir):
    """Bug: ``Predictor.predict(target=...)`` computing Grad-CAM of the top class (``targets=None``) while
    reporting ``explained`` as the class asked for."""
    from PIL import Image

    from thyroid_classifier.explain import gradcam, to_original
    from thyroid_classifier.predict import Predictor

    predictor = Predictor.from_pretrained(str(saved_folder))
    frame = Image.open(sample_dir / "benign" / "2000_1.png").convert("RGB")
    [top] = predictor.predict([frame], opacity=None)
    other = next(label for label in predictor.labels if label != top.label)
    [asked] = predictor.predict([frame], target=other, opacity=None)
    pixels, boxes, _ = predictor.prepare([frame])
    expected = to_original(gradcam(predictor.model, predictor.layer, pixels, [predictor.labels.index(other)]).maps[0], boxes[0], frame.size)
    assert asked.explained == other
    np.testing.assert_allclose(asked.heatmap, expected, atol=1e-4)
    assert not np.allclose(asked.heatmap, top.heatmap, atol=1e-3)  # the two classes' maps differ: the test can tell them apart


def _status_mib(script: str, *args: str) -> list[str]:
    """Run ``script`` in a fresh Python (peak memory reset after imports); its printed words."""
    import subprocess
    import sys

    prelude = ("import sys; from pathlib import Path\n"
               "status = lambda key: next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key)) / 1024\n")
    return subprocess.run([sys.executable, "-c", prelude + script, *args], capture_output=True, text=True, check=True).stdout.split()


def test_a_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(tmp_path):
    """Bug: the pixel budget checked after the image is decoded: refusing a 95 Mpx PNG then costs the
    95 MB it decodes to (the page-level bomb test's bound, 150 MB, let it through), and a 45 Mpx JPEG,
    decoded at a reduced DCT scale, is accepted."""
    from PIL import Image

    from thyroid_classifier.preprocess import MAX_PIXELS, ImageError, open_image

    png = tmp_path / "bomb.png"
    Image.new("L", (9500, 10000), 90).save(png, optimize=True)
    words = _status_mib(
        "from thyroid_classifier.preprocess import ImageError, open_image\n"
        "Path('/proc/self/clear_refs').write_text('5'); before = status('VmRSS:')\n"
        "try:\n    open_image(sys.argv[1]); print('accepted', 0)\nexcept ImageError:\n    print('refused', status('VmHWM:') - before)\n", str(png))
    assert words[0] == "refused" and float(words[1]) < 20, f"refusing it cost {words[1]} MiB"
    jpeg = tmp_path / "wide.jpg"
    Image.new("L", (9000, 5000), 90).save(jpeg, quality=50)  # 45 Mpx: over the limit, though it could be decoded at 1/8 scale
    assert 9000 * 5000 > MAX_PIXELS
    with pytest.raises(ImageError, match=f"{MAX_PIXELS:,} allowed"):
        open_image(jpeg)


def test_a_refused_upload_is_deleted_on_the_upload_clock(short_run, tmp_path, monkeypatch):
    """Bug: an upload refused as "not an image" not handed to the upload clock (only gradio's slower
    clean-up, here set to minutes, would delete it)."""
    import time

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from thyroid_classifier.app import build_demo, load_predictors

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    out, _ = short_run
    demo = build_demo(load_predictors([str(out / "tiny-resnet")]), forget_uploads_after=0.5, cache_cleanup=(300, 600))
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False)
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        with pytest.raises(AppError, match="not an image"):
            client.predict(handle_file(str(bad)), "tiny-resnet", 0.45, api_name="/predict")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.name == "notes.png" for p in cache.rglob("*")):
            time.sleep(0.1)
        assert not any(p.name == "notes.png" for p in cache.rglob("*")), "the refused upload outlived the upload clock"
    finally:
        demo.close()


def test_the_page_never_headlines_a_label_whose_set_holds_two_classes(short_run, sample_dir):
    """Bug: the page headlining the top class when the prediction set holds two classes (``len(set) > 2``
    taken as the test for "cannot tell"): the one rule that stops a confident wrong answer. The other
    tests' sets held one class or all three."""
    import copy
    import math

    from gradio_client import Client, handle_file

    from thyroid_classifier.answer_rule import IN_SOURCE, UNSEEN, Regime
    from thyroid_classifier.app import build_demo, load_predictors
    from thyroid_classifier.reliability import Reliability

    out, _ = short_run
    base = load_predictors([str(out / "tiny-resnet")])["tiny-resnet"]
    two = copy.copy(base)
    # normal and benign always in the set, malignant never; any probability is enough to headline a single-class set
    pair = Regime(thresholds=[math.inf, math.inf, -1.0], alpha=0.1, headline_threshold=0.0, max_error=0.2, per_class=True, evidence="test frames")
    two.reliability = Reliability(regimes={UNSEEN: pair, IN_SOURCE: pair}, training_sources=list(base.training_sources))
    demo = build_demo({"two": two}, forget_uploads_after=5.0)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False)
        for name in ("normal/1000_1.png", "benign/2000_1.png", "malignant/3000_1.png"):
            label, _, message, data = client.predict(handle_file(str(sample_dir / name)), "two", 0.45, api_name="/predict")
            assert label["label"] == "normal or benign: cannot tell" and not label.get("confidences"), name
            assert data["headlined"] is False and data["prediction_set"] == ["normal", "benign"]
            assert "cannot rule out normal or benign" in message and "The model's scores, not an answer" in message
    finally:
        demo.close()


def test_a_resumed_run_takes_only_the_steps_after_its_checkpoint(tiny_models, sample_dir, tmp_path):
    """Fast version of the slow resume test. Bug: ``--resume`` ignored (the run starts over from step 1
    and takes every step again)."""
    from test_training import _args, _Interrupt, _StepCounter

    from thyroid_classifier.training import run

    data_args, model_args, run_args = _args(sample_dir, [tiny_models["tiny-resnet"]], tmp_path, bootstrap_resamples=10)
    with pytest.raises(KeyboardInterrupt):
        run(data_args, model_args, run_args, callbacks=[_Interrupt()])
    [checkpoint] = (tmp_path / "tiny-resnet" / "checkpoints").glob("checkpoint-*")
    start = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    run_args.resume = True
    counter = _StepCounter()
    run(data_args, model_args, run_args, callbacks=[counter])
    assert counter.steps[0] == start + 1 and counter.steps[-1] == 2 * start  # only the second epoch's steps


def test_leave_one_source_out_never_trains_on_the_source_it_scores(two_sources, tiny_models, tmp_path, monkeypatch):
    """Fast version of the slow LOSO test (no model is trained: each held-out run is a stand-in that
    records its splits and scores its test rows perfectly). Bugs: the held-out source left in training
    or validation; a run's scores written onto another source's rows; a frame scored twice or never."""
    from types import SimpleNamespace

    from thyroid_classifier import fit, training
    from thyroid_classifier.training import DataArguments, ModelArguments, RunArguments, run

    seen: list[dict] = []
    handed: list = []

    def held_out_run(spec, fold, *args, **kwargs):
        seen.append({split: sorted(set(ds.with_format(None)["source"])) for split, ds in fold.items()})
        y = np.asarray(fold["test"].with_format(None)["label"])
        logits = np.eye(3)[y] * 6.0  # right about every frame it scores
        return SimpleNamespace(metrics={"calibration": {"temperature": 1.0}}, reliability=None,
                               outputs={"test": SimpleNamespace(logits=logits, features=None), "validation": None})

    def final_run(spec, dataset, *args, loso=None, **kwargs):
        handed.append(loso)
        scored = {"roc_auc": {"value": 1.0, "ci": [1.0, 1.0]}, "balanced_accuracy": {"value": 1.0}}
        return SimpleNamespace(metrics={"split": "test", "test": scored, "n": 0})  # what run() prints of it

    monkeypatch.setattr(fit, "train_one", held_out_run)
    monkeypatch.setattr(training, "train_one", final_run)
    monkeypatch.setattr(training, "write_comparison", lambda *args, **kwargs: None)
    run(DataArguments(data_dir=[str(p) for p in two_sources]), ModelArguments(model=[str(tiny_models["tiny-resnet"])], image_size=32),
        RunArguments(output_dir=str(tmp_path), bootstrap_resamples=10, loso=True))
    assert [s["test"] for s in seen] == [["site_a"], ["site_b"]]
    for s in seen:
        assert s["test"][0] not in s["train"] + s["validation"] and s["train"]
    import csv

    with (tmp_path / "tiny-resnet" / "loso_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    n_files = sum(1 for p in two_sources for _ in p.rglob("*.png"))
    assert len(rows) == n_files == len({r["path"] for r in rows})
    assert all(float(r[f"p_{r['label']}"]) > 0.9 for r in rows)  # each run's scores are on its own source's rows
    [loso] = handed
    assert not np.isnan(loso["out_of_source"]["probs"]).any()
    assert {name: entry["trained_on"] for name, entry in loso["held_out"].items()} == {"site_a": ["site_b"], "site_b": ["site_a"]}
