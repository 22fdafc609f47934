"""What a training or evaluation example becomes before the model: decode → ultrasound crop →
views → square resize, cached once per image, then augmented (training) or normalised by the saved
image processor (evaluation: the same :func:`preprocess.frame_pixels` stage prediction uses)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .augment import DeviceAugment
from .explain import outline_mask
from .inference import ViewTransform, frame_views, view_pixels
from .preprocess import UltrasoundPreprocessor, nodule_view


class ImageTransforms:
    """Decode → ultrasound crop → views → square resize once per image (cached), then augment
    (train) or normalise with the saved image processor (evaluation: exactly what prediction does).

    A split-screen frame has two views: training draws one at random each time the frame is seen;
    evaluation reads the view named by the example's ``view`` column (see :func:`expand_views`)."""

    def __init__(self, preprocessor: UltrasoundPreprocessor, processor, image_size: int, train: bool, cache: dict | None = None,
                 device_augment: bool = False, view_transform: ViewTransform | None = None) -> None:
        from torchvision.transforms import v2
        from PIL import Image

        self.preprocessor, self.processor, self.train = preprocessor, processor, train
        self.view_transform = view_transform  # a test-time change of each view (stage 3 of inference); None in training
        self.train_size = (image_size, image_size)  # (width, height) of the cached training image
        # Shared across the folds of a cross-validation run: each file is decoded once per run.
        self._cache: dict = cache if cache is not None else {}
        self._open = Image.open
        self._resize = Image.Resampling.BILINEAR
        mean, std = processor.image_mean, processor.image_std
        # Ultrasound-safe augmentation: small rotation and scale, gain (brightness/contrast), left-
        # right flip. No hue or saturation jitter (grey images) and no vertical flip (depth axis).
        # DeviceAugment adds what differs between scanners, so none of it can carry the label.
        # The geometry also moves a frame's outline mask (--outline_loss_weight); the appearance is the image's alone.
        self.geometry = v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(0.75, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
        ])
        self.appearance = v2.Compose([
            v2.ColorJitter(brightness=0.25, contrast=0.25),
            v2.ToDtype(torch.float32, scale=True),
            *([DeviceAugment()] if device_augment else []),
            v2.Normalize(mean, std),
        ])
        self.augment = v2.Compose([self.geometry, self.appearance])

    def _crop(self, path: str, image) -> list:
        """The views that are resized and cached: stages 2-3 of :mod:`inference` (research scripts override it)."""
        return frame_views([image], self.preprocessor, self.view_transform)[0]

    def _load(self, path: str) -> list:
        key = (path, self.train)
        cached = self._cache.get(key)
        if cached is None:
            with self._open(path) as image:
                views = self._crop(path, image)
            if self.train:
                cached = [view.resize(self.train_size, self._resize) for view in views]
            else:
                cached = list(view_pixels(self.processor, views))  # stage 4, as the Predictor does
            self._cache[key] = cached
        return cached

    def count_views(self, path: str) -> int:
        return len(self._load(path))

    def __call__(self, batch: dict) -> dict:
        loaded = [self._load(p) for p in batch["path"]]
        outlines = batch.get("outline") if self.train else None
        masks: list = []
        if outlines is not None:
            from torchvision import tv_tensors
        if self.train:
            # A random view of a split screen; a single view draws nothing (the augmentation's random
            # stream, and so a seeded run, stays what it was before views existed).
            pixels = []
            for i, views in enumerate(loaded):
                v = int(torch.randint(len(views), ())) if len(views) > 1 else 0
                if outlines is not None and outlines[i]:
                    # The radiologist's outline on this view, moved with it (the outline head's target).
                    image, mask = self.geometry(views[v], tv_tensors.Mask(self._load_outline(batch["path"][i], outlines[i])[v]))
                    pixels.append(self.appearance(image))
                    masks.append(mask.as_subclass(torch.Tensor).float())
                else:
                    pixels.append(self.augment(views[v]))
                    masks.append(None)
        else:
            chosen = batch.get("view") or [0] * len(loaded)
            pixels = [views[v] for views, v in zip(loaded, chosen, strict=True)]
        out = {"pixel_values": pixels, "labels": batch["label"]}
        if outlines is not None:
            out["outline_mask"] = [m is not None for m in masks]
            out["outline_target"] = [m if m is not None else torch.zeros((1, *pixels[0].shape[-2:])) for m in masks]
        if self.train and "weight" in batch:
            out["sample_weight"] = batch["weight"]
        if self.train and "descriptors" in batch:  # the radiologist's descriptors (descriptors.MISSING where not given)
            out["descriptor_labels"] = batch["descriptors"]
        if self.train and "nodule_box" in batch:
            # The nodule's square (the radiologist's outline's box, with some tissue), augmented as the frame is: a second
            # view the descriptor heads read (--descriptor_view). A frame without an outline gets an empty one, masked.
            boxed = [all(v == v for v in box) for box in batch["nodule_box"]]  # NaN: no outline
            out["nodule_mask"] = boxed
            out["nodule_pixel_values"] = [self.augment(self._load_nodule(path, box)) if ok else torch.zeros_like(pixels[0])
                                          for path, box, ok in zip(batch["path"], batch["nodule_box"], boxed, strict=True)]
        return out

    def _load_outline(self, path: str, polygons: Sequence[Sequence[float]]) -> list[torch.Tensor]:
        """The outline's mask on each view of the frame, (1, H, W) uint8 at the cached training size (cached)."""
        key = (path, "outline")
        if key not in self._cache:
            with self._open(path) as image:
                _, boxes, _ = frame_views([image], self.preprocessor)
                whole = outline_mask([list(zip(p[::2], p[1::2], strict=True)) for p in polygons], image.size)
            full = Image.fromarray(whole.astype(np.uint8))
            self._cache[key] = [torch.from_numpy(np.array(full.crop(box).resize(self.train_size, Image.Resampling.NEAREST)))[None]
                                for box in boxes]
        return self._cache[key]

    def _load_nodule(self, path: str, box: Sequence[float]):
        key = (path, "nodule")
        if key not in self._cache:
            with self._open(path) as image:
                self._cache[key] = nodule_view(image, box).resize(self.train_size, self._resize)
        return self._cache[key]


def expand_views(dataset, transforms: ImageTransforms):
    """``dataset`` with one row per view (a ``view`` column) for evaluation, and each row's frame
    index; unchanged when every frame has one view."""
    counts = [transforms.count_views(p) for p in dataset.with_format(None)["path"]]
    owner = np.repeat(np.arange(len(counts)), counts)
    if all(c == 1 for c in counts):
        return dataset, owner
    return dataset.select(owner.tolist()).add_column("view", [v for c in counts for v in range(c)]), owner


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }
    if "sample_weight" in examples[0]:
        batch["sample_weight"] = torch.tensor([e["sample_weight"] for e in examples], dtype=torch.float32)
    if "descriptor_labels" in examples[0]:
        batch["descriptor_labels"] = torch.tensor([e["descriptor_labels"] for e in examples], dtype=torch.long)
    if "outline_target" in examples[0]:
        batch["outline_target"] = torch.stack([e["outline_target"] for e in examples])
        batch["outline_mask"] = torch.tensor([e["outline_mask"] for e in examples], dtype=torch.bool)
    if "nodule_pixel_values" in examples[0]:
        batch["nodule_pixel_values"] = torch.stack([e["nodule_pixel_values"] for e in examples])
        batch["nodule_mask"] = torch.tensor([e["nodule_mask"] for e in examples], dtype=torch.bool)
    return batch

