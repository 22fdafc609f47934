"""Ultrasound preprocessing: one transform, used identically in training and prediction.

Scanner frames carry things that belong to the machine, not to the nodule: black borders, side
panels of settings (gain, depth, frequency), view labels, scale bars, calipers. A model that sees
them can learn the scanner instead of the thyroid, so the transform

1. converts any upload to 8-bit RGB (16-bit, palette, RGBA, CMYK, grey, EXIF rotation),
2. crops to the ultrasound region (where speckle fills its neighbourhood, unlike sparse text
   strokes; thin bars are then removed by a morphological opening), and
3. optionally masks burned-in text and caliper marks inside it (saturated white or coloured thin
   marks, filled by inpainting). Off by default: it is conservative, but any mask risks touching
   bright microcalcifications, a malignancy feature;
4. optionally (``split_views``) splits a split-screen frame (two views of the nodule side by side)
   into its views, which are predicted one at a time and averaged: on DDTI the layout alone tells
   the classes apart (41% of malignant frames are split screens, 10% of benign ones). Off by
   default: measured on DDTI, it did not remove the cue and lowered the AUC on single views too.

:meth:`UltrasoundPreprocessor.apply` also returns the crop box so heatmaps can be mapped back onto
the image the user gave.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .ultrasound_crop import (  # noqa: F401 - the crop's one copy, and the nodule square's
    MIN_NODULE_SIDE,
    NODULE_CONTEXT,
    WIDE_MODES,
    Box,
    crop_region,
    find_ultrasound_box,
    has_alpha,
    marks_mask,
    nodule_square,
    nodule_view,
    to_rgb,
)

CONFIG_NAME = "ultrasound_preprocessing.json"
#: Refuse an image declaring more pixels than this, before decoding it. Ultrasound frames are under
#: ~2 Mpx; a "decompression bomb" can declare 100 Mpx in a 100 KB file and cost gigabytes decoded.
MAX_PIXELS = 40_000_000
#: A legal image whose longer side exceeds this is decoded reduced (JPEG: at a lower DCT scale;
#: other formats: reduced right after decoding), so no upload costs much more than a frame's worth
#: of memory downstream. Real frames are smaller and never reduced.
MAX_DECODE_SIDE = 2048
#: Smaller images hold too little of the thyroid to say anything about.
MIN_SIDE = 32


class ImageError(ValueError):
    """An input that cannot be used as an image, with a message naming it and the problem."""



#: PIL's bytes per pixel of a decoded image, by mode (RGB is stored as 4); anything else: 4.
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Rows of the full-size image converted at a time when a large one is reduced (times the factor).
_STRIP_ROWS = 32


@dataclass
class PendingImage:
    """An image whose header has been read and checked, nothing decoded yet (:func:`probe_image`).

    ``cost`` is what decoding it will hold in memory at its peak, in bytes, so that a server can
    decide before decoding whether it fits its budget (:class:`~thyroid_classifier.serving.MemoryBudget`)."""

    image: Image.Image
    label: str
    factor: int  # the image is reduced by this factor as it is decoded (1: not reduced)
    owned: bool = True  # opened here (closed once decoded), not a PIL image the caller passed

    @property
    def cost(self) -> int:
        width, height = self.image.size
        decoded = width * height * _BYTES_PER_PIXEL.get(self.image.mode, 4)
        if self.factor > 1:  # the decoded image, strips of it converted, the reduced RGB result
            strip = width * _STRIP_ROWS * self.factor * 4 * 2
            return decoded + strip + math.ceil(width / self.factor) * math.ceil(height / self.factor) * 4 * 2
        return decoded + width * height * 4 * (3 if has_alpha(self.image) or self.image.mode.startswith("I") else 1)

    def decode(self) -> Image.Image:
        """The image decoded as upright 8-bit RGB, reduced by ``factor``; an :class:`ImageError` naming it if it cannot be."""
        image, label = self.image, self.label
        try:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF / multi-page TIFF: the first frame
            image.load()
            rgb = _reduced_rgb(image, self.factor) if self.factor > 1 else to_rgb(image)
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: too many pixels, more than the {MAX_PIXELS:,} allowed (ultrasound frames are under ~2 million)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for broken files
            raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None
        finally:
            if self.owned:
                image.close()  # its decoder and buffers: not kept past the decode
        if min(rgb.size) < MIN_SIDE:
            raise ImageError(f"{label}: {rgb.width}x{rgb.height} pixels is too small (at least {MIN_SIDE} px a side)")
        return rgb


def probe_image(source: str | Path | bytes | BinaryIO | Image.Image, name: str | None = None) -> PendingImage:
    """Read and check an image's header without decoding it: not an image, an empty file or too many
    pixels (a decompression bomb declares 100 Mpx in a 100 KB file) are refused here, at no cost.

    ``source``: a path, bytes, an open binary file (read from where it is: a file deleted meanwhile
    is still read whole) or a PIL image. A JPEG larger than :data:`MAX_DECODE_SIDE` is set to decode
    at a reduced DCT scale."""
    import io

    label = name or (Path(source).name if isinstance(source, (str, Path)) else Path(str(getattr(source, "name", "image"))).name)
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            if isinstance(source, (str, Path)):
                try:
                    source = Path(source).read_bytes()
                except FileNotFoundError:
                    raise ImageError(f"{label}: no such file") from None
            if isinstance(source, bytes):
                if not source:
                    raise ImageError(f"{label}: empty file (0 bytes)")
                source = io.BytesIO(source)
            elif source.seek(0, io.SEEK_END) == 0:
                raise ImageError(f"{label}: empty file (0 bytes)")
            source.seek(0)
            image = Image.open(source)
        if image.width * image.height > MAX_PIXELS:  # the header's size: nothing decoded yet
            raise ImageError(f"{label}: {image.width}x{image.height} pixels is more than the {MAX_PIXELS:,} allowed (ultrasound frames are under ~2 million)")
        factor = math.ceil(max(image.size) / MAX_DECODE_SIDE)
        if factor > 1 and image.format == "JPEG":
            image.draft("RGB" if image.mode not in ("L", "RGB") else image.mode, (image.width // factor, image.height // factor))
            factor = math.ceil(max(image.size) / MAX_DECODE_SIDE)  # what is left to reduce after the DCT scale
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: too many pixels, more than the {MAX_PIXELS:,} allowed (ultrasound frames are under ~2 million)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for non-images and broken files
        problem = "not an image, or an image format that cannot be read" if "cannot identify" in str(exc) else f"corrupt or truncated image ({exc})"
        raise ImageError(f"{label}: {problem}") from None
    return PendingImage(image, label, factor, owned=not isinstance(source, Image.Image))


def open_image(source: str | Path | bytes | BinaryIO | Image.Image, name: str | None = None) -> Image.Image:
    """Open and fully decode an image from a path, bytes, an open binary file or a PIL image, as upright 8-bit RGB.

    Every problem becomes an :class:`ImageError` whose message names the input: not an image, empty
    or truncated file, too many pixels (decompression bomb), too small. An image whose longer side
    exceeds :data:`MAX_DECODE_SIDE` comes back reduced.
    """
    return probe_image(source, name).decode()


def _reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """A decoded image reduced by ``factor`` (box average), as :func:`to_rgb` of it would be, without
    ever converting the whole full-size image: strips of it are converted and reduced one at a time.
    A 40 Mpx 16-bit RGBA PNG peaked at ~780 MB converted whole; in strips, at its decoded size (~170 MB)."""
    width, height = image.size
    orientation = image.getexif().get(0x0112)  # the reduced copy has no EXIF of its own: given this one's below
    wide = image.mode in WIDE_MODES
    # 16-bit and float: reduced as 32-bit values, stretched to 8 bits once reduced (to_rgb: its
    # percentiles are then the reduced frame's, a few grey levels from the full frame's on a smooth
    # image); the rest exactly as to_rgb then reduce: each strip as to_rgb makes it, then averaged.
    mode = ("F" if image.mode == "F" else "I") if wide else "RGB"
    out = Image.new(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    step = _STRIP_ROWS * factor  # a multiple of the factor: strips reduce exactly as the whole would
    for top in range(0, height, step):
        strip = image.crop((0, top, width, min(height, top + step)))
        strip = strip.convert(mode) if wide else to_rgb(strip, upright=False)
        out.paste(strip.reduce(factor), (0, top // factor))
    if orientation is not None:
        out.getexif()[0x0112] = orientation  # to_rgb turns it upright as it would the full-size image
    return to_rgb(out)


def looks_like_ultrasound(image: Image.Image) -> bool:
    """Grey-scale content, as a B-mode frame has (colour overlays aside): a colour photo is not."""
    small = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.int16)
    chroma = small.max(axis=2) - small.min(axis=2)
    return bool((chroma > 30).mean() < 0.1)


#: A crop wider than this (width / height) holds two views side by side (split screen); DDTI's
#: single views are about 1.28 wide, its split screens about 1.63.
SPLIT_ASPECT = 1.45


def find_views(gray: np.ndarray, split_aspect: float = SPLIT_ASPECT) -> list[Box]:
    """The views of a cropped ultrasound region: one box, or two for a split-screen frame.

    Scanners show a nodule in two planes side by side, in two equal panes that abut without a dark
    gap: the seam is the column with the sharpest left/right intensity step within 4% of the
    middle (a nodule's edge further out must not win), or the middle itself if none stands out.
    """
    h, w = gray.shape
    if w <= split_aspect * h:
        return [(0, 0, w, h)]
    step = np.abs(np.diff(gray.astype(np.float32), axis=1)).mean(axis=0)  # step between column x and x + 1
    lo, hi = int(w * 0.46), int(w * 0.54) + 1
    seam = lo + int(step[lo:hi].argmax()) + 1
    if step[seam - 1] < 2.5 * float(np.median(step)):
        seam = w // 2
    return [(0, 0, seam, h), (seam, 0, w, h)]


@dataclass(frozen=True)
class UltrasoundPreprocessor:
    """Crop to the ultrasound region and optionally mask text; saved beside each model."""

    crop: bool = True
    mask_text: bool = False
    threshold: int = 12
    #: Predict a split-screen frame's two views one at a time and average them (the layout itself
    #: is a property of the scanner and the protocol, not of the nodule). Off by default: on DDTI
    #: it did not stop the model from telling the layouts apart and it scored worse (README).
    split_views: bool = False

    def apply(self, image: Image.Image) -> tuple[Image.Image, Box]:
        """The preprocessed RGB image and its crop box in the (upright, RGB) input's pixels."""
        return crop_region(image, self.crop, self.mask_text, self.threshold)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image)[0]

    def views(self, image: Image.Image) -> tuple[list[Image.Image], list[Box]]:
        """The preprocessed views of a frame (one, or two for a split screen with ``split_views``)
        and each view's box in the (upright, RGB) input's pixels."""
        region, (left, top, _, _) = self.apply(image)
        if not self.split_views:
            return [region], [(left, top, left + region.width, top + region.height)]
        boxes = find_views(np.asarray(region.convert("L")))
        return [region.crop(b) for b in boxes], [(left + b[0], top + b[1], left + b[2], top + b[3]) for b in boxes]

    def save_pretrained(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UltrasoundPreprocessor:
        """Read the saved settings; a folder without them (e.g. a plain Hub model) gets no-op settings."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return cls(crop=False, mask_text=False)
        fields = json.loads(path.read_text())
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
