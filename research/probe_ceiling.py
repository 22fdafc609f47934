"""How much can any model read from DDTI's frames? Frozen-feature probes, with and without the nodule's outline.

    python research/probe_ceiling.py [--size 224] [--seed 42] [--out probes/]

Fine-tuning takes ~17 minutes per 5-fold run here, so a ceiling is cheaper to measure with the
pretrained backbone frozen: each frame (the product's ultrasound crop, square, plus its mirror
image) goes through Lite0 once; global average pooled features of its stages feed a class-weighted
logistic regression, on the same patient-grouped folds as `train.py --cv 5`, with the regularisation
chosen by an inner grouped CV on each fold's training part only (nested: the held-out fold never
picks anything). Rows:

- stages of the frame alone: what an image-only model can use (the fine-tuned recipe scores 0.738);
- `+ outline (oracle)`: the same features plus the same stages pooled inside the radiologist's
  nodule outline from DDTI's xml files, mapped into the crop: what a model could reach if it knew
  exactly where the nodule is (a clinician drawing it, or a perfect segmenter);
- `+ outline box (oracle)`: pooled inside the outline's bounding box instead (what a user drawing a
  rectangle would give).

Each row: pooled out-of-fold macro ROC AUC with a 95% bootstrap interval over patients, the C each
fold chose, and (with `--out`) a `cv_predictions`-style CSV per row for `thyroid_classifier.compare`.
A row without outlines is a real image-only model; the oracle rows use information a plain image
upload does not carry, and say so.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.data import GroupSpec, cv_folds  # noqa: E402
from thyroid_classifier.explain import outline_mask  # noqa: E402
from thyroid_classifier.known_data import frame_outline  # noqa: E402
from thyroid_classifier.metrics import bootstrap_intervals, macro_auc  # noqa: E402
from thyroid_classifier.models import build_model, get_spec  # noqa: E402
from thyroid_classifier.preprocess import UltrasoundPreprocessor  # noqa: E402
from thyroid_classifier.cv import pooled_folds  # noqa: E402
from thyroid_classifier.folder import prediction_rows, write_predictions  # noqa: E402

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
STAGES = ("s1", "s2", "s3", "s4", "head")  # strides 4, 8, 16, 32; the pooled, pre-logits head features


def outline_in_crop(path: str, xml_dir: Path, frame_size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray | None:
    """The radiologist's outline of this frame as a boolean mask of the crop ``box``; None when the case has none."""
    polygons = frame_outline(path, xml_dir)
    if not polygons:
        return None
    mask = outline_mask(polygons, frame_size)[box[1] : box[3], box[0] : box[2]]
    return mask if mask.any() else None


def bounding_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return out


def pooled(feature: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor:
    """Average of a (views, C, h, w) map over the whole map, or weighted by ``mask`` resized to it
    (the mirror view gets the mirrored mask); then averaged over the views."""
    if mask is None:
        return feature.mean((0, 2, 3))
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=feature.shape[2:], mode="area")[0, 0]
    m = torch.stack([m, m.flip(-1)])[:, None]  # one per view, the second mirrored like the image
    return ((feature * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6)).mean(0)


@torch.no_grad()
def extract(paths: list[str], model_path: str, size: int, xml_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per stage: frame-pooled, outline-pooled and box-pooled features; and which frames have an outline."""
    spec = get_spec(model_path)
    model, processor = build_model(spec, ["benign", "malignant"], "pretrained", size)
    backbone = model.eval().timm_model
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    prep = UltrasoundPreprocessor()
    out: dict[str, list] = {}
    has = []
    for path in paths:
        with Image.open(path) as image:
            frame = image.convert("RGB")
        region, box = prep.apply(frame)
        outline = outline_in_crop(path, xml_dir, frame.size, box)
        has.append(outline is not None)
        x = (torch.from_numpy(np.array(region.resize((size, size), Image.Resampling.BILINEAR))).permute(2, 0, 1).float() / 255 - mean) / std
        final, inter = backbone.forward_intermediates(torch.stack([x, x.flip(-1)]))
        maps = dict(zip(STAGES[:4], inter[1:]))
        for stage, feature in maps.items():
            out.setdefault(stage, []).append(pooled(feature, None))
            out.setdefault(f"{stage}@outline", []).append(pooled(feature, outline))
            out.setdefault(f"{stage}@box", []).append(pooled(feature, None if outline is None else bounding_box(outline)))
        out.setdefault("head", []).append(backbone.forward_head(final, pre_logits=True).mean(0))
    return {k: torch.stack(v).numpy() for k, v in out.items()}, np.array(has)


def probe(x: np.ndarray, y: np.ndarray, groups: list[str], folds: list, seed: int) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold P(class) of a logistic regression whose C is chosen inside each training part."""
    def fit(c: float, rows: np.ndarray):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
        return clf.fit(x[rows], y[rows])

    oof = np.full((len(y), int(y.max()) + 1), np.nan)
    chosen = []
    for pool, held in folds:
        inner = cv_folds(y[pool], [groups[i] for i in pool], 4, seed)
        scores = []
        for c in C_GRID:
            inner_oof = np.zeros((len(pool), oof.shape[1]))
            for tr, te in inner:
                inner_oof[te] = fit(c, pool[tr]).predict_proba(x[pool[te]])
            scores.append(macro_auc(y[pool], inner_oof))
        c = C_GRID[int(np.argmax(scores))]
        chosen.append(c)
        oof[held] = fit(c, pool).predict_proba(x[held])
    return oof, chosen


ROWS = {  # name: feature blocks (see extract)
    "last layer (linear probe)": ["head"],
    "stage 3 (stride 16)": ["s3"],
    "stages 2+3": ["s2", "s3"],
    "stages 1-4": ["s1", "s2", "s3", "s4"],
    "stages 2+3 + outline (oracle)": ["s2", "s3", "s2@outline", "s3@outline"],
    "stages 2+3 inside the outline only (oracle)": ["s2@outline", "s3@outline"],
    "stages 2+3 + outline box (oracle)": ["s2", "s3", "s2@box", "s3@box"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data/ddti/images")
    p.add_argument("--model", default="../shared/models/efficientnet_lite0-imagenet")
    p.add_argument("--xml_dir", default="../shared/data/ddti/xml")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=42, help="the folds: 42 gives train.py --cv 5's")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", default=None, help="folder for one cv_predictions-style CSV per row")
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    dataset, _ = audited_dataset(a.data_dir, drop_duplicates="none", near_threshold=8, progress=False,
                                 validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    cv = pooled_folds(dataset, 5, a.seed)
    y, labels, groups, paths, folds, fold_of = cv.y, cv.labels, cv.groups, cv.paths, cv.folds, cv.fold_of

    started = time.time()
    features, has = extract(paths, a.model, a.size, Path(a.xml_dir))
    print(f"{len(y)} frames ({has.sum()} with an outline), features in {time.time() - started:.0f} s; 5 folds, seed {a.seed}")
    print(f"| probe ({a.size} px crop, frozen Lite0) | features | pooled macro AUC [95%] | C per fold |")
    print("| --- | --- | --- | --- |")
    for name, blocks in ROWS.items():
        x = np.concatenate([features[b] for b in blocks], axis=1)
        oof, chosen = probe(x, y, groups, folds, a.seed)
        ci = bootstrap_intervals(y, oof, labels, groups=groups, n_resamples=a.resamples, seed=a.seed)["roc_auc"]
        print(f"| {name} | {x.shape[1]} | {macro_auc(y, oof):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {' '.join(f'{c:g}' for c in chosen)} |", flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            write_predictions(Path(a.out) / f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.csv", labels,
                              prediction_rows(paths, labels, y, oof, group=groups, fold=fold_of.tolist()))
    print(f"wall {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
