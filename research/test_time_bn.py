"""Test-time BatchNorm statistics on an unseen source: does re-estimating them help a model transfer?

    python research/test_time_bn.py FOLD_MODEL --data_dir UNSEEN_SOURCE [--shares 1.0 0.5]

FOLD_MODEL is the final model of one ``train.py --loso`` fold: the model trained on every source but
UNSEEN_SOURCE (``loso.py`` deletes its checkpoints after scoring it, so copy the last checkpoint
before then, and put an ``ultrasound_preprocessing.json`` beside it). The frames go through the
product's inference path (``Predictor.prepare``: crop, resize, normalisation). Each BatchNorm layer's
running mean and variance are then re-estimated on all of the unseen source's frames (no labels),
optionally mixed with the trained ones (``--shares``: the unseen source's share), and the frames
scored again. This is transductive: a site would run it once on its own unlabelled images before
use. Prints macro ROC AUC before and after with 95% intervals resampling patients, and the paired
difference on the same frames.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.cv import pooled  # noqa: E402
from thyroid_classifier.data import GroupSpec  # noqa: E402
from thyroid_classifier.metrics import paired_difference, scored  # noqa: E402
from thyroid_classifier.predict import Predictor  # noqa: E402


def batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def probabilities(predictor: Predictor, pixels: list[torch.Tensor]) -> np.ndarray:
    logits = torch.cat([predictor.model(pixel_values=px).logits for px in pixels])
    return torch.softmax(logits, -1).numpy()


@contextlib.contextmanager
def statistics_from(model: torch.nn.Module, pixels: list[torch.Tensor], share: float) -> Iterator[torch.nn.Module]:
    """BatchNorm statistics: ``share`` re-estimated on these pixels (a cumulative average), the rest as
    trained; the trained statistics are restored on exit."""
    layers = batchnorms(model)
    trained = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over every batch
                m.train()
            for px in pixels:
                model(pixel_values=px)
            for m, (mean, var, _) in zip(layers, trained):
                m.eval()
                m.running_mean.mul_(share).add_(mean * (1 - share))
                m.running_var.mul_(share).add_(var * (1 - share))
        yield model
    finally:
        with torch.no_grad():
            for m, (mean, var, momentum) in zip(layers, trained):
                m.eval()
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data_dir", required=True, help="the unseen source (class sub-folders)")
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dataset, _ = audited_dataset([a.data_dir], progress=False, validation_size=0.0, test_size=0.0, seed=42, groups=GroupSpec())
    pool = pooled(dataset)
    predictor = Predictor.from_pretrained(a.model)
    y = np.array([predictor.labels.index(pool.labels[v]) for v in pool.y])
    pixels = []
    for i in range(0, len(pool.paths), 32):
        images = [Image.open(path).convert("RGB") for path in pool.paths[i:i + 32]]
        px, _, owner = predictor.prepare(images)
        if len(owner) != len(images):
            raise SystemExit("split-view models are not supported here")
        pixels.append(px)
    before = probabilities(predictor, pixels)

    def auc(probs: np.ndarray) -> str:
        m = scored(y, probs, predictor.labels, pool.groups, a.resamples, 0)["roc_auc"]
        return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"

    print(f"{a.model} on {a.data_dir} ({len(y)} frames): trained statistics {auc(before)}")
    for share in a.shares:
        with statistics_from(predictor.model, pixels, share):
            after = probabilities(predictor, pixels)
        d = paired_difference(y, before, after, pool.groups, n_resamples=a.resamples, seed=0)["roc_auc"]
        print(f"  {share:.0%} of the statistics from the unseen source: {auc(after)}; "
              f"minus trained {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")


if __name__ == "__main__":
    main()
