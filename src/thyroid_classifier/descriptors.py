"""TI-RADS descriptors beside the class head: what a radiologist would say of the nodule.

One small linear head per descriptor (composition, echogenicity, margins, echogenic foci) reads the
same pooled features as the class head, in the same forward pass (a pre-hook on the class head
captures its input: no second pass, Grad-CAM and the guard unchanged). The classes are the ACR
TI-RADS lexicon's terms that DDTI's radiologists used (:data:`known_data.ACR_LEXICON`), ordered by
their points; a frame whose case file lacks a descriptor has it *missing* (the loss skips it), never
a class of its own. Sources without case files (LES3BDD, a user's folder) train the class head only.

The descriptor route to the risk: ACR points expected under each head's probabilities, summed, and
the TI-RADS level they reach. DDTI records no shape ("taller than wide", 3 points): the sum is out of
10 of ACR's 13 here, and the level is what these four descriptors alone imply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .answer_rule import tirads_level
from .answer_text import PREDICTED
from .folder_files import DESCRIPTOR_CONFIG, DESCRIPTOR_HEADS
from .inference import frame_views, view_pixels
from .known_data import ACR_LEXICON, DESCRIPTORS, case_files, frame_descriptors, frame_outline, outline_box
from .metrics import group_resamples, softmax
from .models import classifier_head, target_layer
from .preprocess import Box, nodule_view
from .ultrasound_crop import located_box

MISSING = -1
#: The key of the outline head's logits (one map per image, the Grad-CAM layer's grid) in :func:`descriptor_logits`' dicts.
OUTLINE = "outline"
#: What the heads learn from (``--descriptor_view``): the whole frame (in the class head's own pass), the nodule's square
#: (cut around the radiologist's outline, :func:`preprocess.nodule_view`), or both as two views of each frame.
VIEWS = ("frame", "nodule", "both")


def _classes(name: str) -> list[tuple[str, int]]:
    terms = {term for term in ACR_LEXICON[name].values() if term is not None}
    return sorted(terms, key=lambda t: (t[1], t[0]))


#: Each descriptor's classes (ACR term, points), fewest points first.
CLASSES: dict[str, list[tuple[str, int]]] = {name: _classes(name) for name in DESCRIPTORS}


def class_index(name: str, word: str | None) -> int:
    """The head's class of one of DDTI's (normalised) words; :data:`MISSING` when missing or not an ACR term."""
    term = ACR_LEXICON[name].get(word) if word is not None else None
    return MISSING if term is None else CLASSES[name].index(term)


def _with_case_files(paths: Sequence[str], sources: Sequence[str], folders: Mapping[str, str], default_folder: str) -> Iterator[tuple[int, str, Path]]:
    """``(row, path, case files' folder)`` of each frame whose source has case files (``folders``: source name → data folder)."""
    xml_dirs: dict[str, Path | None] = {}
    for i, (path, source) in enumerate(zip(paths, sources, strict=True)):
        folder = folders.get(source, default_folder)
        if folder not in xml_dirs:
            xml_dirs[folder] = case_files(folder) if folder else None
        if xml_dirs[folder] is not None:
            yield i, path, xml_dirs[folder]


def frame_labels(paths: Sequence[str], sources: Sequence[str], folders: Mapping[str, str], default_folder: str = "") -> np.ndarray:
    """Each frame's descriptor classes, (n, len(DESCRIPTORS)), :data:`MISSING` where its case file does not
    give one or its source has no case files (``folders``: source name → data folder)."""
    out = np.full((len(paths), len(DESCRIPTORS)), MISSING, dtype=np.int64)
    for i, path, xml_dir in _with_case_files(paths, sources, folders, default_folder):
        words = frame_descriptors(path, xml_dir)
        if words:
            out[i] = [class_index(name, words.get(name)) for name in DESCRIPTORS]
    return out


def frame_nodule_boxes(paths: Sequence[str], sources: Sequence[str], folders: Mapping[str, str], default_folder: str = "") -> np.ndarray:
    """Each frame's nodule box (left, top, right, bottom; the box around the radiologist's outline), (n, 4), NaN
    where its case file has no outline of it or its source has no case files."""
    out = np.full((len(paths), 4), np.nan)
    for i, path, xml_dir in _with_case_files(paths, sources, folders, default_folder):
        polygons = frame_outline(path, xml_dir)
        if polygons:
            out[i] = outline_box(polygons)
    return out


def frame_outlines(paths: Sequence[str], sources: Sequence[str], folders: Mapping[str, str], default_folder: str = "") -> list[list[list[float]]]:
    """Each frame's radiologist's outline as flat polygons (``[x0, y0, x1, y1, ...]`` each, in its pixels; a dataset column),
    ``[]`` where its case file has none or its source has no case files."""
    out: list[list[list[float]]] = [[] for _ in paths]
    for i, path, xml_dir in _with_case_files(paths, sources, folders, default_folder):
        out[i] = [[float(c) for point in polygon for c in point] for polygon in frame_outline(path, xml_dir) or []]
    return out


def read_nodules(model: nn.Module, heads: DescriptorHeads, processor, images: Sequence, boxes: Sequence[Sequence[float]],
                 batch_size: int = 16) -> dict[str, np.ndarray]:
    """The heads' logits read from each image's nodule (:func:`preprocess.nodule_view` of its box: the square around
    it with some tissue), one more forward pass of the backbone on those squares: ``{descriptor: (n, classes)}``.
    ``images``: PIL images or paths."""
    from PIL import Image

    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in heads.names}
    was_training = model.training
    model.eval()  # BatchNorm's running statistics, as at prediction (a model fresh from training may still be in train mode)
    for start in range(0, len(images), batch_size):
        views = []
        for image, box in zip(images[start:start + batch_size], boxes[start:start + batch_size], strict=True):
            if isinstance(image, Image.Image):
                views.append(nodule_view(image, box))
            else:
                with Image.open(image) as opened:
                    views.append(nodule_view(opened, box))
        with torch.inference_mode(), descriptor_logits(model, heads) as captured:
            model(pixel_values=view_pixels(processor, views).to(device))
        for name in heads.names:
            out[name].append(captured[0][name].float().cpu().numpy().astype(np.float64))
    model.train(was_training)
    return {name: np.concatenate(v) if v else np.zeros((0, len(CLASSES[name]))) for name, v in out.items()}


class DescriptorHeads(nn.Module):
    """A linear head per descriptor on the pooled features the class head reads, and optionally an outline head: a 1x1
    convolution on the Grad-CAM layer's map giving, per cell of its grid, the logit that the nodule is there (learnt from
    the radiologists' outlines, ``--outline_loss_weight``; at prediction the box around it is the *predicted outline*)."""

    def __init__(self, in_features: int, names: Sequence[str] = DESCRIPTORS, outline_channels: int | None = None) -> None:
        super().__init__()
        self.names = list(names)
        self.heads = nn.ModuleDict({name: nn.Linear(in_features, len(CLASSES[name])) for name in self.names})
        self.outline = nn.Conv2d(outline_channels, 1, kernel_size=1) if outline_channels else None

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = features.flatten(1)
        return {name: head(features) for name, head in self.heads.items()}


def read_outlined(model: nn.Module, heads: DescriptorHeads, processor, paths: Sequence[str], boxes: np.ndarray) -> dict[str, np.ndarray] | None:
    """:func:`read_nodules` of the frames that have a box (``boxes``: :func:`frame_nodule_boxes`' rows), as
    ``{descriptor: (frames, classes)}`` with NaN rows for the others; None when no frame has one."""
    boxed = np.flatnonzero(~np.isnan(boxes).any(axis=1))
    if not len(boxed):
        return None
    read = read_nodules(model, heads, processor, [paths[i] for i in boxed], boxes[boxed])
    out = {name: np.full((len(paths), v.shape[1]), np.nan) for name, v in read.items()}
    for name, v in read.items():
        out[name][boxed] = v
    return out


def head_name(model: nn.Module) -> str:
    """The name of the module whose input the heads read (the class head), as ``model.get_submodule`` takes it."""
    return _module_name(model, classifier_head(model))


def outline_layer_name(model: nn.Module) -> str:
    """The name of the module whose output an outline head reads (the Grad-CAM layer), as ``model.get_submodule`` takes it."""
    return _module_name(model, target_layer(model))


def _module_name(model: nn.Module, wanted: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is wanted)


def pooled_width(model: nn.Module) -> int:
    """The width of the features the class head reads (its first linear layer's input)."""
    head = classifier_head(model)
    linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    return int(linear.in_features)


def map_channels(model: nn.Module, image_size: int) -> int:
    """The channels of the Grad-CAM layer's map (what an outline head reads), from one small forward pass."""
    seen: list[int] = []
    handle = target_layer(model).register_forward_hook(lambda module, args, output: seen.append(int(output.shape[1])))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(pixel_values=torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[-1]


@contextmanager
def descriptor_logits(model: nn.Module, heads: DescriptorHeads | None) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Inside the block every forward pass of ``model`` also runs ``heads`` on the class head's input,
    appending ``{descriptor: logits}`` (with gradients while training) to the yielded list; heads with an outline head
    add ``{OUTLINE: (batch, 1, h, w) logits}`` read from the Grad-CAM layer's map of the same pass. No heads (a model
    without them): the list stays empty and the model runs as it is."""
    captured: list[dict[str, torch.Tensor]] = []
    if heads is None:
        yield captured
        return
    pending: dict[str, torch.Tensor] = {}

    def read_map(module, args, output):
        pending[OUTLINE] = heads.outline(output)

    def hook(module, args):
        captured.append({**heads(args[0]), **pending})
        pending.clear()

    handles = [classifier_head(model).register_forward_pre_hook(hook)]
    if heads.outline is not None:
        handles.append(target_layer(model).register_forward_hook(read_map))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def outline_loss(logits: torch.Tensor, target: torch.Tensor, outlined: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the outline head's map (``logits``: (batch, 1, h, w)) against the share of each grid cell
    the radiologist's outline covers (``target``: (batch, 1, H, W) masks in [0, 1], pooled to the grid), over the
    ``outlined`` examples; 0 (with a gradient path) when none is."""
    if not bool(outlined.any()):
        return logits.sum() * 0.0
    outlined = outlined.to(logits.device)
    cover = F.adaptive_avg_pool2d(target.to(device=logits.device, dtype=logits.dtype)[outlined], logits.shape[-2:])
    return F.binary_cross_entropy_with_logits(logits[outlined], cover)


def predicted_boxes(cells: np.ndarray, view_boxes: Sequence[Box], owner: np.ndarray, sizes: Sequence[tuple[int, int]],
                    threshold: float = 0.5) -> np.ndarray:
    """Per image, the nodule box its outline head predicts (:func:`ultrasound_crop.located_box` of the view whose map is surest;
    ``cells``: (views, h, w) probabilities, ``owner``: each view's image, ``sizes``: the images'), (images, 4), NaN
    rows where no view's map reaches ``threshold``."""
    out = np.full((len(sizes), 4), np.nan)
    for i, size in enumerate(sizes):
        for j in sorted(np.flatnonzero(owner == i), key=lambda j: -float(cells[j].max())):
            box = located_box(cells[j], view_boxes[j], size, threshold)
            if box is not None:
                out[i] = box
                break
    return out


def outline_reads(captured: Sequence[Mapping[str, torch.Tensor]], paths: Sequence[str], owner: np.ndarray, preprocessor) -> np.ndarray:
    """The nodule boxes the outline head predicts for frames already read (``captured``: :func:`descriptor_logits`'
    batches of their views, in order; ``owner``: each view's frame; ``paths``: the frames), (frames, 4), NaN: none found."""
    from PIL import Image

    cells = torch.sigmoid(torch.cat([b[OUTLINE].detach().float().cpu() for b in captured]))[:, 0].numpy()
    view_boxes, sizes = [], []
    for path in paths:  # each frame's views' boxes, as the evaluation's transforms cut them (inference.frame_views)
        with Image.open(path) as image:
            view_boxes += frame_views([image], preprocessor)[1]
            sizes.append(image.size)
    return predicted_boxes(cells, view_boxes, owner, sizes)


def predicted_report(logits: Mapping[str, np.ndarray], found: np.ndarray, true_boxes: np.ndarray, targets: np.ndarray,
                     groups: Sequence[str], y_true: Sequence[int], labels: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> dict:
    """:func:`descriptor_report` of the heads as a frame without a box given is read (``logits``: per descriptor, every
    frame's: from the nodule the outline head predicted, ``found`` (frames, 4: NaN rows where none), else from the whole
    frame), and how the predicted boxes overlap the radiologists' (``true_boxes``, NaN rows: not outlined): the median
    intersection over union where both exist, and the share of outlined frames whose predicted box overlaps theirs by
    at least half (a frame without one counts as a miss)."""
    report = descriptor_report({name: softmax(np.asarray(v)) for name, v in logits.items()}, targets, groups, y_true, labels, n_resamples, seed)
    has_found, outlined = ~np.isnan(found).any(axis=1), ~np.isnan(true_boxes).any(axis=1)
    ious = [box_iou(found[i], true_boxes[i]) for i in np.flatnonzero(has_found & outlined)]
    report["read_from"] = f"{PREDICTED} where found, else frame"
    report["found"], report["frames"] = int(has_found.sum()), int(len(found))
    report["localisation"] = {"outlined": int(outlined.sum()), "found_and_outlined": len(ious),
                              "iou_median": float(np.median(ious)) if ious else math.nan,
                              "iou_at_least_half": float(sum(v >= 0.5 for v in ious) / outlined.sum()) if outlined.any() else math.nan}
    return report


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (left, top, right, bottom)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def descriptor_class_weights(targets: np.ndarray, names: Sequence[str] = DESCRIPTORS) -> dict[str, torch.Tensor]:
    """Per descriptor, n / (k * n_c) over the frames that have it (k: its classes; 0 for a class no frame has): each
    class counts as much as the majority, as the class head's loss weighs the classes. Without them the heads
    learn each descriptor's majority class (on DDTI: "solid", "smooth"; Cohen's kappa 0)."""
    out = {}
    for j, name in enumerate(names):
        known = targets[:, j][targets[:, j] != MISSING]
        counts = np.bincount(known, minlength=len(CLASSES[name])).astype(np.float64)
        weights = np.where(counts > 0, len(known) / (len(CLASSES[name]) * np.maximum(counts, 1)), 0.0)
        out[name] = torch.tensor(weights, dtype=torch.float32)
    return out


def descriptor_loss(logits: Mapping[str, torch.Tensor], targets: torch.Tensor, names: Sequence[str],
                    weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over descriptors of the (class-weighted, with ``weights``) cross-entropy on the examples that have the
    descriptor (``targets``: (batch, descriptors), :data:`MISSING` skipped); 0 (with a gradient path) when none has any."""
    losses = []
    for j, name in enumerate(names):
        y = targets[:, j]
        known = y != MISSING
        if known.any():
            w = weights[name].to(device=logits[name].device, dtype=logits[name].dtype) if weights else None
            losses.append(F.cross_entropy(logits[name][known], y[known], weight=w))
    if not losses:
        return sum(v.sum() * 0.0 for v in logits.values())
    return torch.stack(losses).mean()


def expected_points(probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """ACR points expected under each descriptor's probabilities, summed: (n,)."""
    total = None
    for name, p in probs.items():
        points = np.array([pts for _, pts in CLASSES[name]], dtype=np.float64)
        part = np.asarray(p, dtype=np.float64) @ points
        total = part if total is None else total + part
    return total if total is not None else np.zeros(0)


def cohen_kappa(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Cohen's kappa of two raters (NaN with fewer than two examples or one category in all)."""
    from sklearn.metrics import cohen_kappa_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) < 2 or len(set(y_true.tolist()) | set(y_pred.tolist())) < 2:
        return math.nan
    return float(cohen_kappa_score(y_true, y_pred))


def _interval(statistic, groups: Sequence[str], n_resamples: int, seed: int) -> list[float]:
    """95% percentile interval of ``statistic(rows)`` over resamples of whole patients (NaN resamples skipped)."""
    samples = [v for idx in group_resamples(len(groups), list(groups), n_resamples, seed) if (v := statistic(idx)) == v]
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))] if samples else [math.nan, math.nan]


def kappa_with_interval(y_true: Sequence[int], y_pred: Sequence[int], groups: Sequence[str], n_resamples: int = 1000,
                        seed: int = 0) -> dict:
    """Kappa against the radiologist with a 95% interval resampling patients (``groups``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ci = _interval(lambda idx: cohen_kappa(y_true[idx], y_pred[idx]), groups, n_resamples, seed)
    return {"value": cohen_kappa(y_true, y_pred), "ci": ci, "n": int(len(y_true)), "patients": len(set(groups))}


@dataclass
class DescriptorState:
    """The heads and what they read, as a model folder keeps them."""

    heads: DescriptorHeads
    facts: dict
    #: the model's module whose input the heads read (its class head): how the Hub pipeline, without the package, finds it
    reads: str | None = None
    #: the model's module whose output the outline head reads (its Grad-CAM layer; None: no outline head), for the pipeline too
    outline_reads: str | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}, str(folder / DESCRIPTOR_HEADS))
        outline = self.heads.outline
        config = {"names": self.heads.names, "in_features": next(iter(self.heads.heads.values())).in_features, "reads": self.reads,
                  **({"outline_channels": outline.in_channels, "outline_reads": self.outline_reads} if outline is not None else {}),
                  "classes": {name: [{"term": t, "points": p} for t, p in CLASSES[name]] for name in self.heads.names}, "facts": self.facts}
        (folder / DESCRIPTOR_CONFIG).write_text(json.dumps(config, indent=2, default=float) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path | None) -> DescriptorState | None:
        """The folder's heads (safetensors only), or None when it has none."""
        from safetensors.torch import load_file

        if folder is None or not (Path(folder) / DESCRIPTOR_HEADS).is_file() or not (Path(folder) / DESCRIPTOR_CONFIG).is_file():
            return None
        config = json.loads((Path(folder) / DESCRIPTOR_CONFIG).read_text())
        heads = DescriptorHeads(int(config["in_features"]), config["names"], config.get("outline_channels"))
        heads.load_state_dict(load_file(str(Path(folder) / DESCRIPTOR_HEADS)))
        return cls(heads.eval(), config.get("facts") or {}, config.get("reads"), config.get("outline_reads"))


def describe(logits: Mapping[str, torch.Tensor | np.ndarray], read_from: str = "frame") -> list[dict]:
    """Per image: each descriptor's probabilities by ACR term, its most likely term, the expected points and TI-RADS
    level they imply (``"tirads": {"points": .., "level": ..}``), and what they were read from (``"read_from"``: "frame",
    the whole frame; "nodule", the square of a nodule box given; :data:`PREDICTED`, the square of the box the outline head
    predicted)."""
    probs = {name: torch.softmax(torch.as_tensor(v, dtype=torch.float64), dim=1).numpy() for name, v in logits.items()}
    n = len(next(iter(probs.values()))) if probs else 0
    points = expected_points(probs) if probs else np.zeros(n)
    out = []
    for i in range(n):
        row: dict = {}
        for name, p in probs.items():
            terms = [t for t, _ in CLASSES[name]]
            row[name] = {"probabilities": {t: float(p[i, k]) for k, t in enumerate(terms)}, "term": terms[int(np.argmax(p[i]))]}
        row["tirads"] = {"points": float(points[i]), "level": tirads_level(points[i])}
        row["read_from"] = read_from
        out.append(row)
    return out


def answered_descriptors(frame: Mapping[str, np.ndarray], predicted: Mapping[str, np.ndarray] | None, found: np.ndarray | None) -> list[dict]:
    """Each frame's descriptors as the model answers without a box (:func:`describe`): read from the nodule its outline head
    located where it found one (``predicted``: every frame's logits so read, ``found``: the boxes, NaN rows: none), else
    from the whole frame (``frame``)."""
    out = describe(frame)
    if predicted is not None and found is not None:
        for i in np.flatnonzero(~np.isnan(found).any(axis=1)):
            out[i] = describe({name: np.asarray(v)[i:i + 1] for name, v in predicted.items()}, read_from=PREDICTED)[0]
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else math.nan


def descriptor_report(probs: Mapping[str, np.ndarray], targets: np.ndarray, groups: Sequence[str], y_true: Sequence[int],
                      labels: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> dict:
    """How the heads agree with the radiologist on the frames that have each descriptor (``probs``: per descriptor,
    (frames, classes) probabilities; Cohen's kappa, 95% interval over patients; the confusion matrix, rows:
    radiologist), and the descriptor route's risk: the expected ACR points as a score of malignancy (ROC AUC over
    every frame, against the class labels)."""
    from sklearn.metrics import confusion_matrix

    groups_a = np.asarray(groups)
    out: dict = {"per_descriptor": {}}
    for j, (name, p) in enumerate(probs.items()):
        known = targets[:, j] != MISSING
        pred = np.asarray(p).argmax(1)
        k = len(CLASSES[name])
        # (sklearn refuses an empty count: a source without case files, LES3BDD, has no descriptor anywhere)
        confusion = confusion_matrix(targets[known, j], pred[known], labels=list(range(k))) if known.any() else np.zeros((k, k), dtype=int)
        out["per_descriptor"][name] = {
            "kappa": kappa_with_interval(targets[known, j], pred[known], groups_a[known].tolist(), n_resamples, seed) if known.any()
            else {"value": math.nan, "ci": [math.nan, math.nan], "n": 0, "patients": 0},
            "classes": [t for t, _ in CLASSES[name]], "confusion": confusion.tolist(),
        }
    points = expected_points(probs)
    y = np.asarray(y_true)
    if "malignant" in labels:
        positive = (y == list(labels).index("malignant")).astype(int)
        ci = _interval(lambda idx: _auc(positive[idx], points[idx]), list(groups_a), n_resamples, seed)
        out["route"] = {"auc_malignant": {"value": _auc(positive, points), "ci": ci}, "n": int(len(y)),
                        "score": "expected ACR points of the four descriptors (shape not recorded)"}
    return out


def nodule_report(logits: Mapping[str, np.ndarray], targets: np.ndarray, groups: Sequence[str], y_true: Sequence[int],
                  labels: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> dict | None:
    """:func:`descriptor_report` of the heads read from each frame's nodule box (``logits``: per descriptor, (frames,
    classes), NaN rows for frames without a box), over the frames that have one; None when none has."""
    first = np.asarray(next(iter(logits.values())))
    boxed = ~np.isnan(first).any(axis=1)
    if not boxed.any():
        return None
    report = descriptor_report({name: softmax(np.asarray(v)[boxed]) for name, v in logits.items()}, targets[boxed],
                               list(np.asarray(groups)[boxed]), list(np.asarray(y_true)[boxed]), labels, n_resamples, seed)
    return {**report, "read_from": "nodule", "frames": int(boxed.sum())}


def one_line(described: Mapping | None, box: Sequence[float] | None = None) -> str | None:
    """A frame's descriptors in one prediction-file cell: ``composition=solid or almost completely solid (0.78); ...;
    points=6.1; level=TR4; read_from=nodule; nodule_box=20 30 70 64`` (the box read, when one was; None when the
    model has no heads)."""
    if not described:
        return None
    parts = [f"{name}={d['term']} ({d['probabilities'][d['term']]:.2f})" for name, d in described.items() if name in CLASSES]
    tirads = described.get("tirads") or {}
    return "; ".join(parts + ([f"points={tirads['points']:.1f}", f"level={tirads['level']}"] if tirads else [])
                     + [f"read_from={described.get('read_from', 'frame')}"] + ([f"nodule_box={' '.join(f'{v:g}' for v in box)}"] if box is not None else []))
