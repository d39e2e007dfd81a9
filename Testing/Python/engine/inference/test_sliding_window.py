"""Sliding-window inference gives the network's answer everywhere, with no seams between windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from UNet3DSegmenterLib.inference.sliding_window import (
    Cancelled,
    gaussian_weights,
    patchify,
    sliding_window_inference,
    sliding_window_slabs,
    unpatchify,
    window_positions,
    window_starts,
)


def pointwise_model(out_channels: int = 3) -> nn.Module:
    """A 1x1x1 convolution: its output at a voxel depends only on that voxel, so windows must agree."""
    torch.manual_seed(0)
    return nn.Conv3d(1, out_channels, 1).eval()


@given(size=st.integers(1, 200), patch=st.integers(1, 96), overlap=st.floats(0, 0.9))
@settings(max_examples=200, deadline=None)
def test_windows_cover_every_voxel_and_end_at_the_border(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] + patch >= size
    if size > patch:
        assert starts[-1] + patch == size
        assert all(b - a <= patch for a, b in zip(starts, starts[1:]))


def test_default_overlap_grid_matches_the_usual_count():
    assert len(window_positions((160, 192, 192), (96, 96, 96), 0.5)) == 27


def test_volume_equal_to_one_patch_gives_the_plain_forward_result():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    image = torch.randn(1, 16, 24, 32)
    with torch.no_grad():
        expected = model(image[None])[0]
        result = sliding_window_inference(image, model, (16, 24, 32), out_channels=2)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_constant_output_model_gives_a_constant_map():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2, *x.shape[2:]), 0.75)

    result = sliding_window_inference(torch.randn(1, 40, 37, 50), Constant(), (16, 16, 16), 2, overlap=0.6)
    torch.testing.assert_close(result, torch.full_like(result, 0.75))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_overlap_blending_has_no_seams(overlap):
    model = pointwise_model()
    image = torch.randn(1, 45, 38, 61)
    with torch.no_grad():
        expected = model(image[None])[0]
        result = sliding_window_inference(image, model, (16, 16, 16), 3, overlap=overlap, batch_size=3)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    model = pointwise_model()
    image = torch.randn(1, 5, 9, 30)
    with torch.no_grad():
        result = sliding_window_inference(image, model, (16, 16, 16), 3)
        expected = model(image[None])[0]
    assert result.shape == (3, 5, 9, 30)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_mirroring_a_pointwise_model_changes_nothing():
    model = pointwise_model()
    image = torch.randn(1, 20, 20, 20)
    with torch.no_grad():
        plain = sliding_window_inference(image, model, (16, 16, 16), 3)
        mirrored = sliding_window_inference(image, model, (16, 16, 16), 3, mirror=True)
    torch.testing.assert_close(plain, mirrored, rtol=1e-5, atol=1e-5)


def test_progress_reports_every_batch_and_cancel_stops():
    calls = []
    model = pointwise_model()
    image = torch.randn(1, 32, 32, 32)
    with torch.no_grad():
        sliding_window_inference(image, model, (16, 16, 16), 3, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (27, 27) and [done for done, _ in calls] == sorted(done for done, _ in calls)
    with pytest.raises(Cancelled), torch.no_grad():
        sliding_window_inference(image, model, (16, 16, 16), 3, cancel=lambda: len(calls) > 0)


def test_patchify_then_unpatchify_returns_the_volume():
    array = np.random.default_rng(0).random((2, 30, 41, 17)).astype(np.float32)
    patches, positions = patchify(array, (16, 16, 16), overlap=0.5)
    assert patches.shape[1:] == (2, 16, 16, 16)
    for weighting in ("gaussian", "constant"):
        restored = unpatchify(patches, positions, array.shape[1:], weighting=weighting)
        np.testing.assert_allclose(restored.numpy(), array, rtol=1e-5, atol=1e-6)


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    weights = gaussian_weights((16, 20, 24))
    assert weights.max() == 1.0 and weights.min() > 0
    assert weights[8, 10, 12] > weights[0, 0, 0]


@pytest.mark.parametrize("shape, batch_size, overlap", [
    ((45, 38, 61), 2, 0.5), ((45, 38, 61), 3, 0.25), ((70, 16, 16), 4, 0.5), ((33, 20, 16), 5, 0.8), ((5, 9, 30), 2, 0.5),
])
def test_slabs_hold_the_whole_volume_accumulator_values(shape, batch_size, overlap):
    """Streaming changes where sums live, not what they are: every voxel adds the same windows in order."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    image = torch.randn(1, *shape)
    with torch.no_grad():
        patches, positions = patchify(image, (16, 16, 16), overlap)
        expected = unpatchify(model(patches), positions, shape)
        result = sliding_window_inference(image, model, (16, 16, 16), 3, overlap=overlap, batch_size=batch_size)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


def test_slabs_follow_each_other_and_hold_one_band_of_windows():
    model = pointwise_model()
    image = torch.randn(1, 100, 40, 40)
    with torch.no_grad():
        expected = model(image[None])[0]
        slabs = [(z, slab.clone()) for z, slab in sliding_window_slabs(image, model, (16, 16, 16), 3)]
        sums = [slab.clone() for _, slab in sliding_window_slabs(image, model, (16, 16, 16), 3, normalize=False)]
    starts = [z for z, _ in slabs]
    assert starts[0] == 0 and starts == sorted(starts) and len(slabs) == len(window_starts(100, 16, 0.5))
    assert all(slab.shape[1] <= 16 for _, slab in slabs)  # a band of one row of windows, never the volume
    torch.testing.assert_close(torch.cat([slab for _, slab in slabs], dim=1), expected, rtol=1e-5, atol=1e-5)
    for (_, average), total in zip(slabs, sums):
        assert torch.equal(average.argmax(0), total.argmax(0))  # unnormalised sums: the same labels
