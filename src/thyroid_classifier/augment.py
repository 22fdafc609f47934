"""What changes between ultrasound machines, as training augmentation and as test-time shifts.

A model trained at one hospital meets other scanners: another gain and dynamic range, depth-gain
(TGC) settings, lateral resolution, pixel aspect, speckle, and burned-in calipers and annotations
that the operator puts in different places. :class:`DeviceAugment` randomises these while
training, so none of them can carry the label; :func:`device_shifts` applies one fixed shift of each
kind to evaluation images (``evaluate --shifts``, ``research/recipe_curves.py --shifts``), to measure how much a model leans on
them. Both work on float image tensors in [0, 1], shape (3, H, W), before normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    """Gain curve: g > 1 darkens the mid-greys, g < 1 brightens them."""
    return x.clamp(0, 1) ** g


def depth_gain(x: torch.Tensor, top: float, bottom: float) -> torch.Tensor:
    """Time-gain compensation: a gain that changes linearly with depth (rows)."""
    ramp = torch.linspace(top, bottom, x.shape[-2], dtype=x.dtype).view(1, -1, 1)
    return (x * ramp).clamp(0, 1)


def low_resolution(x: torch.Tensor, factor: float) -> torch.Tensor:
    """A coarser scanner or probe: down-sample by ``factor`` (< 1) and back up."""
    h, w = x.shape[-2:]
    small = F.interpolate(x[None], size=(max(8, round(h * factor)), max(8, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def speckle(x: torch.Tensor, sd: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiplicative noise, the same for the three (grey) channels."""
    noise = torch.randn((1, *x.shape[-2:]), generator=generator, dtype=x.dtype) * sd
    return (x * (1 + noise)).clamp(0, 1)


def stretch(x: torch.Tensor, horizontal: float) -> torch.Tensor:
    """Another pixel aspect: stretch the width by ``horizontal`` and crop back to the centre."""
    h, w = x.shape[-2:]
    wide = F.interpolate(x[None], size=(h, max(w, round(w * horizontal))), mode="bilinear", align_corners=False)[0]
    left = (wide.shape[-1] - w) // 2
    return wide[..., left : left + w].clamp(0, 1)


def draw_marks(x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Burned-in annotations: ``n`` caliper crosses and a line of dashes ("text") at random places."""
    x = x.clone()
    h, w = x.shape[-2:]

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, max(lo + 1, hi), (1,), generator=generator))

    arm = max(2, round(min(h, w) * 0.02))
    for _ in range(n):
        cy, cx = rand(arm, h - arm), rand(arm, w - arm)
        x[:, cy, cx - arm : cx + arm + 1] = 1.0
        x[:, cy - arm : cy + arm + 1, cx] = 1.0
    y0, x0 = rand(0, h - arm), rand(0, w // 2)
    for k in range(rand(3, 9)):  # a short word of block letters
        left = x0 + k * (arm + 1)
        patch = x[:, y0 : y0 + arm, left : left + arm]  # a view: writing it writes x
        if patch.numel() == 0:
            break
        patch[:, torch.rand(patch.shape[-2:], generator=generator) > 0.4] = 1.0
    return x


class DeviceAugment(torch.nn.Module):
    """Random machine differences for training (each kind with probability ``p``).

    Ranges are moderate on purpose: a shift so strong that the nodule's echogenicity or
    calcifications are no longer visible would teach the model to ignore real findings.
    """

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p

    def _on(self) -> bool:
        return bool(torch.rand(()) < self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._on():
            x = gamma(x, math.exp(float(torch.empty(()).uniform_(math.log(0.7), math.log(1.4)))))
        if self._on():
            top, bottom = torch.empty(2).uniform_(0.75, 1.25).tolist()
            x = depth_gain(x, top, bottom)
        if self._on():
            x = low_resolution(x, float(torch.empty(()).uniform_(0.35, 0.8)))
        if self._on():
            x = speckle(x, float(torch.empty(()).uniform_(0.05, 0.2)))
        if self._on():
            x = draw_marks(x, int(torch.randint(1, 5, ())))
        return x


def device_shifts(seed: int = 0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One fixed, deterministic shift of each kind, for evaluation (name → function)."""

    def seeded(fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def apply(x: torch.Tensor) -> torch.Tensor:
            return fn(x, torch.Generator().manual_seed(seed + int(x.sum() * 1000) % 100_000))
        return apply

    return {
        "darker gain (gamma 1.5)": lambda x: gamma(x, 1.5),
        "brighter gain (gamma 0.67)": lambda x: gamma(x, 1 / 1.5),
        "depth gain 0.7 -> 1.3": lambda x: depth_gain(x, 0.7, 1.3),
        "lower resolution (x0.4)": lambda x: low_resolution(x, 0.4),
        "speckle noise (sd 0.15)": seeded(lambda x, g: speckle(x, 0.15, g)),
        "pixel aspect 1.3": lambda x: stretch(x, 1.3),
        "calipers and text": seeded(lambda x, g: draw_marks(x, 4, g)),
    }


def shift_image(image: Image.Image, shift: Callable[[torch.Tensor], torch.Tensor]) -> Image.Image:
    """Apply a tensor shift to a PIL image (RGB in, RGB out)."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    out = (shift(x).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(out))
