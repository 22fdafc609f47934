"""Draw docs/preprocessing.jpg: two real DDTI frames before (crop box in red) and after preprocessing.

    python scripts/preprocessing_figure.py [--ddti ../shared/data/ddti] [--out docs/preprocessing.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from thyroid_classifier.preprocess import UltrasoundPreprocessor

FRAMES = ("benign/365_1.jpg", "malignant/118_1.jpg")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ddti", type=Path, default=Path("../shared/data/ddti"))
    parser.add_argument("--out", type=Path, default=Path("docs/preprocessing.jpg"))
    args = parser.parse_args(argv)
    preprocessor = UltrasoundPreprocessor(crop=True, mask_text=True)
    rows = []
    for name in FRAMES:
        original = Image.open(args.ddti / "images" / name).convert("RGB")
        after, box = preprocessor.apply(original)
        before = original.copy()
        ImageDraw.Draw(before).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 40, 40), width=3)
        rows.append((before, after))
    width = max(b.width for b, _ in rows) + max(a.width for _, a in rows) + 30
    height = sum(max(b.height, a.height) for b, a in rows) + 30 * (len(rows) + 1)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 30
    draw.text((10, 8), "before (red: the detected ultrasound region)", fill=(0, 0, 0))
    draw.text((rows[0][0].width + 20, 8), "after: cropped, text and calipers masked", fill=(0, 0, 0))
    for before, after in rows:
        sheet.paste(before, (0, y))
        sheet.paste(after, (before.width + 20, y))
        y += max(before.height, after.height) + 30
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
