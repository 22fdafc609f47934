"""The project's preprocessing as a transformers image processor, so that a Hub user's
``pipeline("image-classification", ...)`` answers as the app does on a full scanner frame.

Every trained model folder carries this file and ``ultrasound_crop.py`` (the crop's one copy), and its
``config.json`` names this class in ``auto_map`` and the plain ``ViTImageProcessor`` as its
``image_processor_type`` (``preprocessor_config.json`` holds the settings). So:

- ``pipeline(..., model=MODEL, trust_remote_code=True)`` crops the ultrasound region first, then resizes
  and normalises exactly as training did;
- without ``trust_remote_code`` the folder still loads, with the plain processor (no crop): give it an
  image already cropped to the ultrasound region;
- with ``thyroid_classifier`` installed no remote code is needed:
  ``pipeline(..., image_processor=UltrasoundImageProcessor.from_pretrained(MODEL))``.

The calibration temperature is folded into the classifier's weights when the folder is written, so the
pipeline's softmax gives the calibrated probabilities. A model trained with ``--split_views`` averages a
split screen's two views in the project's own code; a pipeline scores the whole region instead.

Self-contained on purpose (transformers, numpy, OpenCV, Pillow): it runs as remote code without the package.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from transformers import ViTImageProcessor

from .ultrasound_crop import crop_region

logger = logging.getLogger(__name__)

#: How ``auto_map`` names this class inside a model folder (the file is copied there under this name).
AUTO_MAP = {"AutoImageProcessor": "ultrasound_processor.UltrasoundImageProcessor"}


class UltrasoundImageProcessor(ViTImageProcessor):
    """Crop to the ultrasound region (optionally inpaint burned-in marks), then resize and normalise."""

    def __init__(self, ultrasound_crop: bool = True, ultrasound_mask_text: bool = False, ultrasound_threshold: int = 12,
                 ultrasound_split_views: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ultrasound_crop = bool(ultrasound_crop)
        self.ultrasound_mask_text = bool(ultrasound_mask_text)
        self.ultrasound_threshold = int(ultrasound_threshold)
        self.ultrasound_split_views = bool(ultrasound_split_views)
        if self.ultrasound_split_views:
            logger.warning("This model averages a split-screen frame's two views (thyroid_classifier's Predictor does); "
                           "a pipeline scores the whole region, so its answer on split screens can differ.")

    def crop(self, image: Any) -> Image.Image:
        """One frame's ultrasound region (a PIL image or an (H, W[, C]) uint8 array)."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"UltrasoundImageProcessor takes PIL images or uint8 arrays, not {type(image).__name__}")
        return crop_region(image, self.ultrasound_crop, self.ultrasound_mask_text, self.ultrasound_threshold)[0]

    def preprocess(self, images: Any, *args: Any, **kwargs: Any):
        frames = images if isinstance(images, (list, tuple)) else [images]
        return super().preprocess([self.crop(frame) for frame in frames], *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        # No type and no auto_map here: the model's config.json names both (the plain ViTImageProcessor as
        # the type, this class in auto_map). So AutoImageProcessor finds this class with trust_remote_code,
        # the plain one without it and without a prompt; and the pipeline's look-up of a *video* processor,
        # which reads auto_map here as remote code, does not prompt either.
        return {k: v for k, v in super().to_dict().items() if k not in ("image_processor_type", "auto_map")}
