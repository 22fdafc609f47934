import csv

import numpy as np
import pytest
from PIL import Image, ImageDraw

from thyroid_classifier.preprocess import UltrasoundPreprocessor, find_ultrasound_box, find_views, marks_mask, to_rgb


def test_crop_finds_the_synthetic_region(sample_dir):
    image = Image.open(sample_dir / "malignant" / "3000_1.png")
    _, box = UltrasoundPreprocessor().apply(image)
    w, h = image.size
    expected = (int(w * 0.06), int(h * 0.03), int(w * 0.86), int(h * 0.84))
    assert np.abs(np.array(box) - expected).max() <= 3, (box, expected)


@pytest.mark.parametrize("name", ["benign/127_1.jpg", "malignant/100_1.jpg", "benign/365_1.jpg"])
def test_crop_removes_text_panels_of_real_frames(ddti_dir, name):
    image = Image.open(ddti_dir / "images" / name)
    cropped, box = UltrasoundPreprocessor().apply(image)
    left, top, right, bottom = box
    # DDTI frames (560x360): settings panel at x >= 528, grey scale bar at x < 20, view label and
    # annotations below y = 312. None may survive the crop; the tissue must.
    assert right <= 528 and left >= 20 and bottom <= 312
    assert (right - left) * (bottom - top) > 0.35 * 560 * 360
    assert cropped.size == (right - left, bottom - top)
    # The panel's white text is gone: no column of the crop's right edge is mostly black with white.
    gray = np.asarray(cropped.convert("L"))
    assert (gray > 15).mean() > 0.7


def test_crop_falls_back_to_whole_image_without_borders():
    flat = np.full((60, 80), 128, np.uint8)
    assert find_ultrasound_box(flat) == (0, 0, 80, 60)
    black = np.zeros((60, 80), np.uint8)
    assert find_ultrasound_box(black) == (0, 0, 80, 60)


def test_mask_text_removes_coloured_and_white_marks():
    rng = np.random.default_rng(0)
    rgb = np.repeat(rng.integers(40, 140, (120, 160, 1), dtype=np.uint8), 3, axis=2)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.line((30, 60, 50, 60), fill=(255, 255, 0), width=1)  # a yellow caliper
    draw.text((90, 50), "12L6", fill=(255, 255, 255))
    assert marks_mask(np.asarray(image)).sum() > 20
    out = np.asarray(UltrasoundPreprocessor(crop=False, mask_text=True)(image))
    assert out[60, 40].max() - out[60, 40].min() < 40  # no longer yellow
    assert (out.min(axis=2) >= 250).sum() == 0  # no pure-white text left


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_to_rgb_handles_every_mode(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 200)
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        assert np.asarray(out).max() > 200  # 16-bit range stretched, not clipped to the low byte


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif)
    assert to_rgb(Image.open(tmp_path / "r.jpg")).size == (20, 40)


def test_settings_round_trip(tmp_path):
    p = UltrasoundPreprocessor(crop=True, mask_text=True, threshold=9)
    p.save_pretrained(tmp_path)
    assert UltrasoundPreprocessor.from_pretrained(tmp_path) == p
    assert UltrasoundPreprocessor.from_pretrained(tmp_path / "nothing") == UltrasoundPreprocessor(crop=False)


def test_split_screens_are_split_at_the_seam(sample_dir):
    """Every split-screen frame of the sample gives two views that meet where its panes meet;
    every single view gives one view, the whole region."""
    rows = list(csv.DictReader((sample_dir / "manifest.csv").open()))
    assert {r["layout"] for r in rows} == {"single", "split"}
    for r in rows:
        image = Image.open(sample_dir / r["file"])
        region, (left, top, right, bottom) = UltrasoundPreprocessor().apply(image)
        views, boxes = UltrasoundPreprocessor(split_views=True).views(image)
        if r["layout"] == "single":
            assert boxes == [(left, top, right, bottom)] and views[0].size == region.size
            continue
        w = image.width
        x0 = int(w * 0.04)
        seam = x0 + (int(w * 0.96) - x0) // 2  # where sample._split_frame joins its panes
        assert len(boxes) == 2 and abs(boxes[0][2] - seam) <= 1, (r["file"], boxes, seam)
        assert boxes[0][2] == boxes[1][0] and boxes[0][0] == left and boxes[1][2] == right
        assert [v.size for v in views] == [(b[2] - b[0], b[3] - b[1]) for b in boxes]
    # Off (the default), or for a plain image that is not wide enough: one view.
    image = Image.open(sample_dir / "malignant" / "3001_1.png")
    assert len(UltrasoundPreprocessor().views(image)[0]) == 1
    assert len(find_views(np.zeros((100, 140), np.uint8))) == 1


@pytest.mark.parametrize("name, n", [("malignant/101_1.jpg", 2), ("benign/127_1.jpg", 2), ("benign/130_1.jpg", 1)])
def test_real_split_screens(ddti_dir, name, n):
    image = Image.open(ddti_dir / "images" / name)
    views, boxes = UltrasoundPreprocessor(split_views=True).views(image)
    assert len(views) == n
    if n == 2:  # DDTI's two views are equal halves
        assert abs((boxes[0][2] - boxes[0][0]) - (boxes[1][2] - boxes[1][0])) <= 4


def test_folders_saved_before_views_were_split_keep_whole_frames(tmp_path):
    (tmp_path / "ultrasound_preprocessing.json").write_text('{"crop": true, "mask_text": false, "threshold": 12}')
    assert UltrasoundPreprocessor.from_pretrained(tmp_path).split_views is False
    UltrasoundPreprocessor(split_views=True).save_pretrained(tmp_path)
    assert UltrasoundPreprocessor.from_pretrained(tmp_path).split_views is True


def test_probe_reads_headers_from_paths_bytes_open_files_and_images_and_prices_the_decode(tmp_path):
    """The decoder's first step, as the app uses it: an open upload is read whole even once its file is
    deleted (the upload clock may run while the request waits), empty and foreign inputs are named,
    a caller's PIL image is left usable, and the price of a decode grows with what it will hold."""
    import io

    from thyroid_classifier.preprocess import MAX_DECODE_SIDE, ImageError, open_image, probe_image

    path = tmp_path / "frame.png"
    Image.new("L", (300, 200), 90).save(path)
    with path.open("rb") as upload:
        path.unlink()  # deleted after it was opened, before it is decoded
        pending = probe_image(upload)
        assert pending.label == "frame.png" and pending.factor == 1
        assert pending.decode().size == (300, 200)
    with pytest.raises(ImageError, match=r"notes.png: empty file \(0 bytes\)"):
        probe_image(io.BytesIO(b""), name="notes.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with empty.open("rb") as f, pytest.raises(ImageError, match=r"empty.png: empty file \(0 bytes\)"):
        probe_image(f)
    with pytest.raises(ImageError, match="text.png: not an image"):
        probe_image(b"just text", name="text.png")
    given = Image.new("RGB", (120, 80), (30, 30, 30))
    assert open_image(given).size == (120, 80)
    assert given.getpixel((0, 0)) == (30, 30, 30)  # the caller's image is still open and whole
    grey, rgba = (probe_image(_png(Image.new(mode, (400, 300)))) for mode in ("L", "RGBA"))
    assert grey.cost < rgba.cost  # 1 byte a pixel decoded vs 4, and RGBA is composited over black:
    assert rgba.cost >= 400 * 300 * 4 * 4  # the decoded image and three copies of its size (convert, background, composite)
    big = probe_image(_png(Image.new("L", (3 * MAX_DECODE_SIDE, 2 * MAX_DECODE_SIDE))))
    assert big.factor == 3 and big.cost >= 3 * MAX_DECODE_SIDE * 2 * MAX_DECODE_SIDE  # at least the full-size decode
    assert max(big.decode().size) <= MAX_DECODE_SIDE


def _png(image: Image.Image) -> bytes:
    import io

    data = io.BytesIO()
    image.save(data, "PNG")
    return data.getvalue()
