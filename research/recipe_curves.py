"""Fine-tuning recipes on DDTI, seen epoch by epoch: pooled out-of-fold macro ROC AUC after every epoch.

    python research/recipe_curves.py --out curves.npz [--lr 1e-4] [--epochs 25] [--size 224 | --hw 176x288]
                                       [--shifts] [--no-device_augment] [--tirads_targets] [--tta] [--init random]

`train.py --cv 5` reports one number per recipe (each fold's final model). To *design* a
recipe it helps to see the whole curve: this script uses the project's own pieces (audit, patient-
grouped folds, the validation share carved from each fold's training part, ultrasound crop and
augmentation, discriminative AdamW groups, class-weighted label-smoothed loss, channels-last) in a
plain loop with a fixed cosine schedule, and scores the held-out fold after every epoch, for the raw
weights and for an exponential moving average of them (timm's ModelEmaV3, decay 0.99 per step, as
`train.py --ema_decay`). Each fold's held-out part is scored, never trained on; choosing a recipe
from these curves is still a choice made on the same 349 frames, so the curves are for design, and
the number to report is `train.py --cv`'s.

`--shifts` also scores each held-out fold, after the last epoch, under fixed simulated machine
differences (`thyroid_classifier.augment.device_shifts`: gain, depth gain, resolution, speckle,
pixel aspect, burned-in calipers and text), beside the clean score; `--no-device_augment` trains
without train.py's machine-difference augmentation, to compare. `--split_views` trains and scores
the views of split screens instead of whole frames (train.py's `--split_views`). Every run ends with
a layout report: the pooled AUC on single-view frames and on split screens alone, and how well the
score tells split screens from single views among malignant frames (DDTI's split screens are 41% of
its malignant frames and 10% of its benign ones, so a model can score the layout, not the nodule).

Options that are not (yet) in train.py, kept here because the resolve notes report them:
`--hw HxW` (non-square input that keeps the frames' aspect), `--tirads_targets` (train on the six
TI-RADS levels of DDTI's manifest, score P(malignant) = P(4a) + ... + P(5)), `--tta` (average with
the horizontally flipped image), `--roi_margin M` (train and test on the radiologist's nodule box
from DDTI's outlines, widened by M a side: an oracle-localisation experiment), `--aux_weight W`
(auxiliary heads on DDTI's per-case findings: composition, echogenicity, margins, calcifications,
TI-RADS), `--freeze_bn` (BatchNorm statistics kept at their ImageNet values), `--square_views`
(each view at its own aspect: random near-square crops in training, the centred square at test),
`--layout_weights` (training frames weighted by P(layout) / P(layout | class), so the layout is
independent of the class in the weighted data), `--seg_weight W` (an auxiliary 1x1-conv head that
outlines the nodule from DDTI's radiologist outlines on the last feature map, or at stride 16 with
`--seg_stride 16`; the classifier alone is scored), `--layer_decay D` (layer-wise learning-rate decay:
each block below the top learns D times slower than the one above it), `--plain --constant_lr` (the
issue's plain fine-tuning loop for comparison: whole frames, flips only; see `--plain`'s help for the
settings that go with it).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from transformers import get_cosine_schedule_with_warmup

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.augment import device_shifts  # noqa: E402
from thyroid_classifier.data import GroupSpec  # noqa: E402
from thyroid_classifier.metrics import frame_logits, layout_breakdown, macro_auc, softmax  # noqa: E402
from thyroid_classifier.models import build_model, get_spec  # noqa: E402
from thyroid_classifier.preprocess import UltrasoundPreprocessor  # noqa: E402
from thyroid_classifier.arguments import DataArguments, RunArguments  # noqa: E402
from thyroid_classifier.cv import pooled_folds, with_validation  # noqa: E402
from thyroid_classifier.folder import prediction_rows, write_predictions  # noqa: E402
from thyroid_classifier.transforms import ImageTransforms, collate, expand_views  # noqa: E402
from thyroid_classifier.tuning import make_optimizer  # noqa: E402
from thyroid_classifier.weighting import class_weights  # noqa: E402

TIRADS = ["2", "3", "4a", "4b", "4c", "5"]  # 2-3: benign, 4a-5: malignant (DDTI's convention)


class NonSquareTransforms(ImageTransforms):
    """ImageTransforms resized to H x W instead of a square (the same augmentation otherwise)."""

    def __init__(self, preprocessor, processor, hw: tuple[int, int], train: bool, cache: dict) -> None:
        from torchvision.transforms import v2

        super().__init__(preprocessor, processor, hw[0], train, cache)
        h, w = hw
        self.train_size = (w, h)
        self.geometry.transforms[1] = v2.RandomResizedCrop(hw, scale=(0.75, 1.0), ratio=(0.8 * w / h, 1.25 * w / h), antialias=True)


class RoiTransforms(ImageTransforms):
    """ImageTransforms on the radiologist's nodule box (union of the frame's outlines, widened by
    ``margin`` of its size on each side) instead of the ultrasound region: an oracle-localisation
    experiment; frames without an outline keep the ultrasound crop."""

    def __init__(self, preprocessor, processor, size: int, train: bool, cache: dict, xml_dir: Path, margin: float) -> None:
        super().__init__(preprocessor, processor, size, train, cache)
        self.xml_dir, self.margin = xml_dir, margin

    def _box(self, path: str, width: int, height: int):
        from thyroid_classifier.known_data import frame_outline

        polygons = frame_outline(path, self.xml_dir)
        if not polygons:
            return None
        pts = np.concatenate([np.asarray(q, dtype=float) for q in polygons])
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        side = max(x1 - x0, y1 - y0, 64.0) * (1 + 2 * self.margin)  # square, so the resize keeps shape
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return (int(max(0, cx - side / 2)), int(max(0, cy - side / 2)), int(min(width, cx + side / 2)), int(min(height, cy + side / 2)))

    def _crop(self, path: str, image):
        box = self._box(path, image.width, image.height)
        return [image.convert("RGB").crop(box)] if box else super()._crop(path, image)


class SquareViewTransforms(ImageTransforms):
    """Views kept at their aspect (no squash): training caches each view with its shorter side at
    ``size`` and the random crop picks a near-square part; evaluation takes the centred square.
    A split screen's view (0.8 wide) and a single view (1.3 wide) then show tissue at one shape."""

    def _load(self, path: str) -> list:
        key = (path, self.train, "square")
        cached = self._cache.get(key)
        if cached is None:
            with self._open(path) as image:
                views = self._crop(path, image)
            side = self.train_size[0]
            if self.train:
                cached = [v.resize((max(side, round(side * v.width / v.height)), max(side, round(side * v.height / v.width))), self._resize) for v in views]
            else:
                squares = []
                for v in views:
                    s = min(v.size)
                    left, top = (v.width - s) // 2, (v.height - s) // 2
                    squares.append(v.crop((left, top, left + s, top + s)))
                cached = list(self.processor(squares, return_tensors="pt")["pixel_values"])
            self._cache[key] = cached
        return cached


class OutlineTransforms(ImageTransforms):
    """ImageTransforms whose training examples also carry the radiologist's nodule outline as a mask
    (``outline``: 1 x H x W in [0, 1], all -1 where the frame has no usable outline), moved by the same
    crop, flip and rotation as the image: the target of ``--seg_weight``'s auxiliary head."""

    def __init__(self, preprocessor, processor, size: int, train: bool, cache: dict, xml_dir: Path, device_augment: bool) -> None:
        super().__init__(preprocessor, processor, size, train, cache, device_augment=device_augment)
        self.xml_dir = xml_dir
        self.geometric = self.geometry  # ToImage, RandomResizedCrop, flip, rotation: image and mask together
        self.photometric = self.appearance  # gain, dtype, device shifts, normalise: image only

    def _crop(self, path: str, image) -> list:
        # The outline masks are cut from the same boxes as the views, in the same decode.
        views, boxes = self.preprocessor.views(image)
        if self.train:
            self._cache[(path, "outline")] = self._masks(path, image.size, boxes)
        return views

    def _masks(self, path: str, size: tuple[int, int], boxes: list) -> list:
        from PIL import Image

        from thyroid_classifier.explain import outline_mask
        from thyroid_classifier.known_data import frame_outline

        polygons = frame_outline(path, self.xml_dir)
        if not polygons:
            return [None] * len(boxes)
        full = Image.fromarray(outline_mask(polygons, size).astype(np.uint8) * 255)
        return [full.crop(box).resize(self.train_size, Image.Resampling.BILINEAR) for box in boxes]

    def __call__(self, batch: dict) -> dict:
        if not self.train:
            return super().__call__(batch)
        from torchvision import tv_tensors

        pixels, outlines = [], []
        for path in batch["path"]:
            views, masks = self._load(path), self._cache[(path, "outline")]  # _load filled both
            i = int(torch.randint(len(views), ())) if len(views) > 1 else 0
            mask = masks[i]
            target = tv_tensors.Mask(torch.from_numpy(np.asarray(mask if mask is not None else np.zeros(views[i].size[::-1], np.uint8))).unsqueeze(0))
            image, target = self.geometric(views[i], target)
            pixels.append(self.photometric(image))
            outlines.append(target.float() / 255 if mask is not None else torch.full(target.shape, -1.0))
        return {"pixel_values": pixels, "labels": batch["label"], "outline": outlines}


#: DDTI's per-case findings grouped into ordered levels (benign-looking first); "" = not reported.
FINDINGS = {
    "composition": {"cystic": 0, "spongiform": 0, "predominantly cystic": 0, "predominantly solid": 1, "solid": 2, "dense": 2},
    "echogenicity": {"hyperechogenicity": 0, "isoechogenicity": 0, "hypoechogenicity": 1, "marked hypoechogenicity": 2},
    "margins": {"well defined": 0, "well defined smooth": 0, "ill defined": 1, "ill- defined": 1, "macrolobulated": 2, "microlobulated": 2, "spiculated": 2},
    "calcifications": {"non": 0, "macrocalcifications": 1, "macrocalcification": 1, "microcalcifications": 2, "microcalcification": 2},
    "tirads": {t: i for i, t in enumerate(TIRADS)},
}


def case_findings(xml_dir: Path, path: str) -> list[int]:
    """The case's findings as level indices, -100 (ignored by the loss) where not reported."""
    import xml.etree.ElementTree as ET

    from thyroid_classifier.known_data import frame_number

    key = frame_number(path)
    xml = xml_dir / f"{key[0]}.xml" if key else None
    root = ET.parse(xml).getroot() if xml is not None and xml.is_file() else None
    return [levels.get((root.findtext(name) or "").strip(), -100) if root is not None else -100 for name, levels in FINDINGS.items()]


class WithFindings:
    """Wraps a transform so each example also carries its case's findings (auxiliary targets)."""

    def __init__(self, inner, xml_dir: Path) -> None:
        self.inner, self.xml_dir = inner, xml_dir
        self._findings: dict[str, list[int]] = {}  # parsed once per file, not every epoch

    def __call__(self, batch: dict) -> dict:
        out = self.inner(batch)
        for p in batch["path"]:
            if p not in self._findings:
                self._findings[p] = case_findings(self.xml_dir, p)
        out["findings"] = [self._findings[p] for p in batch["path"]]
        return out


def collate_findings(examples):
    out = collate(examples)
    if "findings" in examples[0]:
        out["findings"] = torch.tensor([e["findings"] for e in examples], dtype=torch.long)
    if "outline" in examples[0]:
        out["outline"] = torch.stack([e["outline"] for e in examples])
    if "weight" in examples[0]:
        out["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data/ddti/images")
    p.add_argument("--model", default="../shared/models/efficientnet_lite0-imagenet")
    p.add_argument("--manifest", default="../shared/data/ddti/manifest.csv", help="for --tirads_targets")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head_lr_multiplier", type=float, default=10.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ema_decay", type=float, default=0.99)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--hw", default=None, help="non-square input, e.g. 176x288")
    p.add_argument("--tirads_targets", action="store_true")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--roi_margin", type=float, default=None, help="oracle nodule crop from DDTI's outlines, widened by this share a side")
    p.add_argument("--xml_dir", default="../shared/data/ddti/xml")
    p.add_argument("--aux_weight", type=float, default=0.0, help="weight of auxiliary heads on DDTI's findings (composition, echogenicity, margins, calcifications, TI-RADS)")
    p.add_argument("--device_augment", action=argparse.BooleanOptionalAction, default=True,
                   help="randomise gain, depth gain, resolution, speckle and burned-in marks while training (train.py's default)")
    p.add_argument("--shifts", action="store_true", help="after the last epoch, also score each held-out fold under fixed device shifts (thyroid_classifier.augment.device_shifts)")
    p.add_argument("--split_views", action="store_true",
                   help="split a split-screen frame into its views: train on one at random, average both at test (train.py --split_views)")
    p.add_argument("--square_views", action="store_true", help="keep each view's aspect: random near-square crops in training, the centred square at test")
    p.add_argument("--layout_weights", action="store_true", help="weight training frames so that the screen layout (split or single) is independent of the class")
    p.add_argument("--seg_weight", type=float, default=0.0, help="weight of an auxiliary 1x1-conv head that outlines the nodule on the last feature map (DDTI's outlines; dropped after training)")
    p.add_argument("--seg_stride", type=int, default=32, choices=[16, 32], help="feature map the outline head reads: the last (stride 32) or stride 16")
    p.add_argument("--layer_decay", type=float, default=None, help="layer-wise learning-rate decay (timm's param_groups_layer_decay): each layer group learns this factor slower than the one above it; the classifier keeps lr x head_lr_multiplier")
    p.add_argument("--plain", action="store_true", help="the issue's plain fine-tuning loop: whole frame (no ultrasound crop), horizontal flips only; pair with --lr 3e-4 --head_lr_multiplier 1 --label_smoothing 0 --weight_decay 0.01 --warmup_ratio 0 --constant_lr")
    p.add_argument("--constant_lr", action="store_true", help="no schedule: the learning rate stays where it starts")
    p.add_argument("--freeze_bn", action="store_true", help="keep BatchNorm running statistics at their pretrained values")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help=".npz with the per-epoch out-of-fold probabilities (and, when every fold ran, a .csv beside it with the last epoch's, for thyroid_classifier.compare)")
    a = p.parse_args(argv)

    dataset, report = audited_dataset(a.data_dir, drop_duplicates="none", near_threshold=8, progress=False,
                                 validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    cv = pooled_folds(dataset, 5, a.seed)
    full, y, labels, folds = cv.full, cv.y, cv.labels, cv.folds
    malignant = labels.index("malignant")
    spec = get_spec(a.model)
    run_args = RunArguments(learning_rate=a.lr, weight_decay=a.weight_decay, head_lr_multiplier=a.head_lr_multiplier)
    tirads = {}
    if a.tirads_targets:
        with open(a.manifest) as f:
            tirads = {Path(r["file"]).name: r["tirads"] for r in csv.DictReader(f)}
    hw = tuple(int(v) for v in a.hw.split("x")) if a.hw else None
    cache: dict = {}
    oof = np.full((a.epochs, len(y), len(labels)), np.nan)
    oof_ema = np.full_like(oof, np.nan)
    shifts = device_shifts(a.seed) if a.shifts else {}
    oof_shift = {name: np.full((len(y), len(labels)), np.nan) for name in shifts}
    started = time.time()
    for k, (pool, held) in enumerate(folds[: a.folds], start=1):
        torch.manual_seed(a.seed + k)
        train = with_validation(full.select([int(i) for i in pool]), DataArguments(), a.seed + k)["train"]
        test = full.select([int(i) for i in held])
        targets = labels
        train_y = [int(v) for v in train.with_format(None)["label"]]
        if a.tirads_targets:
            fine = [TIRADS.index(tirads[Path(path).name]) for path in train.with_format(None)["path"]]
            assert all((f >= 2) == (c == malignant) for f, c in zip(fine, train_y))
            coarse_w = class_weights(train_y, len(labels))  # weight each level by its coarse class
            weights = torch.tensor([float(coarse_w[malignant if i >= 2 else 1 - malignant]) for i in range(len(TIRADS))])
            train = train.remove_columns("label").add_column("label", fine)
            targets = TIRADS
        else:
            weights = class_weights(train_y, len(labels))
        model, processor = build_model(spec, targets, a.init, a.size)
        if hw:
            processor.size = {"height": hw[0], "width": hw[1]}
        model = model.to(memory_format=torch.channels_last)
        prep = UltrasoundPreprocessor(split_views=a.split_views, crop=not a.plain)
        make = (lambda train_: NonSquareTransforms(prep, processor, hw, train_, cache)) if hw else (
            lambda train_: ImageTransforms(prep, processor, a.size, train_, cache, device_augment=a.device_augment and train_))
        if a.square_views:
            make = lambda train_: SquareViewTransforms(prep, processor, a.size, train_, cache, device_augment=a.device_augment and train_)  # noqa: E731
        if a.seg_weight:
            make = lambda train_: OutlineTransforms(prep, processor, a.size, train_, cache, Path(a.xml_dir), a.device_augment and train_)  # noqa: E731
        if a.roi_margin is not None:
            make = lambda train_: RoiTransforms(prep, processor, a.size, train_, cache, Path(a.xml_dir), a.roi_margin)  # noqa: E731
        train_transforms = make(True)
        if a.plain:
            from torchvision.transforms import v2

            train_transforms.augment = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                                   v2.Normalize(processor.image_mean, processor.image_std)])
        layout_weight = {}
        if a.layout_weights:
            # Weight each training frame by P(layout) / P(layout | class): in the weighted data the
            # screen layout says nothing about the class (importance weights, as for any confounder).
            paths = train.with_format(None)["path"]
            layouts = 1 + report.split_screens(paths)  # views per frame, whatever the model is shown
            for c in set(train_y):
                for lay in set(layouts.tolist()):
                    in_c = np.array(train_y) == c
                    p_lay = (layouts == lay).mean()
                    p_lay_c = (layouts[in_c] == lay).mean()
                    if p_lay_c > 0:
                        layout_weight[(c, lay)] = p_lay / p_lay_c
            frame_weight = {p_: layout_weight[(c, lay)] for p_, c, lay in zip(paths, train_y, layouts)}
            print("layout weights (class, views): " + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(layout_weight.items())), flush=True)
        transform = WithFindings(train_transforms, Path(a.xml_dir)) if a.aux_weight else train_transforms
        if a.layout_weights:
            inner = transform
            transform = lambda batch: {**inner(batch), "weight": [frame_weight[p_] for p_ in batch["path"]]}  # noqa: E731
        train.set_transform(transform, columns=["path", "label"])
        test_transforms = make(False)
        test_views, owner = expand_views(test, test_transforms)
        test_views.set_transform(test_transforms, columns=["path", "label", *(["view"] if "view" in test_views.column_names else [])])
        optimizer = make_optimizer(model, run_args, a.head_lr_multiplier if a.init == "pretrained" else 1.0)
        if a.layer_decay:
            from timm.optim import param_groups_layer_decay

            groups = param_groups_layer_decay(model.timm_model, weight_decay=a.weight_decay, layer_decay=a.layer_decay)
            top = max(g["lr_scale"] for g in groups)  # the classifier's group
            for g in groups:
                g["lr"] = a.lr * (a.head_lr_multiplier if g["lr_scale"] == top else g["lr_scale"])
            optimizer = torch.optim.AdamW(groups, lr=a.lr)
            print("layer-wise learning rates: " + ", ".join(f"{g['lr']:.2g}" for g in groups[::2]), flush=True)
        loader = torch.utils.data.DataLoader(train, batch_size=a.batch, shuffle=True, collate_fn=collate_findings if a.aux_weight or a.layout_weights or a.seg_weight else collate)
        pooled: dict = {}
        heads = torch.nn.ModuleList()
        if a.aux_weight:
            classifier = model.timm_model.get_classifier()
            classifier.register_forward_hook(lambda m, inp, out: pooled.__setitem__("x", inp[0]))
            heads = torch.nn.ModuleList(torch.nn.Linear(classifier.in_features, len(v) if k == "tirads" else 3) for k, v in FINDINGS.items())
            optimizer.add_param_group({"params": list(heads.parameters()), "lr": a.lr * a.head_lr_multiplier, "weight_decay": a.weight_decay})
        feature_map: dict = {}
        seg_head = None
        if a.seg_weight:
            timm_model = model.timm_model
            tap = timm_model.bn2 if a.seg_stride == 32 else timm_model.blocks[-3]
            tap.register_forward_hook(lambda m, inp, out: feature_map.__setitem__("x", out))
            timm_model.eval()
            with torch.no_grad():
                timm_model.forward_features(torch.zeros(1, 3, a.size, a.size))
            seg_head = torch.nn.Conv2d(feature_map["x"].shape[1], 1, 1)
            optimizer.add_param_group({"params": list(seg_head.parameters()), "lr": a.lr * a.head_lr_multiplier, "weight_decay": a.weight_decay})
        steps = a.epochs * len(loader)
        schedule = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0) if a.constant_lr
                    else get_cosine_schedule_with_warmup(optimizer, int(a.warmup_ratio * steps), steps))  # Trainer's "cosine"
        ema = ModelEmaV3(model, decay=a.ema_decay)  # what train.py --ema_decay uses
        test_loader = torch.utils.data.DataLoader(test_views, batch_size=64, collate_fn=collate)

        mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

        def predict(m: torch.nn.Module, shift=None) -> np.ndarray:
            m.eval()
            out = []
            with torch.no_grad():
                for batch in test_loader:
                    x = batch["pixel_values"]
                    if shift is not None:  # in [0, 1] for the shift, then normalised again
                        x = (torch.stack([shift(img) for img in (x * std + mean).clamp(0, 1)]) - mean) / std
                    prob = m(pixel_values=x).logits.float().softmax(-1)
                    if a.tta:
                        prob = (prob + m(pixel_values=x.flip(-1)).logits.float().softmax(-1)) / 2
                    out.append(prob)
            prob = softmax(frame_logits(np.log(torch.cat(out).numpy().clip(1e-12)), owner, len(test)))  # a frame's views averaged
            if a.tirads_targets:
                pm = prob[:, 2:].sum(1)
                prob = np.stack([1 - pm, pm], 1) if malignant == 1 else np.stack([pm, 1 - pm], 1)
            return prob

        for epoch in range(a.epochs):
            model.train()
            if a.freeze_bn:
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            losses = []
            for batch in loader:
                if a.layout_weights:
                    per = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"],
                                          weight=weights, label_smoothing=a.label_smoothing, reduction="none")
                    w = batch["weight"].to(per.dtype)
                    loss = (per * w).sum() / (weights[batch["labels"]] * w).sum()
                else:  # kept as it was, so earlier runs' numbers repeat to the last digit
                    loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"],
                                           weight=weights, label_smoothing=a.label_smoothing)
                if a.aux_weight:
                    for j, head in enumerate(heads):
                        target = batch["findings"][:, j]
                        if (target >= 0).any():
                            loss = loss + a.aux_weight * F.cross_entropy(head(pooled["x"]), target, ignore_index=-100)
                if a.seg_weight:
                    fm = feature_map["x"]
                    target = F.adaptive_avg_pool2d(batch["outline"], fm.shape[-2:])  # share of each cell inside the outline
                    known = (batch["outline"][:, 0, 0, 0] >= 0)
                    if known.any():
                        logit = seg_head(fm.float())[known]
                        loss = loss + a.seg_weight * F.binary_cross_entropy_with_logits(logit, target[known])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                losses.append(loss.item())
                ema.update(model, step=schedule.last_epoch)
            oof[epoch, held], oof_ema[epoch, held] = predict(model), predict(ema.module)
            print(f"fold {k} epoch {epoch + 1}: loss {np.mean(losses):.3f}, held-out AUC {macro_auc(y[held], oof[epoch, held]):.3f} "
                  f"(EMA {macro_auc(y[held], oof_ema[epoch, held]):.3f}), {time.time() - started:.0f} s", flush=True)
        for name, shift in shifts.items():
            oof_shift[name][held] = predict(model, shift)
    np.savez(a.out, oof=oof, oof_ema=oof_ema, y=y, **{f"shift {k}": v for k, v in oof_shift.items()})
    if a.folds == len(folds):  # every frame scored: the last epoch's predictions for thyroid_classifier.compare
        write_predictions(Path(a.out).with_suffix(".csv"), labels, prediction_rows(cv.paths, labels, y, oof[-1], group=cv.groups, fold=cv.fold_of.tolist()))
    done = ~np.isnan(oof[0, :, 0])
    print("pooled AUC per epoch:", " ".join(f"{macro_auc(y[done], oof[e, done]):.3f}" for e in range(a.epochs)))
    print("pooled AUC per epoch (EMA):", " ".join(f"{macro_auc(y[done], oof_ema[e, done]):.3f}" for e in range(a.epochs)))
    if shifts:
        clean = macro_auc(y[done], oof[-1, done])
        print(f"last epoch, pooled AUC clean {clean:.3f}; under device shifts:")
        for name, probs in oof_shift.items():
            print(f"  {name}: {macro_auc(y[done], probs[done]):.3f} ({macro_auc(y[done], probs[done]) - clean:+.3f})")
    # Screen layout: is the score about the nodule, or about whether the frame is a split screen?
    split = report.split_screens(cv.paths)
    layout = layout_breakdown(y[done], oof[-1, done], split[done], labels)
    for key, name in (("single_view", "single-view frames"), ("split_screen", "split screens")):
        if not np.isnan(layout[key]["roc_auc"]):  # one class only (a single fold can have no benign split screen)
            print(f"last epoch, pooled AUC on {name} only: {layout[key]['roc_auc']:.3f} (n={layout[key]['n']})")
    if "malignant" in layout["layout_auc"]:
        print(f"layout in the score: among malignant frames, P(malignant) tells split screens from single views with AUC "
              f"{layout['layout_auc']['malignant']:.3f} (0.5: not at all)")
    print(f"wall {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
