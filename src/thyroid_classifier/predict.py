"""The :class:`Predictor` (load a trained model, predict, explain) and the batch prediction CLI.

    python -m thyroid_classifier.predict MODEL IMAGES_DIR --out OUT_DIR

writes ``predictions.csv`` (the project's one prediction schema: path, predicted, one probability column per class,
in-domain score, flag, prediction set, error) and one Grad-CAM
overlay PNG per image. An unreadable file gets its error in the CSV and the run goes on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .explain import freeze, gradcam, linearize_full_kernel_convs, overlay, to_original
from .folder import INFERENCE_FILES, PREDICTIONS, ModelFolder, write_predictions
from .locations import check_hub_model, hub_snapshot, is_local
from .inference import ViewTransform, frame_probabilities, frame_views, view_pixels
from .metrics import frame_mean
from .models import get_spec, guard_features, saved_processor, spec_for_model, target_layer
from .preprocess import Box, ImageError, UltrasoundPreprocessor, looks_like_ultrasound, nodule_square, open_image
from .descriptors import OUTLINE, PREDICTED, DescriptorState, describe, descriptor_logits, one_line, predicted_boxes, read_nodules
from .reliability import Reliability

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One image's result; ``heatmap`` and ``overlay`` are at the size of the image given."""

    probabilities: dict[str, float]
    label: str
    explained: str | None = None  # the class the heatmap explains
    heatmap: np.ndarray | None = None  # float32 (height, width) in [0, 1]
    overlay: np.ndarray | None = None  # uint8 RGB (height, width, 3)
    box: Box | None = None  # the ultrasound region found in the image
    views: list[Box] = field(default_factory=list)  # its views (two for a split screen), averaged
    warnings: list[str] = field(default_factory=list)
    #: how unlike the training images this image is (the guard's score; None: the model has no guard)
    in_domain_score: float | None = None
    #: True when the score is above the guard's threshold: the answer is not reliable
    flagged: bool = False
    #: the prediction set under the answer's regime (every class that cannot be ruled out at the model's level)
    prediction_set: list[str] = field(default_factory=list)
    #: what every face headlines (:mod:`answer_rule`): the label only when ``headlined``; else "Not reliable",
    #: "A or B: cannot tell" or "Cannot tell"
    headline: str = ""
    headlined: bool = False
    #: one line: why this headline, and where its promise was measured
    reason: str = ""
    #: ``unseen`` (the frame's source was not said: a source the model never saw) or ``in_source``
    regime: str = "unseen"
    #: the TI-RADS descriptor heads' answer (:func:`descriptors.describe`: each descriptor's probabilities by
    #: ACR term and most likely term, the expected points and level); None when the model has no heads
    descriptors: dict | None = None
    #: the nodule box (left, top, right, bottom in the image's pixels) the descriptors were read from: the one given, or
    #: the one the model's outline head predicted (``descriptors["read_from"]`` says which); None: the whole frame
    nodule_box: tuple[float, float, float, float] | None = None

    @property
    def reliable(self) -> bool:
        """The answer headlines a label (the one rule: not flagged, a single-class set, confident enough for its regime)."""
        return self.headlined


class Predictor:
    """A trained model with its preprocessing, Grad-CAM layer and calibration, ready to predict."""

    def __init__(self, model, processor, preprocessor: UltrasoundPreprocessor, *, temperature: float = 1.0, logit_scale: float = 1.0,
                 info: dict | None = None, source: str = "", reliability: Reliability | None = None) -> None:
        self.model = linearize_full_kernel_convs(freeze(model))
        self.processor = processor
        self.preprocessor = preprocessor
        #: the calibration temperature, applied to a frame's logits (1: uncalibrated)
        self.temperature = float(temperature)
        #: the model's logits times this are the trained model's (a folder with the temperature in its
        #: weights gives logits / T): a split screen's views are averaged on those, as in training
        self.logit_scale = float(logit_scale)
        self.info = info or {}
        self.source = source
        #: the model's files: the local folder, or the Hub snapshot of its inference files (None: not found)
        self.folder: Path | None = None
        self.reliability = reliability or Reliability()
        #: the TI-RADS descriptor heads and what they measured (None: the model has none)
        self.descriptors: DescriptorState | None = None
        spec = spec_for_model(model) or get_spec(source or "model")
        self.layer = target_layer(model, spec)
        self.labels: list[str] = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | None = None, calibrated: bool = True) -> Predictor:
        """Load a model folder or Hub id (safetensors weights only; never remote code)."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        local = is_local(name_or_path)
        local_only = False if local else check_hub_model(name_or_path, what_to_do="Pass a local model folder instead (e.g. one written by train.py).")
        kwargs = {"local_files_only": local_only or local}
        model = AutoModelForImageClassification.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
        # Prediction must see exactly what training and evaluation saw: the folder's own preprocessor_config.json.
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs, **saved_processor(name_or_path))
        folder = Path(name_or_path) if local else _hub_folder(name_or_path, local_only)
        preprocessor = UltrasoundPreprocessor.from_pretrained(folder) if folder else UltrasoundPreprocessor(crop=False)
        info = ModelFolder(folder).metrics() if folder else {}
        # Folders written since the temperature went into the weights (for pipeline() users) say so; the
        # Predictor scales the logits back and applies T itself after averaging a frame's views, as training did.
        fitted = float(getattr(model.config, "calibration_temperature", None) or 1.0)
        logit_scale = fitted if getattr(model.config, "temperature_in_weights", False) else 1.0
        if device:
            model.to(device)
        # The prediction sets were calibrated on calibrated probabilities: uncalibrated output gets
        # none (their level would not hold).
        reliability = Reliability.from_pretrained(folder)
        if not calibrated:
            reliability.conformal, reliability.regimes = None, {}
        predictor = cls(model, processor, preprocessor, temperature=fitted if calibrated else 1.0, logit_scale=logit_scale, info=info,
                        source=name_or_path, reliability=reliability)
        predictor.folder = folder
        predictor.descriptors = DescriptorState.from_pretrained(folder)
        if predictor.descriptors is not None and device:
            predictor.descriptors.heads.to(device)
        return predictor

    @property
    def training_sources(self) -> list[str]:
        """The sources a person may say a frame comes from (the in-source regime)."""
        return list(self.reliability.training_sources)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, images: Sequence[Image.Image], view_transform: ViewTransform | None = None) -> tuple[torch.Tensor, list[Box], np.ndarray]:
        """Stages 2-4 of the one inference path (:mod:`inference`, the same as evaluation in training):
        the views' pixels, each view's box in its image, and the image each view belongs to."""
        views, boxes, owner = frame_views(images, self.preprocessor, view_transform)
        return view_pixels(self.processor, views).to(self.device), boxes, owner

    @property
    def calibrated(self) -> bool:
        return self.temperature != 1.0

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The trained model's logits (before calibration) of each view."""
        return self.model(pixel_values=pixel_values).logits * self.logit_scale

    def predict(
        self,
        images: Sequence[Image.Image | str | Path | bytes],
        *,
        explain: bool = True,
        target: str | None = None,
        opacity: float | None = 0.45,
        view_transform: ViewTransform | None = None,
        source: str | None = None,
        nodule_boxes: Sequence[Sequence[float] | None] | None = None,
        outline: bool = True,
    ) -> list[Prediction]:
        """Probabilities (calibrated when the model carries a temperature; a split screen's views
        averaged) and, with ``explain``, Grad-CAM of each view mapped back onto each image as given.
        ``view_transform`` changes each view before it is normalised (stage 3 of :mod:`inference`).
        ``source``: where the images come from, when known: one of :attr:`training_sources` (the answer
        is decided by the in-source regime); None, the default, for any other source (the unseen regime).
        ``nodule_boxes``: per image, the nodule's box (left, top, right, bottom in its pixels) or None; the TI-RADS
        descriptor heads read a boxed image's nodule (one more pass, on the square around it) instead of the whole frame.
        Without a box, a model with an outline head reads the nodule it predicts (``outline=False``: the whole frame)."""
        regime = self.reliability.regime_for(source)  # a wrong name fails before any work
        pil = [image if isinstance(image, Image.Image) else open_image(image) for image in images]
        boxed = self._boxed(pil, nodule_boxes)  # a bad box fails before any work
        pixels, boxes, owner = self.prepare(pil, view_transform)
        fixed = None if target is None else self.labels.index(target)
        maps = None
        heads = self.descriptors.heads if self.descriptors is not None else None
        with guard_features(self.model) as captured, descriptor_logits(self.model, heads) as described:  # the same pass
            if explain and (fixed is not None or len(owner) == len(pil)):
                # One view per image, or a given class: scores and maps from one forward pass.
                result = gradcam(self.model, self.layer, pixels, None if fixed is None else [fixed] * len(owner))
                view_logits, maps = result.logits.float().cpu().numpy() * self.logit_scale, result.maps
            else:
                view_logits = self.logits(pixels).float().cpu().numpy()
        probs = frame_probabilities(view_logits, owner, len(pil), self.temperature)
        guard_scores = self._guard_scores(captured, owner, len(pil))
        read_boxes: list = [None] * len(pil)
        if described:
            outlined = self._predicted_boxes(described[0], boxes, owner, pil) if outline else [None] * len(pil)
            described = describe({name: frame_mean(described[0][name].detach().double().cpu().numpy(), owner, len(pil)) for name in heads.names})
            # A box given wins; else the outline head's (a model with one); else the whole frame (already read).
            read_boxes = [(tuple(nodule_boxes[i]), "nodule") if i in boxed else (outlined[i], PREDICTED) if outlined[i] else None for i in range(len(pil))]
            todo = [i for i, r in enumerate(read_boxes) if r is not None]
            if todo:
                logits = read_nodules(self.model, heads, self.processor, [pil[i] for i in todo], [read_boxes[i][0] for i in todo])
                for k, i in enumerate(todo):
                    described[i] = describe({name: v[k:k + 1] for name, v in logits.items()}, read_from=read_boxes[i][1])[0]
        else:
            described = None
        chosen = [fixed if fixed is not None else int(np.argmax(probs[i])) for i in range(len(pil))]
        if explain and maps is None:
            # Every view of a split screen explains the image's class (alone, its views may disagree).
            maps = gradcam(self.model, self.layer, pixels, [chosen[i] for i in owner]).maps
        out = []
        for i, image in enumerate(pil):
            mine = np.flatnonzero(owner == i)
            mine_boxes = [boxes[j] for j in mine]
            region = (min(b[0] for b in mine_boxes), min(b[1] for b in mine_boxes), max(b[2] for b in mine_boxes), max(b[3] for b in mine_boxes))
            p = {label: float(probs[i, k]) for k, label in enumerate(self.labels)}
            prediction = Prediction(probabilities=p, label=max(p, key=p.get), box=region, views=mine_boxes)
            if maps is not None:
                prediction.explained = self.labels[chosen[i]]
                # Each view's map is scaled on its own (Grad-CAM's [0, 1]); views do not overlap.
                prediction.heatmap = np.maximum.reduce([to_original(maps[j], boxes[j], image.size) for j in mine])
                if opacity is not None:  # None: the caller draws its own overlay (the app, at display size)
                    prediction.overlay = overlay(image, prediction.heatmap, opacity)
            if guard_scores is not None:
                prediction.in_domain_score = float(guard_scores[i])
                prediction.flagged = bool(guard_scores[i] > self.reliability.guard.threshold)
            if described is not None:
                prediction.descriptors = described[i]
                prediction.nodule_box = read_boxes[i][0] if read_boxes[i] else None
            answer = self.reliability.answer(probs[i], self.labels, prediction.flagged, regime)
            prediction.prediction_set, prediction.headline, prediction.headlined = answer.prediction_set, answer.headline, answer.headlined
            prediction.reason, prediction.regime = answer.reason, answer.regime
            if nodule_boxes is not None and nodule_boxes[i] is not None and self.descriptors is None:
                prediction.warnings.append("This model has no TI-RADS descriptor heads: the nodule box was not used (the class and the heatmap always read the whole frame).")
            if not looks_like_ultrasound(image):
                prediction.warnings.append("This image has colour content and may not be a grey-scale ultrasound frame; the result is meaningless for other images.")
            out.append(prediction)
        return out

    def _boxed(self, images: Sequence[Image.Image], nodule_boxes: Sequence[Sequence[float] | None] | None) -> list[int]:
        """The images that come with a nodule box, each box checked against its image (ValueError naming the problem)."""
        if nodule_boxes is None:
            return []
        if len(nodule_boxes) != len(images):
            raise ValueError(f"{len(nodule_boxes)} nodule boxes for {len(images)} images: give one per image (None for none)")
        boxed = [i for i, box in enumerate(nodule_boxes) if box is not None]
        for i in boxed:
            nodule_square(nodule_boxes[i], images[i].size)
        return boxed if self.descriptors is not None else []  # only the descriptor heads read a box

    def _predicted_boxes(self, captured: dict, boxes: list[Box], owner: np.ndarray, images: Sequence[Image.Image]) -> list:
        """Per image, the nodule box its outline head predicts, or None (no outline head, or nothing found)."""
        if OUTLINE not in captured:
            return [None] * len(images)
        cells = torch.sigmoid(captured[OUTLINE].detach().float())[:, 0].cpu().numpy()
        found = predicted_boxes(cells, boxes, owner, [image.size for image in images])
        return [None if np.isnan(row).any() else tuple(float(v) for v in row) for row in found]

    def _guard_scores(self, captured: list[torch.Tensor], owner: np.ndarray, n: int) -> np.ndarray | None:
        """Each image's guard score from its views' pooled features (their mean, as in training)."""
        guard = self.reliability.guard
        if guard is None or not captured:
            return None
        features = torch.cat(captured[:1]).numpy().astype(np.float64)  # the first pass: the one that scored
        if len(features) != len(owner):
            return None
        return guard.score(frame_mean(features, owner, n))


def _hub_folder(repo_id: str, local_only: bool) -> Path | None:
    """The snapshot folder of a Hub model (for its preprocessing settings and metrics), if any."""
    try:
        return hub_snapshot(repo_id, list(INFERENCE_FILES), local_only)
    except Exception as exc:  # noqa: BLE001 - the model itself loaded; these files are optional
        logger.warning("%s: no preprocessing settings found (%s); using none", repo_id, exc)
        return None


# --------------------------------------------------------------------------------------------
# Batch CLI


def list_files(folder: Path) -> list[Path]:
    """Every visible file below ``folder`` (non-images included: they get an error row)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


#: The columns of a nodule box file (``--nodule_boxes``): an image's path below the folder, and its box in its pixels.
BOX_COLUMNS = ("path", "left", "top", "right", "bottom")


def read_box_file(path: Path) -> dict[str, tuple[float, float, float, float]]:
    """A nodule box file: CSV with the header ``path,left,top,right,bottom`` (``path`` relative to the image folder).
    Raises ValueError naming the file and line for a missing column, a number that is not one, or a path given twice."""
    import csv

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: a nodule box file needs the columns {', '.join(BOX_COLUMNS)} (missing: {', '.join(missing)})")
        boxes: dict[str, tuple[float, float, float, float]] = {}
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            try:
                box = tuple(float(row[c]) for c in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: left, top, right and bottom are numbers (the box in the image's pixels)") from None
            key = Path(row["path"]).as_posix()
            if key in boxes:
                raise ValueError(f"{where}: {key} has a box already (one box per image)")
            boxes[key] = box
    return boxes


def predict_folder(predictor: Predictor, images_dir: Path, out_dir: Path, batch_size: int = 8, heatmaps: bool = True, progress: bool = True,
                   source: str | None = None, nodule_boxes: dict[str, Sequence[float]] | None = None) -> Path:
    """Predict every file of ``images_dir`` (from ``source``, when known: see :meth:`Predictor.predict`);
    write ``predictions.csv`` and overlays to ``out_dir``. ``nodule_boxes``: an image's path below ``images_dir`` →
    its nodule box (:func:`read_box_file`); the descriptor heads read those images' nodules, and a box that does not
    fit its image is that image's error (the others go on)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    overlays = out_dir / "overlays"
    if heatmaps:
        overlays.mkdir(exist_ok=True)
    files = list_files(images_dir)
    nodule_boxes = nodule_boxes or {}
    unknown = set(nodule_boxes) - {f.relative_to(images_dir).as_posix() for f in files}
    if unknown:
        logger.warning("%d nodule box(es) name no file of %s, e.g. %s", len(unknown), images_dir, sorted(unknown)[0])
    rows: list[dict] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        good: list[tuple[Path, Image.Image]] = []
        for path in chunk:
            rel = path.relative_to(images_dir).as_posix()
            try:
                image = open_image(path, name=rel)
                if rel in nodule_boxes:
                    nodule_square(nodule_boxes[rel], image.size)  # a box that does not fit is this image's error
                good.append((path, image))
            except ImageError as exc:
                rows.append({"path": rel, "error": str(exc)})
            except ValueError as exc:
                rows.append({"path": rel, "error": f"{rel}: {exc}"})
        if good:
            given = [nodule_boxes.get(path.relative_to(images_dir).as_posix()) for path, _ in good]
            results = predictor.predict([img for _, img in good], explain=heatmaps, source=source, nodule_boxes=given if any(given) else None)
            for (path, _), result in zip(good, results, strict=True):
                rel = path.relative_to(images_dir)
                rows.append({"path": rel.as_posix(), "predicted": result.label, "probs": [result.probabilities[label] for label in predictor.labels],
                             "in_domain_score": result.in_domain_score, "flagged": result.flagged, "prediction_set": result.prediction_set,
                             "answer": result.headline, "headlined": result.headlined,
                             "tirads_descriptors": one_line(result.descriptors, result.nodule_box)})
                if heatmaps:
                    target = overlays / rel.with_suffix(".png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(result.overlay).save(target)
        bar.update(len(chunk))
    bar.close()
    # The project's one prediction schema (folder.PREDICTION_COLUMNS): no true label here.
    csv_path = write_predictions(out_dir / PREDICTIONS, predictor.labels, rows)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m thyroid_classifier.predict",
        description="Predict every image of a folder with a trained model; write predictions.csv and Grad-CAM overlays. Research use only, not a diagnosis.",
    )
    parser.add_argument("model", help="a model folder written by train.py, or a Hub id")
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_heatmaps", action="store_true", help="probabilities only (faster)")
    parser.add_argument("--uncalibrated", action="store_true", help="ignore the temperature fitted on validation (and so the prediction sets and headlines)")
    parser.add_argument("--nodule_boxes", type=Path, default=None, help="a CSV of nodule boxes (columns path,left,top,right,bottom; path below "
                        "IMAGES_DIR, the box in the image's pixels): a model with TI-RADS descriptor heads reads those images' descriptors from "
                        "the nodule (the class and the heatmap always read the whole frame)")
    parser.add_argument("--source", default=None, help="the images come from this training source of the model (its in-source answers); "
                        "leave out for any other source")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.images_dir.is_dir():
        print(f"error: image folder not found: {args.images_dir}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.from_pretrained(args.model, calibrated=not args.uncalibrated)
    except Exception as exc:  # noqa: BLE001 - a clear one-line reason, not a stack trace
        print(f"error: cannot load model {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        predictor.reliability.regime_for(args.source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        boxes = read_box_file(args.nodule_boxes) if args.nodule_boxes else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if boxes and predictor.descriptors is None:
        print(f"warning: {args.model} has no TI-RADS descriptor heads: the nodule boxes are not used", file=sys.stderr)
    path = predict_folder(predictor, args.images_dir, args.out, args.batch_size, heatmaps=not args.no_heatmaps, source=args.source, nodule_boxes=boxes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
