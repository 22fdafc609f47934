"""How many frames must a new hospital label to adapt the public model? The fine-tuned learning curve.

    python benchmarks/adapt_curve.py --start les3bdd=MODEL_TRAINED_ON_DDTI ddti=MODEL_TRAINED_ON_LES3BDD \
        [--k 8 16 32 64 128] [--draws 3] [--out adapt_curve/]

Each ``SITE=MODEL`` is one leave-one-source-out direction: MODEL (a folder ``train.py`` wrote, never
trained on SITE) is the public model, SITE (one of ``--data_dir``'s sources) the new hospital. For each
k, whole patients of the site are drawn at random within each class until k frames are labelled (as
``learning_curve.py`` draws them; 3 draws), and the product's own command adapts the model to them:

    train.py --model MODEL --data_dir SITE_FOLDER   (SITE_FOLDER/train: the k frames, SITE_FOLDER/test: the rest)

with the recipe's defaults (a quarter of the k frames' patients held out to calibrate: temperature,
sets, guard). k = 0 is the public model as it is, scored by ``evaluate`` on the same frames. Reported:
macro ROC AUC on the rest of the site (95% interval over its patients) and the paired difference
against k = 0 on the same frames. Writes ``adapt_curve.json``, ``adapt_curve.md``, ``adapt_curve.png``.
Run with ``OMP_NUM_THREADS=1`` beside other work: each adaptation takes about 0.15 s a training frame
and epoch on one core of this CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import draw, plot_curves

from thyroid_classifier.adaptation import StartingModel
from thyroid_classifier.audit import audited_dataset
from thyroid_classifier.compare import read_predictions
from thyroid_classifier.cv import pooled
from thyroid_classifier.data import GroupSpec
from thyroid_classifier.evaluate import main as evaluate_main
from thyroid_classifier.metrics import bootstrap_intervals, macro_auc, paired_difference
from thyroid_classifier.models import get_spec
from thyroid_classifier.training import main as train_main

STRATEGY = "adapt the public model (fine-tuned, the site alone)"
IMAGENET = "the site's k alone, fine-tuned from ImageNet"


def read_probs(path: Path, labels: list[str]) -> dict[str, np.ndarray]:
    """A prediction file's probabilities by resolved image path (read and checked by ``compare``'s reader)."""
    predictions = read_predictions(path)
    if predictions.classes != labels:
        raise SystemExit(f"{path}: classes {predictions.classes}, expected {labels}")
    return {str(Path(p).resolve()): probs for p, (_, _, probs) in predictions.rows.items()}


def site_folder(root: Path, rows: dict[str, np.ndarray], paths: np.ndarray, y: np.ndarray, groups: np.ndarray, labels: list[str]) -> Path:
    """``root/{train,test}/<class>/`` (``root/<class>/`` for the split "") as links to the site's frames, and a manifest of their patients."""
    root.mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "case"])
        for split, idx in rows.items():
            for i in idx:
                link = root / split / labels[y[i]] / f"{i}_{Path(paths[i]).name}"  # split "": no split folder
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(paths[i]).resolve())
                writer.writerow([link.relative_to(root).as_posix(), groups[i]])
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", nargs="+", default=[], help="SITE=MODEL_FOLDER: adapt MODEL_FOLDER (never trained on SITE) to SITE")
    p.add_argument("--data_dir", nargs="+", default=["../shared/data/ddti/images", "../shared/data/les3bdd/images"])
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train_flags", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every adaptation (last)")
    p.add_argument("--imagenet", default=None, help="also train the site's k frames alone from this ImageNet checkpoint "
                   "(e.g. ../shared/models/efficientnet_lite0-imagenet), the public model's architecture: the second strategy")
    p.add_argument("--skip_adapt", action="store_true", help="only the --imagenet strategy (e.g. beside a running adapt curve)")
    p.add_argument("--merge", nargs="+", default=None, help="only write the table and plot of these adapt_curve.json files into --out")
    p.add_argument("--keep", action="store_true", help="keep each adapted model folder under OUT/runs/ (else deleted once scored)")
    p.add_argument("--out", default="adapt_curve")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        write_table([r for f in a.merge for r in json.loads(Path(f).read_text())], out)
        return 0
    started = time.time()
    dataset, _ = audited_dataset(a.data_dir, progress=False, validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    pool = pooled(dataset)
    y, labels, groups, sources = np.asarray(pool.y), list(pool.labels), np.asarray(pool.groups), np.asarray(pool.sources)
    paths = np.asarray([str(Path(q).resolve()) for q in pool.paths])
    rows_out = json.loads((out / "adapt_curve.json").read_text()) if (out / "adapt_curve.json").is_file() else []
    done = {(r["direction"], r.get("strategy", STRATEGY), r["k"], r["draw"]) for r in rows_out}
    strategies = {**({} if a.skip_adapt else {STRATEGY: None}), **({IMAGENET: a.imagenet} if a.imagenet else {})}
    work = Path(tempfile.mkdtemp(prefix="adapt_curve_"))
    for pair in a.start:
        site, model = pair.split("=", 1)
        start = StartingModel.read(model)
        if start is None:
            raise SystemExit(f"{model}: not a model folder written by train.py")
        if site in start.training_sources:
            raise SystemExit(f"{model} was trained on {site}: it is not a new hospital for it")
        if start.labels != labels:
            raise SystemExit(f"{model}: labels {start.labels}, the data's {labels}")
        site_rows = np.flatnonzero(sources == site)
        direction = f"{'+'.join(start.training_sources)} -> {site}"
        # k = 0: the public model as it is, on every frame of the site (the product's evaluate).
        zero = out / f"k0_{site}"
        if not (zero / "predictions.csv").is_file():
            data = site_folder(work / f"k0_{site}", {"": site_rows}, paths, y, groups, labels)
            evaluate_main([model, str(data), "--out", str(zero), "--bootstrap", "50", "--quiet"])
        base = read_probs(zero / "predictions.csv", labels)
        print(f"{direction}: {len(site_rows)} frames; k = 0 scored in {time.time() - started:.0f} s", flush=True)
        for k, d, (strategy, checkpoint) in ((k, d, sc) for k in a.k for d in range(a.draws) for sc in strategies.items()):
            if (direction, strategy, k, d) in done:
                continue
            rng = np.random.default_rng([a.seed, k, d])
            labelled = site_rows[draw(y[site_rows], groups[site_rows], k, rng)]
            rest = np.setdiff1d(site_rows, labelled)
            rest = rest[~np.isin(groups[rest], groups[labelled])]  # no patient on both sides
            name = f"{site}_k{k}_d{d}" + ("_imagenet" if checkpoint else "")
            # Named after the site (work/<run>/<site>/): the run knows the data set by its folder's name, as a user's would be.
            data = site_folder(work / name / site, {"train": labelled, "test": rest}, paths, y, groups, labels)
            # A quarter of the labelled frames calibrate (validation_size is a share of all the folder's frames).
            share = 0.25 * len(labelled) / (len(labelled) + len(rest))
            t0 = time.time()
            code = train_main(["--model", checkpoint or model, "--data_dir", str(data), "--source_names", site, "--output_dir", str(work / f"run_{name}"),
                                  "--validation_size", f"{share:.6f}", "--seed", str(a.seed + d), "--disable_tqdm", "true",
                                  "--bootstrap_resamples", "50", "--save_total_limit", "1", *a.train_flags])
            seconds = time.time() - t0
            if code != 0:
                print(f"  {name}: train.py exited {code}", flush=True)
                continue
            folder = work / f"run_{name}" / (get_spec(checkpoint).name if checkpoint else start.spec().name)
            probs_by_path = read_probs(folder / "predictions_test.csv", labels)
            metrics = json.loads((folder / "metrics.json").read_text())
            test = [i for i in rest if paths[i] in probs_by_path]
            pr = np.stack([probs_by_path[paths[i]] for i in test])
            b = np.stack([base[paths[i]] for i in test])
            yt, gt = y[test], groups[test].tolist()
            ci = bootstrap_intervals(yt.tolist(), pr, labels, groups=gt, n_resamples=a.resamples, seed=a.seed)["roc_auc"]
            diff = paired_difference(yt, b, pr, gt, n_resamples=a.resamples, seed=a.seed)["roc_auc"]
            counts = metrics["data"]["counts"]
            site_counts = (metrics.get("adapted_from") or {}).get("sites", {}).get(site) or {
                "train": sum(counts["train"].values()), "validation": sum(counts["validation"].values())}
            row = {"direction": direction, "strategy": strategy, "k": k, "draw": d, "labelled": len(labelled),
                   "trained_on": site_counts.get("train"), "calibrated_on": site_counts.get("validation"), "n_test": len(test),
                   "auc": macro_auc(yt, pr), "ci": ci, "k0_auc": macro_auc(yt, b), "vs_k0": diff["difference"], "vs_k0_ci": diff["ci"],
                   "seconds": round(seconds, 1)}
            rows_out.append(row)
            print(f"  {strategy}: k={k} draw {d}: {row['labelled']} labelled ({row['trained_on']} train / {row['calibrated_on']} calibrate), "
                  f"AUC {row['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] on {len(test)}, k=0 {row['k0_auc']:.3f}, "
                  f"diff {diff['difference']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}], {seconds:.0f} s", flush=True)
            (out / "adapt_curve.json").write_text(json.dumps(rows_out, indent=1) + "\n")  # a long run can be resumed
            if a.keep:
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
                (out / "runs").mkdir(exist_ok=True)
                shutil.move(str(folder), str(out / "runs" / name))
            shutil.rmtree(work / f"run_{name}", ignore_errors=True)
    write_table(rows_out, out)
    print(f"wall {time.time() - started:.0f} s -> {out}")
    return 0


def write_table(rows: list[dict], out: Path) -> None:
    lines = ["| direction | strategy | k (frames labelled, mean) | train / calibrate (mean) | macro AUC on the rest (mean of draws) | lowest 95% lower bound "
             "| k = 0 on the same frames (mean) | vs k = 0 (mean) [lowest, highest bound] | draws | minutes per run (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict = {}
    grouped: dict = {}
    for r in rows:
        grouped.setdefault((r["direction"], r.get("strategy", STRATEGY), r["k"]), []).append(r)
    for (direction, strategy, k), group in sorted(grouped.items()):
        mean = lambda key: float(np.mean([r[key] for r in group]))
        curves.setdefault((direction, strategy), []).append((mean("labelled"), mean("auc"), min(r["auc"] for r in group), max(r["auc"] for r in group)))
        lines.append(f"| {direction} | {strategy} | {k} ({mean('labelled'):.0f}) | {mean('trained_on'):.0f} / {mean('calibrated_on'):.0f} | {mean('auc'):.3f} | "
                     f"{min(r['ci'][0] for r in group):.3f} | {mean('k0_auc'):.3f} | {mean('vs_k0'):+.3f} "
                     f"[{min(r['vs_k0_ci'][0] for r in group):+.3f}, {max(r['vs_k0_ci'][1] for r in group):+.3f}] | {len(group)} | {mean('seconds') / 60:.1f} |")
    for direction in {r["direction"] for r in rows}:
        k0 = [r["k0_auc"] for r in rows if r["direction"] == direction]
        curves.setdefault((direction, "the public model as it is (k = 0)"), []).append((0, float(np.mean(k0)), min(k0), max(k0)))
    table = "\n".join(lines)
    (out / "adapt_curve.md").write_text(table + "\n")
    print(table)
    if rows:
        plot_curves(curves, out / "adapt_curve.png")


if __name__ == "__main__":
    raise SystemExit(main())
