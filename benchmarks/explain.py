"""Predict + Grad-CAM in one pass vs a plain `torch.inference_mode` forward, on this CPU.

    python benchmarks/explain.py [--repeats 5] [--image_size 224] [--models resnet50 vgg19] [--batches 1 16]

Full-size ResNet50 and VGG19 (random weights: speed does not depend on their values), prepared as
the Predictor serves them, measured side by side in one run, interleaved, median of the repeats. Ends with one line per model and batch:
`resnet50 batch 1: 1.04x, with the guard 1.05x, with the descriptor heads 1.00x of that (with an outline head 1.00x), read from a
nodule box 1.40x` (goals: at most 1.15x; predict + explain + guard at most 1.10x; the TI-RADS descriptor heads, read from the same
pass, at most 1.10x of predict + explain + guard; read from a nodule box, given or located by the outline head, they cost one
more plain pass on its square, no goal). The guard's
features are an early stage's per-channel mean and std, captured by a hook in the same pass (``models.guard_features``);
its score is a projection on up to 64 principal directions (``reliability.DomainGuard``, fitted here on random features
of the right width).
The plain use of grad-cam (gradients through the whole network) is printed beside it for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.descriptors import OUTLINE, DescriptorHeads, describe, descriptor_logits, map_channels, pooled_width, read_nodules  # noqa: E402
from thyroid_classifier.explain import freeze, gradcam, linearize_full_kernel_convs, standard_gradcam  # noqa: E402
from thyroid_classifier.models import REGISTRY, build_model, guard_features, target_layer  # noqa: E402
from thyroid_classifier.reliability import DomainGuard  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg19"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.image_size} px, median of {args.repeats}")
    lines = []
    rng = np.random.default_rng(0)
    for name in args.models:
        model, processor = build_model(REGISTRY[name], ["normal", "benign", "malignant"], "random")
        # The model as the Predictor serves it (frozen; VGG's 7x7 "fc6" conv run as a matrix product):
        # the plain forward below uses the very same model.
        linearize_full_kernel_convs(freeze(model))
        layer = target_layer(model)
        with torch.inference_mode(), guard_features(model) as probe:
            model(pixel_values=torch.randn(1, 3, args.image_size, args.image_size))
        width = probe[0].shape[1]
        guard = DomainGuard.fit(torch.randn(200, width).numpy()).calibrate(torch.randn(50, width).numpy())
        heads = DescriptorHeads(pooled_width(model)).eval()
        outlining = DescriptorHeads(pooled_width(model), outline_channels=map_channels(model, args.image_size)).eval()
        for batch in args.batches:
            x = torch.randn(batch, 3, args.image_size, args.image_size)

            def plain():
                with torch.inference_mode():
                    model(pixel_values=x)

            def ours():
                gradcam(model, layer, x)

            def guarded():
                with guard_features(model) as captured:
                    gradcam(model, layer, x)
                guard.flags(torch.cat(captured).numpy())

            def described():
                with guard_features(model) as captured, descriptor_logits(model, heads) as logits:
                    gradcam(model, layer, x)
                guard.flags(torch.cat(captured).numpy())
                describe({k: v.detach() for k, v in logits[0].items()})

            def outlined():  # with an outline head too: its map from the same pass (reading the nodule it locates is a box's pass)
                with guard_features(model) as captured, descriptor_logits(model, outlining) as logits:
                    gradcam(model, layer, x)
                guard.flags(torch.cat(captured).numpy())
                describe({k: logits[0][k].detach() for k in outlining.names})
                torch.sigmoid(logits[0][OUTLINE].detach())

            def boxed():  # a nodule box given for every frame: the heads read its square in one more (plain) pass
                with guard_features(model) as captured:
                    gradcam(model, layer, x)
                guard.flags(torch.cat(captured).numpy())
                describe(read_nodules(model, heads, processor, frames, [box] * batch), read_from="nodule")

            def standard():
                standard_gradcam(model, layer, x, [0] * batch)

            frames = [Image.fromarray(rng.integers(0, 255, (360, 560), dtype=np.uint8)).convert("RGB") for _ in range(batch)]  # DDTI's size
            box = (200, 100, 330, 220)
            plain(), ours(), guarded(), described(), outlined(), boxed(), standard()  # warm-up
            samples = {"plain": [], "one-pass": [], "guarded": [], "described": [], "outlined": [], "boxed": [], "grad-cam plain use": []}
            for _ in range(args.repeats):  # interleaved, so load changes hit all alike
                samples["plain"] += timed(plain, 1)
                samples["one-pass"] += timed(ours, 1)
                samples["guarded"] += timed(guarded, 1)
                samples["described"] += timed(described, 1)
                samples["outlined"] += timed(outlined, 1)
                samples["boxed"] += timed(boxed, 1)
                samples["grad-cam plain use"] += timed(standard, 1)
            med = {k: statistics.median(v) for k, v in samples.items()}
            print(f"  {name} batch {batch}: plain {med['plain'] * 1000:.0f} ms, one-pass predict+explain {med['one-pass'] * 1000:.0f} ms, "
                  f"grad-cam plain use {med['grad-cam plain use'] * 1000:.0f} ms ({med['grad-cam plain use'] / med['plain']:.2f}x)")
            lines.append(f"{name} batch {batch}: {med['one-pass'] / med['plain']:.2f}x, with the guard {med['guarded'] / med['plain']:.2f}x, "
                         f"with the descriptor heads {med['described'] / med['guarded']:.2f}x of that (with an outline head "
                         f"{med['outlined'] / med['guarded']:.2f}x), "
                         f"read from a nodule box {med['boxed'] / med['guarded']:.2f}x")
        del model
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
