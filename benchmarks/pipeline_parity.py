"""Does a Hub user's ``pipeline("image-classification")`` answer as the app (the Predictor) does?

    python benchmarks/pipeline_parity.py MODEL [MODEL ...] --images ../shared/data/ddti/images [--limit N]

For every image (full scanner frames, borders and text included) and each model folder, compares the
Predictor's probabilities (explain off) with

- ``after``: ``pipeline(..., trust_remote_code=True)``: the folder's ``UltrasoundImageProcessor`` crops
  first, and the calibration temperature is in the weights;
- ``plain``: ``pipeline(...)`` without the flag: the plain processor (no crop), temperature in the weights;
- ``before``: what a folder written before both changes gave through ``pipeline``: no crop and no
  temperature (computed exactly from ``plain`` by undoing the folded temperature: softmax(log p * T)).

Prints, per model and path: top label identical to the Predictor's (%), median and max |delta p|, and the
time per image of the Predictor and of the pipeline (one image per call, as the app and a Hub user call them;
the same process, alternating, after a warm-up). Goals (issue 17): 100% identical, max |delta p| <= 0.01,
pipeline time <= 1.1x the Predictor's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _probs(answer: list[dict] | dict, labels: list[str]) -> list[float]:
    scores = answer["scores"] if isinstance(answer, dict) else answer  # the folder's pipeline answers with a dict
    return [next(d["score"] for d in scores if d["label"] == label) for label in labels]


def compare(model: str, files: list[Path]) -> dict:
    from PIL import Image
    from transformers import pipeline

    from thyroid_classifier.predict import Predictor

    predictor = Predictor.from_pretrained(model)
    labels, fitted = predictor.labels, float(getattr(predictor.model.config, "calibration_temperature", 1.0) or 1.0)
    folded = bool(getattr(predictor.model.config, "temperature_in_weights", False))
    from transformers import ImageClassificationPipeline

    # The plain pipeline class, asked for by name (a folder that ships its own pipeline needs remote code otherwise).
    plain = pipeline("image-classification", model=model, pipeline_class=ImageClassificationPipeline)
    # A folder written before the processor shipped has no remote code: only "before" can be measured.
    after = pipeline("image-classification", model=model, trust_remote_code=True) if (Path(model) / "ultrasound_processor.py").is_file() else None
    k = len(labels)
    frames = [Image.open(f).convert("RGB") for f in files]
    timed = after or plain
    for frame in frames[:3]:  # warm-up
        predictor.predict([frame], explain=False), timed(frame, top_k=k)
    ref, got, flat, t_pred, t_pipe = [], [], [], [], []
    for frame in frames:
        start = time.perf_counter()
        result = predictor.predict([frame], explain=False)[0]
        t_pred.append(time.perf_counter() - start)
        start = time.perf_counter()
        answer = timed(frame, top_k=k)
        t_pipe.append(time.perf_counter() - start)
        ref.append([result.probabilities[label] for label in labels])
        if after is not None:
            got.append(_probs(answer, labels))
        flat.append(_probs(plain(frame, top_k=k), labels))
    ref, got, flat = np.asarray(ref), np.asarray(got), np.asarray(flat)
    old = flat
    if folded:  # undo the folded temperature: what the same folder gave before the temperature went into the weights
        logp = np.log(np.clip(flat, 1e-12, None)) * fitted
        old = np.exp(logp - logp.max(1, keepdims=True))
        old /= old.sum(1, keepdims=True)

    def row(p: np.ndarray) -> dict:
        delta = np.abs(p - ref).max(1)
        return {"same_top_label": float((p.argmax(1) == ref.argmax(1)).mean()), "median_abs_dp": float(np.median(delta)), "max_abs_dp": float(delta.max())}

    return {"model": model, "n": len(frames), "temperature": fitted, "before": row(old), "plain": row(flat) if folded else None,
            "after": row(got) if after is not None else None, "timed": "pipeline (trust_remote_code)" if after is not None else "pipeline (plain)",
            "predictor_ms": 1000 * float(np.median(t_pred)), "pipeline_ms": 1000 * float(np.median(t_pipe)),
            "time_ratio": float(np.median(t_pipe) / np.median(t_pred))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders written by train.py (or Hub ids)")
    parser.add_argument("--images", type=Path, required=True, help="a folder of frames (searched recursively)")
    parser.add_argument("--limit", type=int, default=None, help="the first N images only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))[: args.limit]
    if not files:
        print(f"error: no images under {args.images}", file=sys.stderr)
        return 2
    rows = [compare(model, files) for model in args.models]
    print(f"{'model':40s} {'path':7s} {'same label':>10s} {'median |dp|':>11s} {'max |dp|':>9s}")
    for r in rows:
        for path in ("before", "plain", "after"):
            p = r[path]
            if p is None:
                continue
            print(f"{Path(r['model']).name:40s} {path:7s} {p['same_top_label']:10.1%} {p['median_abs_dp']:11.2e} {p['max_abs_dp']:9.2e}")
        print(f"{'':40s} {r['n']} images, T = {r['temperature']:.3f}; Predictor {r['predictor_ms']:.1f} ms/image, "
              f"{r['timed']} {r['pipeline_ms']:.1f} ms/image ({r['time_ratio']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
