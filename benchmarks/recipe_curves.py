"""Fine-tuning recipes on DDTI, seen epoch by epoch: pooled out-of-fold macro ROC AUC after every epoch.

    python benchmarks/recipe_curves.py --out curves.npz [--lr 1e-4] [--epochs 25] [--size 224 | --hw 176x288]
                                       [--tirads_targets] [--tta] [--init random]

`train.py --cv 5` reports one number per recipe (the selected checkpoint of each fold). To *design* a
recipe it helps to see the whole curve: this script uses the project's own pieces (audit, patient-
grouped folds, the validation share carved from each fold's training part, ultrasound crop and
augmentation, discriminative AdamW groups, class-weighted label-smoothed loss, channels-last) in a
plain loop with a fixed cosine schedule, and scores the held-out fold after every epoch, for the raw
weights and for an exponential moving average of them (timm's ModelEmaV3, decay 0.99 per step, as
`train.py --ema_decay`). Each fold's held-out part is scored, never trained on; choosing a recipe
from these curves is still a choice made on the same 349 frames, so the curves are for design, and
the number to report is `train.py --cv`'s.

Options that are not (yet) in train.py, kept here because the resolve notes report them:
`--hw HxW` (non-square input that keeps the frames' aspect), `--tirads_targets` (train on the six
TI-RADS levels of DDTI's manifest, score P(malignant) = P(4a) + ... + P(5)), `--tta` (average with
the horizontally flipped image).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import concatenate_datasets
from timm.utils import ModelEmaV3
from transformers import get_cosine_schedule_with_warmup

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thyroid_classifier.audit import audited_dataset  # noqa: E402
from thyroid_classifier.data import GroupSpec, cv_folds  # noqa: E402
from thyroid_classifier.metrics import macro_auc, softmax  # noqa: E402
from thyroid_classifier.models import build_model, get_spec  # noqa: E402
from thyroid_classifier.preprocess import UltrasoundPreprocessor  # noqa: E402
from thyroid_classifier.training import (  # noqa: E402
    DataArguments,
    ImageTransforms,
    RunArguments,
    class_weights,
    collate,
    make_optimizer,
    with_validation,
)

TIRADS = ["2", "3", "4a", "4b", "4c", "5"]  # 2-3: benign, 4a-5: malignant (DDTI's convention)


class NonSquareTransforms(ImageTransforms):
    """ImageTransforms resized to H x W instead of a square (the same augmentation otherwise)."""

    def __init__(self, preprocessor, processor, hw: tuple[int, int], train: bool, cache: dict) -> None:
        from torchvision.transforms import v2

        super().__init__(preprocessor, processor, hw[0], train, cache)
        h, w = hw
        self.train_size = (w, h)
        self.augment.transforms[1] = v2.RandomResizedCrop(hw, scale=(0.75, 1.0), ratio=(0.8 * w / h, 1.25 * w / h), antialias=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data/ddti/images")
    p.add_argument("--model", default="../shared/models/efficientnet_lite0-imagenet")
    p.add_argument("--manifest", default="../shared/data/ddti/manifest.csv", help="for --tirads_targets")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head_lr_multiplier", type=float, default=10.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ema_decay", type=float, default=0.99)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--hw", default=None, help="non-square input, e.g. 176x288")
    p.add_argument("--tirads_targets", action="store_true")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help=".npz with the per-epoch out-of-fold probabilities")
    a = p.parse_args(argv)

    dataset, _ = audited_dataset(a.data_dir, drop_duplicates="none", near_threshold=8, progress=False,
                                 validation_size=0.0, test_size=0.0, seed=a.seed, groups=GroupSpec())
    full = concatenate_datasets(list(dataset.values())) if len(dataset) > 1 else dataset["train"]
    raw = full.with_format(None)
    y = np.array([int(v) for v in raw["label"]])
    labels = full.features["label"].names
    malignant = labels.index("malignant")
    folds = cv_folds(y, list(raw["group"]), 5, a.seed)
    spec = get_spec(a.model)
    run_args = RunArguments(learning_rate=a.lr, weight_decay=a.weight_decay, head_lr_multiplier=a.head_lr_multiplier)
    tirads = {}
    if a.tirads_targets:
        with open(a.manifest) as f:
            tirads = {Path(r["file"]).name: r["tirads"] for r in csv.DictReader(f)}
    hw = tuple(int(v) for v in a.hw.split("x")) if a.hw else None
    cache: dict = {}
    oof = np.full((a.epochs, len(y), len(labels)), np.nan)
    oof_ema = np.full_like(oof, np.nan)
    started = time.time()
    for k, (pool, held) in enumerate(folds[: a.folds], start=1):
        torch.manual_seed(a.seed + k)
        train = with_validation(full.select([int(i) for i in pool]), DataArguments(), a.seed + k)["train"]
        test = full.select([int(i) for i in held])
        targets = labels
        train_y = [int(v) for v in train.with_format(None)["label"]]
        if a.tirads_targets:
            fine = [TIRADS.index(tirads[Path(path).name]) for path in train.with_format(None)["path"]]
            assert all((f >= 2) == (c == malignant) for f, c in zip(fine, train_y))
            coarse_w = class_weights(train_y, len(labels))  # weight each level by its coarse class
            weights = torch.tensor([float(coarse_w[malignant if i >= 2 else 1 - malignant]) for i in range(len(TIRADS))])
            train = train.remove_columns("label").add_column("label", fine)
            targets = TIRADS
        else:
            weights = class_weights(train_y, len(labels))
        model, processor = build_model(spec, targets, a.init, a.size)
        if hw:
            processor.size = {"height": hw[0], "width": hw[1]}
        model = model.to(memory_format=torch.channels_last)
        prep = UltrasoundPreprocessor()
        make = (lambda train_: NonSquareTransforms(prep, processor, hw, train_, cache)) if hw else (
            lambda train_: ImageTransforms(prep, processor, a.size, train_, cache))
        train.set_transform(make(True), columns=["path", "label"])
        test.set_transform(make(False), columns=["path", "label"])
        optimizer = make_optimizer(model, run_args, a.head_lr_multiplier if a.init == "pretrained" else 1.0)
        loader = torch.utils.data.DataLoader(train, batch_size=a.batch, shuffle=True, collate_fn=collate)
        steps = a.epochs * len(loader)
        schedule = get_cosine_schedule_with_warmup(optimizer, int(a.warmup_ratio * steps), steps)  # Trainer's "cosine"
        ema = ModelEmaV3(model, decay=a.ema_decay)  # what train.py --ema_decay uses
        test_loader = torch.utils.data.DataLoader(test, batch_size=64, collate_fn=collate)

        def predict(m: torch.nn.Module) -> np.ndarray:
            m.eval()
            out = []
            with torch.no_grad():
                for batch in test_loader:
                    x = batch["pixel_values"]
                    prob = m(pixel_values=x).logits.float().softmax(-1)
                    if a.tta:
                        prob = (prob + m(pixel_values=x.flip(-1)).logits.float().softmax(-1)) / 2
                    out.append(prob)
            prob = torch.cat(out).numpy()
            if a.tirads_targets:
                pm = prob[:, 2:].sum(1)
                prob = np.stack([1 - pm, pm], 1) if malignant == 1 else np.stack([pm, 1 - pm], 1)
            return prob

        for epoch in range(a.epochs):
            model.train()
            losses = []
            for batch in loader:
                loss = F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"],
                                       weight=weights, label_smoothing=a.label_smoothing)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                losses.append(loss.item())
                ema.update(model, step=schedule.last_epoch)
            oof[epoch, held], oof_ema[epoch, held] = predict(model), predict(ema.module)
            print(f"fold {k} epoch {epoch + 1}: loss {np.mean(losses):.3f}, held-out AUC {macro_auc(y[held], oof[epoch, held]):.3f} "
                  f"(EMA {macro_auc(y[held], oof_ema[epoch, held]):.3f}), {time.time() - started:.0f} s", flush=True)
    np.savez(a.out, oof=oof, oof_ema=oof_ema, y=y)
    done = ~np.isnan(oof[0, :, 0])
    print("pooled AUC per epoch:", " ".join(f"{macro_auc(y[done], oof[e, done]):.3f}" for e in range(a.epochs)))
    print("pooled AUC per epoch (EMA):", " ".join(f"{macro_auc(y[done], oof_ema[e, done]):.3f}" for e in range(a.epochs)))
    print(f"wall {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
