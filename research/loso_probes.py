"""Leave-one-source-out with frozen backbones: which features transfer to a source never seen?

    python research/loso_probes.py [--data_dir A B] [--out loso_probes/] [--compare_to OUTPUT_DIR/<model>/loso_predictions.csv]

Fine-tuning a backbone per held-out source costs ~10-25 minutes here; a frozen backbone's features
are computed once (cached in ``--out``) and a probe is fitted per held-out source in a second. Each
frame goes through the product's ultrasound crop, a square resize and the backbone's own
normalisation; features are the global average of a stage's map (Lite0: stages 1-4 and the head;
VGG19: after each max-pool). The probe is a logistic regression on standardised features, its loss
weighted per (source, class) cell as ``train.py`` weighs its loss (``weighting.stratum_weights``),
its C chosen by grouped 4-fold CV *inside the training source(s)*: the held-out source chooses nothing.

Rows are scored on the same frames, groups and sources as ``train.py --data_dir A B --loso``; each
row writes a ``loso_predictions``-style CSV, and ``--compare_to`` prints the paired difference of
every row against that file (``thyroid_classifier.compare``: the same patients resampled for both).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.data import GroupSpec, cv_folds, strata  # noqa: E402
from thyroid_classifier.loso import loso_table, source_splits  # noqa: E402
from thyroid_classifier.metrics import macro_auc, paired_difference, scored  # noqa: E402
from thyroid_classifier.preprocess import UltrasoundPreprocessor  # noqa: E402
from thyroid_classifier.cv import pooled  # noqa: E402
from thyroid_classifier.folder import prediction_rows, write_predictions  # noqa: E402
from thyroid_classifier.weighting import stratum_weights  # noqa: E402

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
BACKBONES = {"lite0": "../shared/models/efficientnet_lite0-imagenet", "vgg19": "../shared/models/vgg19-imagenet"}
ROWS = {  # name: (backbone, feature blocks)
    "Lite0 head (the usual linear probe)": ("lite0", ["head"]),
    "Lite0 stages 2+3": ("lite0", ["s2", "s3"]),
    "Lite0 stage 4": ("lite0", ["s4"]),
    "VGG19 after pool 3": ("vgg19", ["p3"]),
    "VGG19 after pools 3+4": ("vgg19", ["p3", "p4"]),
    "VGG19 after pool 5": ("vgg19", ["p5"]),
}
ENSEMBLES = {"Lite0 head + VGG19 pool 3 (mean probability)": ["Lite0 head (the usual linear probe)", "VGG19 after pool 3"]}


@torch.no_grad()
def extract(paths: list[str], backbone: str, size: int, cache: Path) -> dict[str, np.ndarray]:
    """Per block: (n, channels) global-average-pooled features; cached per backbone and size."""
    from transformers import AutoModelForImageClassification

    file = cache / f"{backbone}_{size}.npz"
    if file.is_file():
        stored = np.load(file)
        if list(stored["paths"]) == paths:
            return {k: stored[k] for k in stored.files if k != "paths"}
    model = AutoModelForImageClassification.from_pretrained(BACKBONES[backbone]).eval().timm_model
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    prep = UltrasoundPreprocessor()
    out: dict[str, list] = {}
    for path in paths:
        with Image.open(path) as image:
            region = prep(image)
        x = torch.from_numpy(np.array(region.resize((size, size), Image.Resampling.BILINEAR))).permute(2, 0, 1).float() / 255
        x = ((x - mean) / std)[None]
        if backbone == "lite0":
            final, inter = model.forward_intermediates(x)
            blocks = dict(zip(("s1", "s2", "s3", "s4"), inter[1:]))
            blocks = {k: v.mean((2, 3))[0] for k, v in blocks.items()}
            blocks["head"] = model.forward_head(final, pre_logits=True)[0]
        else:
            blocks, pool = {}, 0
            for layer in model.features:
                x = layer(x)
                if isinstance(layer, torch.nn.MaxPool2d):
                    pool += 1
                    blocks[f"p{pool}"] = x.mean((2, 3))[0]
        for k, v in blocks.items():
            out.setdefault(k, []).append(v.numpy())
    features = {k: np.stack(v) for k, v in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, paths=np.array(paths), **features)
    return features


def probe(x: np.ndarray, y: np.ndarray, groups: list[str], sources: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """Out-of-source probabilities: for each source, a probe fitted on the others (C chosen inside them)."""
    def fit(c: float, rows: np.ndarray):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        return clf.fit(x[rows], y[rows], logisticregression__sample_weight=stratum_weights(y[rows].tolist(), sources[rows].tolist()))

    probs = np.full((len(y), int(y.max()) + 1), np.nan)
    chosen = {}
    for name, train, held in source_splits(sources):
        inner = cv_folds(strata(y[train], sources[train]), [groups[i] for i in train], 4, seed)
        scores = []
        for c in C_GRID:
            inner_p = np.zeros((len(train), probs.shape[1]))
            for tr, te in inner:
                inner_p[te] = fit(c, train[tr]).predict_proba(x[train[te]])
            scores.append(macro_auc(y[train], inner_p))
        chosen[name] = C_GRID[int(np.argmax(scores))]
        probs[held] = fit(chosen[name], train).predict_proba(x[held])
    return probs, chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", nargs="+", default=["../shared/data/ddti/images", "../shared/data/les3bdd/images"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", default="loso_probes", help="feature cache and one loso_predictions-style CSV per row")
    p.add_argument("--compare_to", default=None, help="a loso_predictions.csv (e.g. train.py --loso's) to pair every row with")
    p.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)

    dataset, _ = audited_dataset(a.data_dir, progress=False, validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    pool = pooled(dataset)
    y, labels, groups, paths, sources = pool.y, pool.labels, pool.groups, pool.paths, np.asarray(pool.sources)
    reference = None
    if a.compare_to:
        from thyroid_classifier.compare import read_predictions

        reference = read_predictions(a.compare_to)
    rows = {k: v for k, v in ROWS.items() if not a.rows or k in a.rows}
    started = time.time()
    features = {b: extract(paths, b, a.size, out) for b in sorted({b for b, _ in rows.values()})}
    print(f"{len(y)} frames from {', '.join(sorted(set(sources.tolist())))}; features in {time.time() - started:.0f} s")
    results: dict[str, np.ndarray] = {}
    for name, (backbone, blocks) in rows.items():
        x = np.concatenate([features[backbone][b] for b in blocks], axis=1)
        results[name], chosen = probe(x, y, groups, sources, a.seed)
        print(f"{name}: C chosen per held-out source {chosen}")
    for name, members in ENSEMBLES.items():
        if all(m in results for m in members):
            results[name] = np.mean([results[m] for m in members], axis=0)
    for name, probs in results.items():
        held = {s: {"n": int((sources == s).sum()), "trained_on": [t for t in sorted(set(sources.tolist())) if t != s],
                    "metrics": scored(y[sources == s], probs[sources == s], labels, [groups[i] for i in np.flatnonzero(sources == s)], a.resamples, a.seed)}
                for s in sorted(set(sources.tolist()))}
        print(loso_table({"model": name, "held_out": held}))
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        write_predictions(out / f"{slug}.csv", labels, prediction_rows(paths, labels, y, probs, group=groups, source=list(sources)))
        if reference is not None:
            ref = np.array([reference.rows[path][2] for path in paths])
            for s in sorted(set(sources.tolist())):
                m = sources == s
                d = paired_difference(y[m], ref[m], probs[m], [groups[i] for i in np.flatnonzero(m)], n_resamples=a.resamples, seed=a.seed)["roc_auc"]
                print(f"  unseen {s}: {name} - reference = {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (reference {d['a']:.3f}, this {d['b']:.3f})")
    print(f"wall {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
