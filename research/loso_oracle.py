"""How far could a frozen-feature probe transfer at best? Every setting chosen ON the unseen source.

    python research/loso_oracle.py [--data_dir A B] [--out loso_probes/]

An upper bound, not a recipe: ``loso_probes.py`` chooses C inside the training source, as any real
recipe must; here every combination of one or two feature blocks of the same backbone (Lite0
stages 1-4 and head, VGG19 after each max-pool), two standardisations (over the training source;
each source on its own, a test-time-statistics trick) and eight values of C is fitted on the
training source (loss weighted per class as in training) and scored on the unseen source, and the
best score is reported. If even this cheating choice stays under a goal, no choice of these
settings made honestly can reach it. Uses (and, if missing, fills) ``loso_probes.py``'s feature cache.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside loso_probes.py

from loso_probes import extract  # noqa: E402

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.cv import pooled  # noqa: E402
from thyroid_classifier.data import GroupSpec  # noqa: E402
from thyroid_classifier.loso import source_splits  # noqa: E402
from thyroid_classifier.metrics import macro_auc  # noqa: E402
from thyroid_classifier.weighting import stratum_weights  # noqa: E402

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", nargs="+", default=["../shared/data/ddti/images", "../shared/data/les3bdd/images"])
    p.add_argument("--out", default="loso_probes", help="loso_probes.py's feature cache")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--top", type=int, default=3)
    a = p.parse_args(argv)
    dataset, _ = audited_dataset(a.data_dir, progress=False, validation_size=0.0, test_size=0.0, seed=42, groups=GroupSpec())
    pool = pooled(dataset)
    y, sources = pool.y, np.asarray(pool.sources)
    features = {b: extract(pool.paths, b, a.size, Path(a.out)) for b in ("lite0", "vgg19")}
    blocks = [(b, k) for b in features for k in features[b]]
    combos = [(x,) for x in blocks] + [c for c in itertools.combinations(blocks, 2) if c[0][0] == c[1][0]]
    for held, train, test in source_splits(sources):
        results = []
        for combo in combos:
            x = np.concatenate([features[b][k] for b, k in combo], axis=1)
            for norm in ("training source", "each source"):
                scaler = StandardScaler().fit(x[train])
                xtr = scaler.transform(x[train])
                xte = scaler.transform(x[test]) if norm == "training source" else StandardScaler().fit_transform(x[test])
                for c in C_GRID:
                    clf = LogisticRegression(C=c, max_iter=5000)
                    clf.fit(xtr, y[train], sample_weight=stratum_weights(y[train].tolist(), sources[train].tolist()))
                    auc = macro_auc(y[test], clf.predict_proba(xte))
                    results.append((auc, " + ".join(f"{b} {k}" for b, k in combo), norm, c))
        results.sort(reverse=True)
        aucs = np.array([r[0] for r in results])
        print(f"unseen {held} ({len(test)} frames), {len(results)} probes: best {aucs.max():.3f} (chosen on the unseen source), "
              f"median {np.median(aucs):.3f}, share >= 0.70 {np.mean(aucs >= 0.70):.0%}")
        for auc, combo, norm, c in results[:a.top]:
            print(f"    {auc:.3f}  {combo}, standardised over {norm}, C={c}")


if __name__ == "__main__":
    main()
