"""Grad-CAM in the same pass as the prediction, overlays at the upload's size, and localisation scores.

The prediction and the heatmap come from one forward pass. A forward hook on the target layer,
registered before grad-cam's own hooks, hands the rest of the network a detached copy of that
layer's output that requires grad; with every parameter frozen, the backward pass for the heatmap
then runs only through the layers *after* the target (pooling and the head), not the backbone.
Hooks are released by context managers after every call, so memory stays flat.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .preprocess import Box


class LogitsOnly(nn.Module):
    """grad-cam wants ``forward(x) -> logits``; transformers models return a ``ModelOutput``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@contextlib.contextmanager
def gradient_stops_at(layer: nn.Module) -> Iterator[None]:
    """Within the block, gradients stop at ``layer``'s output (see the module docstring)."""

    def detach(_module, _inputs, output):
        return output.detach().requires_grad_(True)

    handle = layer.register_forward_hook(detach)
    try:
        yield
    finally:
        handle.remove()


def freeze(model: nn.Module) -> nn.Module:
    """No parameter needs a gradient: the heatmap's backward pass never reaches the weights."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _full_kernel_forward(conv: nn.Conv2d):
    original = conv.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # A convolution whose kernel covers its whole input (VGG's 7x7 "fc6" on a 7x7 map) is a
        # matrix product; as such it runs about twice as fast on CPU, forward and backward.
        if x.shape[-2:] == conv.kernel_size:
            return nn.functional.linear(x.flatten(1), conv.weight.view(conv.out_channels, -1), conv.bias)[:, :, None, None]
        return original(x)

    return forward


def linearize_full_kernel_convs(model: nn.Module) -> nn.Module:
    """Run every unpadded, unstrided, ungrouped convolution whose kernel equals its input size as a
    linear layer (same numbers, less time). Idempotent; other inputs take the normal path."""
    for module in model.modules():
        if (isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and module.padding == (0, 0)
                and module.stride == (1, 1) and module.groups == 1 and module.dilation == (1, 1)
                and not getattr(module, "_linearized", False)):
            module.forward = _full_kernel_forward(module)
            module._linearized = True
    return model


@contextlib.contextmanager
def _requiring_grad(model: nn.Module) -> Iterator[None]:
    """Temporarily give every parameter a gradient (the plain, whole-network Grad-CAM)."""
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), before, strict=True):
            p.requires_grad_(flag)
            p.grad = None


@dataclass
class Explanation:
    logits: torch.Tensor  # (n, classes), from the same forward pass as the maps
    maps: np.ndarray  # (n, h, w) in [0, 1] at the model's input size
    targets: list[int]  # the class each map explains


def gradcam(model: nn.Module, layer: nn.Module, pixel_values: torch.Tensor, targets: Sequence[int] | None = None) -> Explanation:
    """Class scores and Grad-CAM maps for a batch in one forward pass.

    ``targets``: the class to explain per image (default: the predicted one). ``model`` must be
    frozen (:func:`freeze`) for the backward pass to stop at ``layer``.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wrapper = LogitsOnly(model)
    cam_targets = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    with torch.enable_grad(), gradient_stops_at(layer), GradCAM(model=wrapper, target_layers=[layer]) as cam:
        maps = cam(input_tensor=pixel_values, targets=cam_targets)
        logits = cam.outputs.detach()
    chosen = [int(t) for t in targets] if targets is not None else logits.argmax(dim=1).tolist()
    return Explanation(logits=logits, maps=np.asarray(maps, dtype=np.float32), targets=chosen)


def standard_gradcam(model: nn.Module, layer: nn.Module, pixel_values: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """grad-cam used the plain way (gradients through the whole network): the reference."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.enable_grad(), _requiring_grad(model), GradCAM(model=LogitsOnly(model), target_layers=[layer]) as cam:
        return np.asarray(cam(input_tensor=pixel_values, targets=[ClassifierOutputTarget(int(t)) for t in targets]), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Back onto the user's image


def to_original(heatmap: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Undo the preprocessing: resize the map to the crop box and place it in a frame of the
    original ``size`` (width, height); outside the box the map is 0."""
    width, height = size
    left, top, right, bottom = box
    full = np.zeros((height, width), dtype=np.float32)
    full[top:bottom, left:right] = cv2.resize(heatmap.astype(np.float32), (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
    return full


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Heatmap (same size as ``image``, values in [0, 1]) blended over the image: uint8 RGB."""
    # One native blend on uint8 images with float32 weight maps: the app draws this on every
    # request (numpy's float64 blend took ~15 ms at 560 x 360, this ~2 ms).
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
    rgb = np.asarray(image.convert("RGB"))
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    # Weight the colour by the map itself so cold regions keep the grey image readable.
    alpha = np.float32(opacity) * np.sqrt(heat)
    return cv2.blendLinear(rgb, colours, 1 - alpha, alpha)


# --------------------------------------------------------------------------------------------
# Localisation against radiologists' outlines (read by known_data)


def outline_mask(polygons: Sequence[Sequence[tuple[float, float]]], size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (height, width) of the union of the polygons."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon([tuple(p) for p in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Is the heatmap's peak inside the outline (the pointing game)?"""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[y, x])


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total energy inside the outline."""
    total = float(heatmap.sum())
    return float(heatmap[mask].sum() / total) if total > 0 else 0.0


def centred_gaussian(size: tuple[int, int], box: Box | None = None, sigma: float = 0.25) -> np.ndarray:
    """The baseline: a Gaussian centred on the ultrasound region (or the frame), sd = ``sigma`` of its sides."""
    width, height = size
    left, top, right, bottom = box or (0, 0, width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    sx, sy = sigma * (right - left), sigma * (bottom - top)
    return np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (NaN when one is constant)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every layer that can be (Adebayo et al., 2018: full model randomisation)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    return model


def randomization_check(model: nn.Module, layer: nn.Module, pixel_values: torch.Tensor, seed: int = 0) -> list[float]:
    """Spearman correlation, per image, between the heatmaps of ``model`` and of a copy with
    randomised weights, for the same classes. A faithful explanation changes: values near 0."""
    import copy

    name = next(n for n, m in model.named_modules() if m is layer)
    original = gradcam(model, layer, pixel_values)
    shuffled = freeze(randomize_weights(copy.deepcopy(model), seed))
    randomized = gradcam(shuffled, shuffled.get_submodule(name), pixel_values, original.targets)
    # A randomised model whose heatmap is flat (Grad-CAM's ReLU cut everything) kept none of the
    # original's structure: that is a correlation of 0, not an undefined one.
    return [0.0 if np.ptp(b) == 0 and np.ptp(a) > 0 else spearman(a, b) for a, b in zip(original.maps, randomized.maps, strict=True)]
