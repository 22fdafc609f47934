"""How many frames must a new hospital label? A learning curve per leave-one-source-out direction.

    python benchmarks/learning_curve.py [--data_dir A B] [--k 0 8 16 32 64 128] [--draws 3] [--out learning_curve/]

For each direction (train on one source, the other is "the new hospital"), k frames of the new
hospital are labelled (patients drawn at random within each class until k frames are reached; 3
draws) and the rest of that hospital is the test set. Three strategies, each on the same frozen
ImageNet Lite0 features (the head's pooled features of the product's ultrasound crop, cached by
``research/loso_probes.py``'s extractor), a logistic regression each:

- **adapt the source model**: the model trained on the other source, then fitted to the k frames
  with a penalty that keeps it near the source model (what "adapt the public model" is with a head);
- **source + k**: one model on the other source and the k frames, each source's classes weighed
  equally (as ``train.py`` weighs several sources);
- **k alone**: the new hospital's k frames only.

Frozen features, not fine-tuning: a fine-tuned run costs ~10-25 minutes here, so the 2 x 6 x 3 x 3
runs of a curve would take days; the features are computed once. The numbers are therefore those of
a linear head on a frozen backbone, not of ``train.py``'s fine-tuned recipe. Macro ROC AUC on the
rest of the new hospital, with a 95% interval resampling its patients, and the paired difference
against k = 0 of the same strategy's family (the source model, on the same test frames). C is
chosen once per direction by grouped cross-validation inside the source: the new hospital chooses
nothing. Writes ``learning_curve.json``, ``learning_curve.md`` and ``learning_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "research"))  # the cached feature extractor of loso_probes.py

from loso_probes import C_GRID, extract  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.cv import pooled  # noqa: E402
from thyroid_classifier.data import GroupSpec, cv_folds, strata  # noqa: E402
from thyroid_classifier.metrics import bootstrap_intervals, macro_auc, paired_difference  # noqa: E402
from thyroid_classifier.weighting import stratum_weights  # noqa: E402

STRATEGIES = ("adapt the source model", "source + k", "k alone")


def draw(y: np.ndarray, groups: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of about ``k`` frames: whole patients, drawn at random within each class in proportion to
    the class's share (at least one patient a class), stopping once a class has its share."""
    chosen: list[int] = []
    classes = np.unique(y)
    for c in classes:
        want = max(1, round(k * np.mean(y == c)))
        patients = rng.permutation(np.unique(groups[y == c]))
        got = 0
        for g in patients:
            if got >= want:
                break
            rows = np.flatnonzero((groups == g) & (y == c))
            chosen += rows.tolist()
            got += len(rows)
    return np.unique(np.asarray(chosen, dtype=int))


def fit_head(x: np.ndarray, y: np.ndarray, c: float, weight: np.ndarray | None = None) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=weight)


def adapt(source: LogisticRegression, x: np.ndarray, y: np.ndarray, c: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The source head fitted to (x, y) with an L2 pull toward the source's weights (strength 1 / c,
    as the source head's own penalty): coefficients and intercepts, in the multinomial form."""
    w0 = torch.tensor(source.coef_, dtype=torch.float64)
    b0 = torch.tensor(source.intercept_, dtype=torch.float64)
    if w0.shape[0] == 1:  # binary: sklearn keeps one row; as two logits, class 1 minus class 0
        w0, b0 = torch.cat([torch.zeros_like(w0), w0]), torch.cat([torch.zeros_like(b0), b0])
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, reduction="sum") + ((w - w0) ** 2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def proba(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` (a model that saw fewer classes gives the others 0)."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def choose_c(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int) -> float:
    folds = cv_folds(strata(y, ["s"] * len(y)), groups, 4, seed)
    scores = []
    for c in C_GRID:
        p = np.zeros((len(y), int(y.max()) + 1))
        for tr, te in folds:
            p[te] = proba(fit_head(x[tr], y[tr], c), x[te], p.shape[1])
        scores.append(macro_auc(y, p))
    return C_GRID[int(np.argmax(scores))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", nargs="+", default=["../shared/data/ddti/images", "../shared/data/les3bdd/images"])
    p.add_argument("--k", type=int, nargs="+", default=[0, 8, 16, 32, 64, 128])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", default="loso_probes", help="the frozen-feature cache (shared with research/loso_probes.py)")
    p.add_argument("--out", default="learning_curve")
    a = p.parse_args(argv)
    started = time.time()
    dataset, _ = audited_dataset(a.data_dir, progress=False, validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    pool = pooled(dataset)
    y, labels, groups, sources = np.asarray(pool.y), pool.labels, np.asarray(pool.groups), np.asarray(pool.sources)
    features = extract(list(pool.paths), "lite0", 224, Path(a.cache))["head"]
    n_classes = len(labels)
    print(f"{len(y)} frames, features in {time.time() - started:.0f} s")
    rows, curves = [], {}
    for site in sorted(set(sources.tolist())):
        src = np.flatnonzero(sources != site)
        scaler = StandardScaler().fit(features[src])  # the source model's standardisation, kept when it adapts
        x = scaler.transform(features)
        c = choose_c(x[src], y[src], groups[src].tolist(), a.seed)
        source_model = fit_head(x[src], y[src], c, stratum_weights(y[src].tolist(), sources[src].tolist()))
        site_rows = np.flatnonzero(sources == site)
        direction = f"{'+'.join(sorted(set(sources[src].tolist())))} -> {site}"
        print(f"{direction}: C = {c} (chosen inside the source), {len(site_rows)} frames of {site}")
        for k in a.k:
            for d in range(a.draws if k else 1):
                rng = np.random.default_rng([a.seed, k, d])
                labelled = site_rows[draw(y[site_rows], groups[site_rows], k, rng)] if k else np.zeros(0, dtype=int)
                rest = np.setdiff1d(site_rows, labelled)
                rest = rest[~np.isin(groups[rest], groups[labelled])]  # no patient on both sides
                base = proba(source_model, x[rest], n_classes)
                probs = {}
                if k == 0:
                    probs = {s: base for s in STRATEGIES[:2]}
                else:
                    w, b = adapt(source_model, x[labelled], y[labelled], c, n_classes)
                    probs["adapt the source model"] = softmax_rows(x[rest] @ w.T + b)
                    both = np.concatenate([src, labelled])
                    probs["source + k"] = proba(fit_head(x[both], y[both], c, stratum_weights(y[both].tolist(), sources[both].tolist())), x[rest], n_classes)
                    if len(np.unique(y[labelled])) > 1:
                        probs["k alone"] = proba(fit_head(x[labelled], y[labelled], c), x[rest], n_classes)
                for strategy, pr in probs.items():
                    ci = bootstrap_intervals(y[rest].tolist(), pr, labels, groups=groups[rest].tolist(), n_resamples=a.resamples, seed=a.seed)["roc_auc"]
                    diff = paired_difference(y[rest], base, pr, groups[rest].tolist(), n_resamples=a.resamples, seed=a.seed)["roc_auc"]
                    rows.append({"direction": direction, "strategy": strategy, "k": k, "draw": d, "labelled": int(len(labelled)), "n_test": int(len(rest)),
                                 "auc": macro_auc(y[rest], pr), "ci": ci, "vs_k0": diff["difference"], "vs_k0_ci": diff["ci"]})
        print(f"  done in {time.time() - started:.0f} s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| direction | strategy | k (frames labelled, mean) | macro AUC on the rest (mean of draws) | lowest 95% lower bound | vs k = 0 (mean) [lowest, highest bound] | draws |",
             "|---|---|---|---|---|---|---|"]
    for (direction, strategy, k), group in _grouped(rows).items():
        auc = np.mean([r["auc"] for r in group])
        curves.setdefault((direction, strategy), []).append((np.mean([r["labelled"] for r in group]), auc, min(r["auc"] for r in group), max(r["auc"] for r in group)))
        lines.append(f"| {direction} | {strategy} | {k} ({np.mean([r['labelled'] for r in group]):.0f}) | {auc:.3f} | {min(r['ci'][0] for r in group):.3f} | "
                     f"{np.mean([r['vs_k0'] for r in group]):+.3f} [{min(r['vs_k0_ci'][0] for r in group):+.3f}, {max(r['vs_k0_ci'][1] for r in group):+.3f}] | {len(group)} |")
    table = "\n".join(lines)
    (out / "learning_curve.md").write_text(table + "\n")
    print(table)
    plot_curves(curves, out / "learning_curve.png")
    print(f"wall {time.time() - started:.0f} s -> {out}")
    return 0


def _grouped(rows: list[dict]) -> dict:
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["direction"], r["strategy"], r["k"]), []).append(r)
    return grouped


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = sorted({d for d, _ in curves})
    fig, axes = plt.subplots(1, len(directions), figsize=(5.5 * len(directions), 4), squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        for (d, strategy), points in curves.items():
            if d != direction:
                continue
            points = sorted(points)
            ks, auc, lo, hi = (np.array(v) for v in zip(*points, strict=True))
            ax.plot(np.maximum(ks, 1), auc, marker="o", label=strategy)
            ax.fill_between(np.maximum(ks, 1), lo, hi, alpha=0.15)
        ax.axhline(0.70, color="grey", linestyle=":", label="goal 0.70")
        ax.set(xscale="log", xlabel="frames of the new hospital labelled (0 plotted at 1)", ylabel="macro ROC AUC on the rest", title=direction, ylim=(0.3, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
