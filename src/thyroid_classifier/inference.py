"""The one inference path, stage by stage. Trainer evaluation (:mod:`transforms`), the
:class:`~thyroid_classifier.predict.Predictor` (and so ``evaluate``, ``localize``, ``predict``, the
app) and the benchmarks all go through these functions:

1. **frame** — a decoded image as given (:func:`preprocess.open_image`);
2. **views** — the ultrasound region cropped out, split into its views when it is a split screen
   (:meth:`UltrasoundPreprocessor.views`);
3. **view transform** — the one place where a test-time change plugs in (a simulated device shift in
   ``evaluate --shifts``; nothing by default);
4. **pixels** — each view resized and normalised by the saved image processor;
5. **probabilities** — the views' probabilities averaged per frame (the log of their mean is the frame's logits) and the calibration
   temperature applied; the heatmap (Grad-CAM) comes from the same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .metrics import frame_logits, softmax
from .preprocess import Box, UltrasoundPreprocessor

#: A test-time change to one view (PIL in, PIL out of the same size), applied at stage 3.
ViewTransform = Callable[[Image.Image], Image.Image]


def frame_views(images: Sequence[Image.Image], preprocessor: UltrasoundPreprocessor,
                view_transform: ViewTransform | None = None) -> tuple[list[Image.Image], list[Box], np.ndarray]:
    """Stages 2-3: every image's views, each view's box in its image, and the image each view belongs to."""
    views, boxes, owner = [], [], []
    for i, image in enumerate(images):
        crops, crop_boxes = preprocessor.views(image)
        views += [view_transform(v) for v in crops] if view_transform is not None else crops
        boxes += crop_boxes
        owner += [i] * len(crops)
    return views, boxes, np.asarray(owner, dtype=int)


def view_pixels(processor, views: Sequence[Image.Image]) -> torch.Tensor:
    """Stage 4: the saved image processor's resize and normalisation, (views, 3, H, W)."""
    return processor(list(views), return_tensors="pt")["pixel_values"]


def frame_probabilities(view_logits: np.ndarray, owner: np.ndarray, n_frames: int, temperature: float = 1.0) -> np.ndarray:
    """Stage 5: a frame's probabilities from its views' logits (the log of the views' mean probability), at ``temperature``."""
    return softmax(frame_logits(view_logits, owner, n_frames), temperature)
