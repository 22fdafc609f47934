"""Machine differences as augmentation and as fixed evaluation shifts."""

from __future__ import annotations

import pytest
import torch

from thyroid_classifier.augment import DeviceAugment, depth_gain, device_shifts, draw_marks, gamma, low_resolution


@pytest.fixture
def frame() -> torch.Tensor:
    torch.manual_seed(0)
    grey = torch.rand(1, 64, 80) * 0.6 + 0.1  # speckle-like, away from 0 and 1
    return grey.expand(3, -1, -1).clone()


def test_every_shift_keeps_shape_and_range_changes_the_image_and_is_repeatable(frame):
    for name, shift in device_shifts().items():
        out = shift(frame)
        assert out.shape == frame.shape and out.dtype == frame.dtype, name
        assert 0 <= float(out.min()) and float(out.max()) <= 1, name
        assert not torch.allclose(out, frame, atol=1e-3), name
        assert torch.equal(out, shift(frame)), name  # the same image gets the same shift every time
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]), name  # stays grey


def test_shifts_do_what_their_names_say(frame):
    assert gamma(frame, 1.5).mean() < frame.mean() < gamma(frame, 1 / 1.5).mean()
    ramp = depth_gain(torch.full((3, 10, 4), 0.5), 0.7, 1.3)
    assert ramp[0, 0, 0] == pytest.approx(0.35) and ramp[0, -1, 0] == pytest.approx(0.65)
    blurred = low_resolution(frame, 0.4)
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * frame.diff(dim=-1).abs().mean()  # fine detail is gone
    marked = draw_marks(frame, 4, torch.Generator().manual_seed(1))
    changed = (marked != frame).any(dim=0)
    assert 0 < float(changed.float().mean()) < 0.05  # a few thin marks
    assert torch.all(marked[:, changed] == 1.0)  # burned-in white


def test_device_augment_is_random_and_off_at_p0(frame):
    assert torch.equal(DeviceAugment(p=0.0)(frame), frame)
    torch.manual_seed(3)
    aug = DeviceAugment(p=1.0)
    a, b = aug(frame), aug(frame)
    assert a.shape == frame.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.allclose(a, frame, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)
