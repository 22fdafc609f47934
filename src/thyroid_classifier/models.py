"""The model registry: one entry per architecture, holding everything that differs between them.

Adding an architecture is one :class:`ModelSpec` in :data:`REGISTRY`. Any other Hub id or local
folder of an image-classification checkpoint works too: its spec is derived (Grad-CAM layer found
from the model itself).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .locations import check_hub_model, is_local

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_CHOICES = ("pretrained", "random")


def _resnet50_config(**label_kwargs):
    from transformers import ResNetConfig

    return ResNetConfig(**label_kwargs)  # the defaults are ResNet-50's


def _timm_config(architecture: str) -> Callable:
    def make(**label_kwargs):
        from transformers import TimmWrapperConfig

        return TimmWrapperConfig(architecture=architecture, **label_kwargs)

    return make


@dataclass(frozen=True)
class ModelSpec:
    """What the project needs to know about one architecture."""

    name: str  # short name used for the output folder
    checkpoint: str  # Hub id or local folder of the pretrained weights
    target_layer: str | None = None  # dotted path of the Grad-CAM layer; None: found automatically
    style_layer: str | None = None  # dotted path of the in-domain guard's early stage; None: found automatically
    config_factory: Callable | None = None  # builds the architecture offline, for --init random
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224
    model_type: str | None = None  # config.model_type this spec describes
    architecture_prefix: str = ""  # for TimmWrapper: the timm architecture's name starts with this
    extra: dict = field(default_factory=dict)

    def describes(self, config) -> bool:
        if self.model_type != getattr(config, "model_type", None):
            return False
        return str(getattr(config, "architecture", "")).startswith(self.architecture_prefix)


REGISTRY: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(
        name="resnet50",
        checkpoint="microsoft/resnet-50",
        target_layer="resnet.encoder.stages.-1",
        style_layer="resnet.encoder.stages.0",  # stride 4
        config_factory=_resnet50_config,
        model_type="resnet",
    ),
    "vgg19": ModelSpec(
        name="vgg19",
        checkpoint="timm/vgg19.tv_in1k",
        target_layer="timm_model.features.-1",  # after the last conv block, as grad-cam's README uses for VGG
        config_factory=_timm_config("vgg19"),
        model_type="timm_wrapper",
        architecture_prefix="vgg",
    ),
}


def get_spec(name_or_path: str) -> ModelSpec:
    """The registry entry for a short name, else a spec for any Hub id or local checkpoint folder."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name_or_path.rstrip("/")).name if is_local(name_or_path) else name_or_path).strip("-")
    return ModelSpec(name=slug or "model", checkpoint=name_or_path)


def spec_for_model(model: nn.Module) -> ModelSpec | None:
    """The registry entry describing a loaded model, if any."""
    return next((s for s in REGISTRY.values() if s.describes(model.config)), None)


# --------------------------------------------------------------------------------------------
# Building


def label_kwargs(labels: Sequence[str]) -> dict:
    return {
        "num_labels": len(labels),
        "id2label": {i: name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _reset_timm_init(model: nn.Module) -> None:
    """TimmWrapper re-initialises every weight with N(0, 0.02) when built from a config; for deep
    plain nets like VGG19 that makes activations vanish and training stall. Put timm's own init back."""
    import timm

    timm_model = getattr(model, "timm_model", None)
    if timm_model is None:
        return
    config = model.config
    fresh = timm.create_model(config.architecture, pretrained=False, num_classes=config.num_labels, **(config.model_args or {}))
    timm_model.load_state_dict(fresh.state_dict())


def saved_processor(checkpoint: str) -> dict:
    """``AutoImageProcessor.from_pretrained`` keywords that make it read a local folder's own
    ``preprocessor_config.json``: for a local timm folder transformers otherwise builds the processor from
    ``config.json`` (its ``pretrained_cfg`` before 5.25; from 5.25 whatever processor type the config names,
    with that type's defaults), not the pixels training saw."""
    return {"image_processor_filename": "preprocessor_config.json"} if is_local(checkpoint) and (Path(checkpoint) / "preprocessor_config.json").is_file() else {}


def _mean_std(checkpoint: str, spec: ModelSpec, local_only: bool) -> tuple[tuple, tuple]:
    """Normalisation the pretrained weights expect (from the checkpoint's own processor)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(checkpoint, local_files_only=local_only, **saved_processor(checkpoint))
    except Exception as exc:  # noqa: BLE001 - a checkpoint without a processor keeps the spec's
        logger.warning("no image processor in %s (%s); using the spec's mean/std", checkpoint, exc)
        return spec.mean, spec.std
    mean = getattr(processor, "image_mean", None) or getattr(processor, "data_config", {}).get("mean")
    std = getattr(processor, "image_std", None) or getattr(processor, "data_config", {}).get("std")
    return tuple(mean or spec.mean), tuple(std or spec.std)


def make_processor(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """The image processor saved with every model: square resize and normalisation.

    It is what ``pipeline()`` applies; the ultrasound crop is applied before it by the project's
    own code (see :mod:`thyroid_classifier.preprocess`).
    """
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def align_timm_eval_transform(config, processor) -> None:
    """Make a timm model's ``pretrained_cfg`` describe the saved processor's transform.

    transformers builds the image processor of a *local* timm folder from ``config.json``'s
    ``pretrained_cfg`` (ImageNet's resize, centre crop 87.5%, bicubic), not from the saved
    ``preprocessor_config.json``; so ``pipeline(model=folder)`` would see other pixels than training
    did. A square squash at the model's size, bilinear, with the processor's mean and std, is what
    the saved processor does.
    """
    cfg = getattr(config, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    size = processor.size["height"]
    config.pretrained_cfg = {**cfg, "input_size": [3, size, size], "crop_pct": 1.0, "crop_mode": "squash",
                             "interpolation": "bilinear", "mean": list(processor.image_mean), "std": list(processor.image_std)}


HUB_HELP = (
    "To go on without the Hub: pass --init random to train from scratch, or pass --model "
    "/path/to/checkpoint (a folder saved with save_pretrained, e.g. ../shared/models/efficientnet_lite0-imagenet)."
)


def build_model(spec: ModelSpec, labels: Sequence[str], init: str = "pretrained", image_size: int | None = None):
    """A model with a fresh head for ``labels`` and its image processor.

    ``init="pretrained"`` loads the checkpoint's weights (Hub or local folder) and fails at once,
    with what to do, when the Hub cannot be reached. ``init="random"`` builds the architecture from
    its config (offline for registry models and local folders) with the library's initialisation.
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    if init not in INIT_CHOICES:
        raise ValueError(f"--init must be one of {INIT_CHOICES}, not {init!r}")
    kwargs = label_kwargs(labels)
    local = is_local(spec.checkpoint)
    local_only = False
    if init == "pretrained":
        if not local:
            local_only = check_hub_model(spec.checkpoint, what_to_do=HUB_HELP)
        model = AutoModelForImageClassification.from_pretrained(
            spec.checkpoint, ignore_mismatched_sizes=True, local_files_only=local_only, **kwargs
        )
        mean, std = _mean_std(spec.checkpoint, spec, local_only or local)
    else:
        if spec.config_factory is not None:
            config = spec.config_factory(**kwargs)
        else:
            if not local:
                local_only = check_hub_model(spec.checkpoint, what_to_do="--init random still needs the checkpoint's config; pass a registry name or a local folder.")
            config = AutoConfig.from_pretrained(spec.checkpoint, local_files_only=local_only, **kwargs)
        model = AutoModelForImageClassification.from_config(config)
        _reset_timm_init(model)
        mean, std = spec.mean, spec.std
        if local:
            mean, std = _mean_std(spec.checkpoint, spec, True)
    _set_labels(model.config, labels)
    processor = make_processor(image_size or spec.image_size, mean, std)
    align_timm_eval_transform(model.config, processor)  # every save (checkpoints too) describes it
    return model, processor


def _set_labels(config, labels: Sequence[str]) -> None:
    """Labels flow from the dataset into the config. TimmWrapperConfig saves ``label_names`` and
    ``num_classes`` kept from the checkpoint it was loaded from (1000 ImageNet names) in preference
    to ``id2label``; overwrite them so the saved config carries our labels."""
    for key, value in label_kwargs(labels).items():
        setattr(config, key, value)
    if hasattr(config, "label_names"):
        config.label_names = list(labels)
    if hasattr(config, "num_classes"):
        config.num_classes = len(labels)


# --------------------------------------------------------------------------------------------
# Grad-CAM target layer


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """``"resnet.encoder.stages.-1"`` → ``model.resnet.encoder.stages[-1]`` (negative indices allowed)."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if re.fullmatch(r"-?\d+", part) else getattr(module, part)
    return module


def _layer(model: nn.Module, spec: ModelSpec | None, field: str, position: int, what: str) -> nn.Module:
    """The layer a spec names in ``field``; else timm's feature stage at ``position``; else the
    convolution at ``position`` (a non-negative position is clamped to the last one)."""
    spec = spec if spec is not None and getattr(spec, field) else spec_for_model(model)
    if spec is not None and getattr(spec, field):
        return resolve_layer(model, getattr(spec, field))
    timm_model = getattr(model, "timm_model", None)
    feature_info = getattr(timm_model, "feature_info", None)
    if feature_info:
        return timm_model.get_submodule(feature_info[position if position < 0 else min(position, len(feature_info) - 1)]["module"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__}: no convolutional layer found for {what}")
    return convs[position if position < 0 else min(position, len(convs) - 1)]


def target_layer(model: nn.Module, spec: ModelSpec | None = None) -> nn.Module:
    """The Grad-CAM layer: from the spec; else timm's last feature stage; else the last conv layer."""
    return _layer(model, spec, "target_layer", -1, "Grad-CAM")


def classifier_head(model: nn.Module) -> nn.Module:
    """The classification head (timm: ``get_classifier()``; transformers: ``.classifier``; else the last Linear).
    Its input is the pooled feature vector every architecture computes before the logits."""
    timm_model = getattr(model, "timm_model", None)
    head = timm_model.get_classifier() if timm_model is not None else getattr(model, "classifier", None)
    if head is None:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return head


def logit_layer(model: nn.Module) -> nn.Linear:
    """The linear layer whose outputs are the logits (the last one of :func:`classifier_head`)."""
    head = classifier_head(model)
    linears = [head] if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)]
    n = model.config.num_labels
    if not linears or linears[-1].out_features != n:
        raise ValueError(f"{type(model).__name__}: no linear layer gives its {n} logits, so the temperature cannot go into the weights")
    return linears[-1]


@contextmanager
def temperature_in_weights(model: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """Inside the block the model's logits are divided by ``temperature`` (the logit layer's weight and
    bias scaled) and its config says so: a copy saved there gives calibrated probabilities on every
    path, a Hub ``pipeline``'s plain softmax included. The weights are restored exactly on exit."""
    layer, config = logit_layer(model), model.config
    params = [t for t in (layer.weight, layer.bias) if t is not None]
    saved = [t.detach().clone() for t in params]
    with torch.no_grad():
        for t in params:
            t.div_(temperature)
    config.calibration_temperature, config.temperature_in_weights = float(temperature), True
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, original in zip(params, saved, strict=True):
                t.copy_(original)
        config.temperature_in_weights = False


def temperature_out_of_weights(model: nn.Module) -> float:
    """Undo what a saved folder's :func:`temperature_in_weights` left: the logit layer scaled back up, the config
    saying so. Returns the temperature taken out (1 when the weights held none)."""
    if not getattr(model.config, "temperature_in_weights", False):
        return 1.0
    temperature = float(model.config.calibration_temperature)
    layer = logit_layer(model)
    with torch.no_grad():
        for t in (layer.weight, layer.bias):
            if t is not None:
                t.mul_(temperature)
    model.config.temperature_in_weights = False
    return temperature


def style_layer(model: nn.Module, spec: ModelSpec | None = None) -> nn.Module:
    """An early feature stage (stride about 4) whose per-channel statistics describe how an image
    *looks* (gain, speckle, resolution, texture: the scanner) more than what it shows: from the
    spec; else timm's second feature stage; else the second convolution."""
    return _layer(model, spec, "style_layer", 1, "the in-domain guard")


@contextmanager
def guard_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, for every forward pass run inside the block, each image's per-channel mean and
    standard deviation of :func:`style_layer`'s output, (n, 2 * channels): the features the
    in-domain guard compares, from the same pass that gives the logits (no second forward).

    Why these and not the pooled features before the classifier: those are trained to keep what
    tells the classes apart and drop the rest, including what tells the scanners apart. Measured on
    DDTI and LES3BDD (docs/results-sources.md), early-stage statistics told an unseen source from the
    training source's held-out images far better."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        var, mean = torch.var_mean(output.detach().float(), dim=(2, 3))  # one pass over the map
        captured.append(torch.cat([mean, var.sqrt()], dim=1).cpu())

    handle = style_layer(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
