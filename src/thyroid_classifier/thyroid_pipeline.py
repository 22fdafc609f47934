"""The image-classification pipeline every model folder ships, so that a Hub user's
``pipeline("image-classification", model=MODEL, trust_remote_code=True)`` answers as the app does:
not only each class's probability, but the prediction set, the guard's flag, whether a label is
headlined and why (:mod:`answer_rule`, the rule every face of the model uses).

    classifier = pipeline("image-classification", model=MODEL, trust_remote_code=True)
    classifier("frame.png")                   # a frame from a source the model never saw (the default)
    classifier("frame.png", source="ddti")    # a frame from one of its training sources

returns, per image, ``{"answer", "headlined", "reason", "prediction_set", "flagged", "in_domain_score",
"regime", "scores": [{"label", "score"}, ...]}``. The scores are the calibrated probabilities; they are
not an answer unless ``headlined``. A model with TI-RADS descriptor heads adds ``"descriptors"`` (each
descriptor's probabilities by ACR term, its most likely term, the expected ACR points and level, and
``read_from``) and ``"nodule_box"``: read from the square around ``nodule_box=(left, top, right, bottom)`` (the
image's pixels) when given; else, for a model with an outline head, around the nodule it locates ("predicted
nodule"; one more pass either way); else from the whole frame (``nodule_box`` None), as the project's Predictor reads them.

Self-contained on purpose (transformers, torch, numpy, safetensors): it runs as remote code without the
package. With the package installed: ``pipeline(..., pipeline_class=ThyroidImageClassificationPipeline)``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from transformers import ImageClassificationPipeline

from .answer_rule import REGIMES, UNSEEN, Regime, decide, guard_score, regime_of, tirads_level
from .ultrasound_crop import crop_region, located_box, nodule_view

#: How ``config.json``'s ``custom_pipelines`` names this class inside a model folder.
CUSTOM_PIPELINES = {"image-classification": {"impl": "thyroid_pipeline.ThyroidImageClassificationPipeline",
                                             "pt": ["AutoModelForImageClassification"], "tf": [], "type": "image"}}


def _folder_file(name_or_path: str, filename: str) -> str | None:
    """A file of the model's folder (local, or the Hub snapshot), or None when it has none."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


class ThyroidImageClassificationPipeline(ImageClassificationPipeline):
    """``ImageClassificationPipeline`` that decides, like the project's Predictor, whether its answer is one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = getattr(self.model.config, "_name_or_path", "") or ""
        path = _folder_file(name, "reliability.json") if name else None
        state = json.loads(open(path).read()) if path else {}
        self.regimes = {k: Regime.from_dict(v) for k, v in (state.get("regimes") or {}).items() if k in REGIMES}
        self.training_sources = list(state.get("training_sources") or [])
        self.guard = None
        guard = state.get("guard") or {}
        arrays_path = _folder_file(name, "guard.safetensors") if guard.get("layer") else None
        if arrays_path:
            from safetensors.numpy import load_file

            arrays = load_file(arrays_path)
            self.guard = {"layer": self.model.get_submodule(guard["layer"]), "threshold": float(guard["threshold"]),
                          "residual_variance": float(guard["residual_variance"]),
                          **{k: arrays[k].astype(np.float64) for k in ("mean", "components", "variances")}}

        self.descriptors = None
        config_path = _folder_file(name, "descriptors.json") if name else None
        config = json.loads(open(config_path).read()) if config_path else {}
        weights_path = _folder_file(name, "descriptors.safetensors") if config.get("reads") else None
        if weights_path:  # the heads: a linear layer per descriptor on the input of the class head (config["reads"])
            from safetensors.torch import load_file

            weights = load_file(weights_path)
            self.descriptors = {"reads": self.model.get_submodule(config["reads"]), "classes": config["classes"],
                                "heads": {d: (weights[f"heads.{d}.weight"].double(), weights[f"heads.{d}.bias"].double()) for d in config["names"]}}
            if config.get("outline_reads") and "outline.weight" in weights:  # the outline head: where the nodule is, on the Grad-CAM layer's map
                self.descriptors["outline"] = (self.model.get_submodule(config["outline_reads"]), weights["outline.weight"], weights["outline.bias"])

    def _sanitize_parameters(self, source: str | None = None, nodule_box=None, **kwargs: Any):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        # (transformers calls this from __init__ too, before training_sources is read: no source said then.)
        postprocess["regime"] = UNSEEN if source is None else regime_of(source, self.training_sources)  # an unknown source is refused
        if nodule_box is not None:
            preprocess["nodule_box"] = nodule_box
        return preprocess, forward, postprocess

    def preprocess(self, image, timeout=None, nodule_box=None):
        from transformers.image_utils import load_image

        image = load_image(image, timeout=timeout)
        model_inputs = super().preprocess(image)
        if nodule_box is not None and self.descriptors is not None:
            model_inputs["nodule_pixel_values"] = self._square_pixels(image, nodule_box)  # a box outside the image raises, naming the problem
            model_inputs["nodule_box"] = tuple(float(v) for v in nodule_box)
        elif self.descriptors is not None and "outline" in self.descriptors:
            model_inputs["frame"] = image  # where the outline head's map is brought back to, to read the nodule it locates
        return model_inputs

    def _square_pixels(self, image, box) -> torch.Tensor:
        """The nodule's square, resized and normalised as training did (the plain processor: no ultrasound crop of it)."""
        from transformers import ViTImageProcessor

        return ViTImageProcessor.preprocess(self.image_processor, nodule_view(image, box), return_tensors="pt")["pixel_values"].to(self.dtype)

    def _region(self, image) -> tuple[int, int, int, int]:
        """The ultrasound region the processor cropped (the whole image for the plain processor)."""
        p = self.image_processor
        if getattr(p, "ultrasound_crop", False):
            return crop_region(image, True, p.ultrasound_mask_text, p.ultrasound_threshold)[1]
        return (0, 0, *image.size)

    def _forward(self, model_inputs):
        captured: list[torch.Tensor] = []
        features: list[torch.Tensor] = []  # the class head's input: what the descriptor heads read
        nodule = model_inputs.pop("nodule_pixel_values", None)
        box, frame = model_inputs.pop("nodule_box", None), model_inputs.pop("frame", None)
        maps: list[torch.Tensor] = []  # the outline head's input: the Grad-CAM layer's map
        handles = []
        if self.guard is not None:
            def hook(module, args, output):  # the guard's features: per-channel mean and std of an early stage
                var, mean = torch.var_mean(output.detach().float(), dim=(2, 3))
                captured.append(torch.cat([mean, var.sqrt()], dim=1))

            handles.append(self.guard["layer"].register_forward_hook(hook))
        if self.descriptors is not None:
            handles.append(self.descriptors["reads"].register_forward_pre_hook(lambda module, args: features.append(args[0].detach().flatten(1))))
        if frame is not None:
            handles.append(self.descriptors["outline"][0].register_forward_hook(lambda module, args, output: maps.append(output.detach())))
        read_from = "nodule" if nodule is not None else "frame"
        try:
            logits = self.model(**model_inputs).logits
            if frame is not None and maps:
                # Without a box: the nodule the outline head locates (as the project's Predictor), else the whole frame.
                _, weight, bias = self.descriptors["outline"]
                cells = torch.sigmoid(torch.nn.functional.conv2d(maps[0].float(), weight.float(), bias.float()))[0, 0].numpy()
                box = located_box(cells, self._region(frame), frame.size)
                if box is not None:
                    nodule, read_from = self._square_pixels(frame, box), "predicted nodule"
            if nodule is not None:
                self.model(pixel_values=nodule)
        finally:
            for handle in handles:
                handle.remove()
        return {"logits": logits, "guard_features": captured[0] if captured else None,
                "descriptor_features": features[-1] if features else None, "read_from": read_from, "nodule_box": box}

    def _describe(self, features: torch.Tensor, read_from: str) -> dict:
        """Each descriptor's probabilities by ACR term, its most likely term, the expected points and the level (as
        the project's ``descriptors.describe``)."""
        out: dict = {}
        points = 0.0
        x = features.double()[0]
        for name, (weight, bias) in self.descriptors["heads"].items():
            probs = torch.softmax(weight @ x + bias, dim=0).numpy()
            classes = self.descriptors["classes"][name]
            out[name] = {"probabilities": {c["term"]: float(p) for c, p in zip(classes, probs)}, "term": classes[int(np.argmax(probs))]["term"]}
            points += float(sum(c["points"] * p for c, p in zip(classes, probs)))
        out["tirads"] = {"points": points, "level": tirads_level(points)}
        out["read_from"] = read_from
        return out

    def postprocess(self, model_outputs, function_to_apply=None, top_k=None, regime: str = UNSEEN):
        logits = model_outputs["logits"][0].float().numpy().astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()  # the calibration temperature is in the weights
        labels = [self.model.config.id2label[i] for i in range(len(probs))]
        score, flagged = None, False
        if self.guard is not None and model_outputs.get("guard_features") is not None:
            g = self.guard
            score = float(guard_score(model_outputs["guard_features"].numpy(), g["mean"], g["components"], g["variances"], g["residual_variance"])[0])
            flagged = score > g["threshold"]
        answer = decide(probs, labels, self.regimes.get(regime), flagged, regime, self.training_sources)
        ranked = sorted(({"label": label, "score": float(p)} for label, p in zip(labels, probs)), key=lambda d: d["score"], reverse=True)
        out = {"answer": answer.headline, "headlined": answer.headlined, "reason": answer.reason, "prediction_set": answer.prediction_set,
               "flagged": bool(flagged), "in_domain_score": score, "regime": answer.regime, "scores": ranked[: top_k or len(ranked)]}
        if self.descriptors is not None and model_outputs.get("descriptor_features") is not None:
            out["descriptors"] = self._describe(model_outputs["descriptor_features"], model_outputs["read_from"])
            out["nodule_box"] = list(model_outputs["nodule_box"]) if model_outputs.get("nodule_box") is not None else None
        return out
