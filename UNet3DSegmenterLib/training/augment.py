"""Data augmentation on whole batches, on the training device.

Augmenting a batch of tensors where the model runs (a GPU, or the CPU's vector units through
PyTorch) costs little next to the forward and backward passes, and keeps loader workers free for
cutting patches. Spatial changes move image and labels together: flips and 90-degree rotations
exactly, small rotations and scaling through one sampling grid (linear for the image, nearest for
the labels, so labels stay labels). Intensity changes touch the image only.

Rotations happen in millimetres, not voxels, so anisotropic patches are not sheared; when the
spacing is strongly anisotropic (thick slices) they turn only within the slice plane.

Example::

    >>> augment = Augmenter(spacing_zyx=(3.0, 0.8, 0.8))
    >>> images, labels = augment(images, labels, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_ANISOTROPY = 3.0  # beyond this ratio of largest to smallest spacing, rotate within the slice only


class Augmenter:
    """Random flips, rotations, scaling, brightness, contrast, gamma and noise for (image, label) batches.

    Args:
        spacing_zyx: voxel size of the patches in mm, array order.
        enabled: False returns batches untouched (``--no-augment``).
        flip_probability: per axis and sample.
        rotation_degrees: largest small rotation about each axis.
        scale_range: (smallest, largest) zoom factor.
        spatial_probability: chance that a sample is rotated and scaled.
        brightness_range, contrast_range, gamma_range: multiplicative factors and gamma exponent.
        intensity_probability: chance of each intensity change per sample.
        noise_std: largest standard deviation of added Gaussian noise (images are normalised).

    Calling it with ``images`` (b, c, z, y, x) float and ``labels`` (b, z, y, x) integer class
    indices returns augmented copies; ``generator`` (on the batch's device) makes it repeatable.
    """

    def __init__(self, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), enabled: bool = True,
                 flip_probability: float = 0.5, rotation_degrees: float = 15.0,
                 scale_range: tuple[float, float] = (0.85, 1.15), spatial_probability: float = 0.2,
                 brightness_range: tuple[float, float] = (0.75, 1.25),
                 contrast_range: tuple[float, float] = (0.75, 1.25), gamma_range: tuple[float, float] = (0.7, 1.5),
                 intensity_probability: float = 0.15, noise_std: float = 0.1):
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self.enabled = enabled
        self.flip_probability = flip_probability
        self.rotation = math.radians(rotation_degrees)
        self.scale_range, self.spatial_probability = scale_range, spatial_probability
        self.brightness_range, self.contrast_range, self.gamma_range = brightness_range, contrast_range, gamma_range
        self.intensity_probability, self.noise_std = intensity_probability, noise_std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return images, labels
        random = _Random(images.shape[0], images.device, generator)
        images, labels = self._flip(images, labels, random)
        images, labels = self._rotate90(images, labels, random)
        images, labels = self._rotate_and_scale(images, labels, random)
        return self._intensity(images, random), labels

    def _flip(self, images, labels, random: _Random):
        for axis in range(3):
            chosen = random.chance(self.flip_probability)
            images = torch.where(chosen.view(-1, 1, 1, 1, 1), images.flip(axis + 2), images)
            labels = torch.where(chosen.view(-1, 1, 1, 1), labels.flip(axis + 1), labels)
        return images, labels

    def _rotate90(self, images, labels, random: _Random):
        """Quarter turns in the (y, x) plane, where the patch and its voxels are square."""
        if images.shape[-1] != images.shape[-2] or not math.isclose(self.spacing_zyx[1], self.spacing_zyx[2]):
            return images, labels
        turns = random.integers(4)
        rotated_images, rotated_labels = images, labels
        for quarter in range(1, 4):
            chosen = turns == quarter
            rotated_images = torch.where(chosen.view(-1, 1, 1, 1, 1), torch.rot90(images, quarter, (-2, -1)),
                                         rotated_images)
            rotated_labels = torch.where(chosen.view(-1, 1, 1, 1), torch.rot90(labels, quarter, (-2, -1)),
                                         rotated_labels)
        return rotated_images, rotated_labels

    def _rotate_and_scale(self, images, labels, random: _Random):
        chosen = random.chance(self.spatial_probability).nonzero().flatten()
        if not len(chosen):
            return images, labels
        theta = self._sampling_matrices(len(chosen), images.shape[-3:], random)
        grid = F.affine_grid(theta, [len(chosen), 1, *images.shape[-3:]], align_corners=False)
        images, labels = images.clone(), labels.clone()
        images[chosen] = F.grid_sample(images[chosen], grid.to(images.dtype), mode="bilinear",
                                       padding_mode="zeros", align_corners=False)
        moved = F.grid_sample(labels[chosen, None].to(grid.dtype), grid, mode="nearest",
                              padding_mode="zeros", align_corners=False)
        labels[chosen] = moved[:, 0].round().to(labels.dtype)
        return images, labels

    def _sampling_matrices(self, count: int, shape_zyx, random: _Random) -> torch.Tensor:
        """(count, 3, 4) matrices from output to input normalised (x, y, z) coordinates."""
        angles = (random.uniform(count, 3, low=-1.0, high=1.0)) * self.rotation
        if max(self.spacing_zyx) > _ANISOTROPY * min(self.spacing_zyx):
            angles[:, :2] = 0  # thick slices: turn about z only
        rotation = _rotation_matrices(angles)
        scale = random.uniform(count, 1, low=self.scale_range[0], high=self.scale_range[1])
        half_extent = torch.tensor([size * spacing for size, spacing in zip(shape_zyx[::-1], self.spacing_zyx[::-1])],
                                   device=angles.device, dtype=angles.dtype) / 2
        # normalised -> mm, rotate and zoom (a zoom in samples a smaller region), mm -> normalised
        matrix = (rotation / scale[:, :, None]) * half_extent[None, None, :] / half_extent[None, :, None]
        return torch.cat([matrix, torch.zeros(count, 3, 1, device=angles.device, dtype=angles.dtype)], dim=2)

    def _intensity(self, images: torch.Tensor, random: _Random) -> torch.Tensor:
        probability = self.intensity_probability
        factor = torch.where(random.chance(probability), random.uniform(len(images), low=self.brightness_range[0],
                                                                        high=self.brightness_range[1]), 1.0)
        images = images * _per_sample(factor)
        contrast = torch.where(random.chance(probability), random.uniform(len(images), low=self.contrast_range[0],
                                                                          high=self.contrast_range[1]), 1.0)
        mean = images.mean(dim=(1, 2, 3, 4), keepdim=True)
        images = (images - mean) * _per_sample(contrast) + mean
        images = self._gamma(images, random)
        sigma = torch.where(random.chance(probability), random.uniform(len(images), low=0.0, high=self.noise_std), 0.0)
        return images + random.normal(images.shape, images.dtype) * _per_sample(sigma)

    def _gamma(self, images: torch.Tensor, random: _Random) -> torch.Tensor:
        """Gamma on the sample's intensities rescaled to [0, 1], then scaled back to their range."""
        gamma = torch.where(random.chance(2 * self.intensity_probability),
                            random.uniform(len(images), low=self.gamma_range[0], high=self.gamma_range[1]), 1.0)
        low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
        span = images.amax(dim=(1, 2, 3, 4), keepdim=True) - low
        unit = ((images - low) / span.clamp_min(1e-6)).clamp_(0, 1)
        return torch.where(_per_sample(gamma != 1.0), unit.pow(_per_sample(gamma)) * span + low, images)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1, 1)


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotations about x, then y, then z by ``angles`` (n, 3) radians."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows):
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    about_x = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    about_y = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    about_z = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return about_z @ about_y @ about_x


class _Random:
    """Per-sample random draws from one generator on the batch's device."""

    def __init__(self, batch: int, device: torch.device, generator: torch.Generator | None):
        self.batch, self.device, self.generator = batch, device, generator

    def uniform(self, *shape: int, low: float, high: float) -> torch.Tensor:
        values = torch.rand(shape, generator=self.generator, device=self.device)
        return low + (high - low) * values

    def chance(self, probability: float) -> torch.Tensor:
        return torch.rand(self.batch, generator=self.generator, device=self.device) < probability

    def integers(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.batch,), generator=self.generator, device=self.device)

    def normal(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=dtype)
