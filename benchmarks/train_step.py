"""One training step (forward, backward, AdamW) with the weights in the default (NCHW) memory order
vs channels-last, as `train.py` does by default (`--channels_last`), on this CPU.

    python benchmarks/train_step.py [--models resnet50 ../shared/models/efficientnet_lite0-imagenet] [--image_size 224] [--batch 16] [--repeats 5]

Both layouts are measured in one run, interleaved, median of the repeats (weights are random for
registry names: speed does not depend on their values). Ends with one line per model:
`resnet50: channels-last step 0.52x the time of NCHW`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.models import build_model, get_spec  # noqa: E402


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(pixel_values=x).logits, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "../shared/models/efficientnet_lite0-imagenet"])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.image_size} px")
    summary = []
    for name in args.models:
        spec = get_spec(name)
        init = "pretrained" if os.path.isdir(name) else "random"
        layouts = {}
        for layout in ("nchw", "channels_last"):
            model, _ = build_model(spec, ["benign", "malignant"], init, args.image_size)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            model.train()
            layouts[layout] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        y = torch.randint(0, 2, (args.batch,))
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for layout, (model, opt) in layouts.items():  # warm-up: oneDNN picks its kernels on the first step
            step_seconds(model, opt, x, y)
        for _ in range(args.repeats):
            for layout, (model, opt) in layouts.items():
                times[layout].append(step_seconds(model, opt, x, y))
        nchw, cl = statistics.median(times["nchw"]), statistics.median(times["channels_last"])
        print(f"  {spec.name}: NCHW {nchw * 1000:.0f} ms/step, channels-last {cl * 1000:.0f} ms/step")
        summary.append(f"{spec.name}: channels-last step {cl / nchw:.2f}x the time of NCHW")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
