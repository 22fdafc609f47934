"""The ultrasound crop, self-contained: numpy, OpenCV and Pillow only, no import from the package.

It is the one copy of the crop. :mod:`thyroid_classifier.preprocess` uses it in training and prediction, and
every trained model folder carries this file beside ``ultrasound_processor.py``, so that a Hub user's
``pipeline(..., trust_remote_code=True)`` crops exactly as the project does (see ``docs/hub.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

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


#: The tissue kept around a nodule's box on each side, as a share of its longer side: its margin (smooth,
#: lobulated, ill-defined) is read against what surrounds it.
NODULE_CONTEXT = 0.15
#: A nodule box smaller than this (pixels, either side) is refused: too little to read descriptors from.
MIN_NODULE_SIDE = 8


def nodule_square(box: Sequence[float], size: tuple[int, int], context: float = NODULE_CONTEXT) -> Box:
    """The square a nodule's box (left, top, right, bottom, in the image's pixels) is read from: centred on it,
    ``context`` of its longer side added on each side, moved inside the image (and cut to it where it does not
    fit). Raises ValueError naming the problem for a box that is not inside the image or too small."""
    width, height = size
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a nodule box is four numbers (left, top, right, bottom), not {box!r}") from None
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 - x0 < MIN_NODULE_SIDE or y1 - y0 < MIN_NODULE_SIDE:
        raise ValueError(f"the nodule box ({', '.join(f'{v:g}' for v in box)}) is not inside the {width} x {height} image "
                         f"or is under {MIN_NODULE_SIDE} pixels on a side")
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * context), float(width), float(height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return (round(left), round(top), round(left + side), round(top + side))


def nodule_view(image: Image.Image, box: Sequence[float], context: float = NODULE_CONTEXT) -> Image.Image:
    """What the TI-RADS descriptor heads read of a nodule: the RGB square :func:`nodule_square` cuts around its box."""
    return to_rgb(image, upright=False).crop(nodule_square(box, image.size, context))


def located_box(cells: np.ndarray, view: Sequence[int], size: tuple[int, int], threshold: float = 0.5) -> tuple[float, float, float, float] | None:
    """The nodule box an outline map locates (``cells``: (h, w) probabilities on a view's grid; ``view``: that view's
    box, left, top, right, bottom, in its image of ``size``): the 4-connected cells above ``threshold`` around the most
    likely one, resized onto the view (bilinear, as the heatmap is), and the box around where they stay above it.
    None when no cell reaches ``threshold`` or the box is under :data:`MIN_NODULE_SIDE` a side."""
    cells = np.asarray(cells, dtype=np.float32)
    if not cells.size or cells.max() < threshold:
        return None
    above, region = cells >= threshold, np.zeros(cells.shape, dtype=bool)
    stack = [np.unravel_index(int(cells.argmax()), cells.shape)]
    while stack:  # the peak's region (a grid of a few dozen cells)
        y, x = stack.pop()
        if 0 <= y < cells.shape[0] and 0 <= x < cells.shape[1] and above[y, x] and not region[y, x]:
            region[y, x] = True
            stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    left, top, right, bottom = (int(v) for v in view)
    on_view = cv2.resize(np.where(region, cells, 0.0).astype(np.float32), (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(on_view >= threshold)
    if not len(xs):
        return None
    found = (float(left + xs.min()), float(top + ys.min()), float(left + xs.max() + 1), float(top + ys.max() + 1))
    if min(found[2] - found[0], found[3] - found[1]) < MIN_NODULE_SIDE:
        return None
    return found
