"""The ultrasound crop, self-contained: numpy, OpenCV and Pillow only, no import from the package.

It is the one copy of the crop. :mod:`thyroid_classifier.preprocess` uses it in training and prediction, and
every trained model folder carries this file beside ``ultrasound_processor.py``, so that a Hub user's
``pipeline(..., trust_remote_code=True)`` crops exactly as the project does (see ``docs/hub.md``).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL convention, right/bottom exclusive)


#: Modes of more than 8 bits a pixel: stretched to 8 bits by :func:`to_rgb`.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (composited over black by :func:`to_rgb`)."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image, upright: bool = True) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright (EXIF orientation applied unless ``upright`` is False)."""
    if upright:
        image = ImageOps.exif_transpose(image) or image
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF / multi-page TIFF: the first frame
    if image.mode in WIDE_MODES:
        # 16-bit / float: stretch the used range to 0..255 rather than clipping to the low byte.
        array = np.asarray(image, dtype=np.float64)
        lo, hi = np.percentile(array, (0.5, 99.5)) if array.size else (0.0, 1.0)
        array = np.clip((array - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if has_alpha(image):
        # Transparent areas become black, like the background of a scanner frame.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def find_ultrasound_box(gray: np.ndarray, threshold: int = 12, min_area: float = 0.1) -> Box:
    """The bounding box of the ultrasound region of a grey frame (the whole frame if none is found)."""
    h, w = gray.shape
    side = min(h, w)
    # Speckle fills its neighbourhood; text, tick marks and calipers are sparse strokes on black.
    # So: the share of non-dark pixels in a window, thresholded, then an opening that removes what
    # is still thinner than about 5% of the frame (scale bars, dividers, a dense line of text).
    window = max(5, int(side * 0.04)) | 1
    density = cv2.boxFilter((gray > threshold).astype(np.float32), -1, (window, window))
    mask = (density > 0.5).astype(np.uint8)
    open_k = max(5, int(side * 0.05)) | 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((open_k, open_k), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return (0, 0, w, h)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if areas.max() < min_area * h * w:
        return (0, 0, w, h)
    # Dual-view frames hold two sectors side by side: keep every large region, not only the largest.
    keep = stats[1:][areas >= 0.2 * areas.max()]
    left = int(keep[:, cv2.CC_STAT_LEFT].min())
    top = int(keep[:, cv2.CC_STAT_TOP].min())
    right = int((keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max())
    bottom = int((keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max())
    return (left, top, right, bottom)


def marks_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of burned-in text and caliper marks: coloured pixels, or saturated white ones
    that stand out from their neighbourhood as thin strokes."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    coloured = chroma > 40  # grey ultrasound has none; overlays are often yellow, green or cyan
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, np.ones((9, 9), np.uint8))
    white = (gray >= 250) & (tophat > 120)  # pure white AND much brighter than its surroundings
    mask = (coloured | white).astype(np.uint8)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool)


def crop_region(image: Image.Image, crop: bool = True, mask_text: bool = False, threshold: int = 12) -> tuple[Image.Image, Box]:
    """The frame's ultrasound region as RGB (burned-in marks inpainted with ``mask_text``) and its box in
    the (upright, RGB) input's pixels."""
    image = to_rgb(image)
    rgb = np.asarray(image)
    box: Box = (0, 0, image.width, image.height)
    if crop:
        box = find_ultrasound_box(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), threshold)
        rgb = rgb[box[1] : box[3], box[0] : box[2]]
    if mask_text:
        mask = marks_mask(rgb)
        if mask.any():
            rgb = cv2.inpaint(np.ascontiguousarray(rgb), mask.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    return Image.fromarray(np.ascontiguousarray(rgb)), box
