"""What the module's self-test (Reload and Test) builds on: a tiny model trained in seconds, phantoms in the scene.

The tiny model is trained with the engine's own loss (``training.losses.build_loss``) and scored
with the engine's own Dice (``metrics.dice``), so that the self-test checks the code users run.
"""

from __future__ import annotations

import math

import numpy as np

from .install import engine
from .scene import addVolumeNode

# Phantom grid (z, y, x) voxels and spacing (x, y, z) mm: small enough to train on a CPU in seconds.
SHAPE = (16, 24, 24)
SPACING = (3.0, 3.0, 4.0)
# An oblique, left-handed direction (LPS columns) to check that geometry survives every step.
DIRECTION = np.array([[0.0, 1.0, 0.0], [math.cos(0.3), 0.0, math.sin(0.3)], [math.sin(0.3), 0.0, -math.cos(0.3)]])


def trainTinyModel(seed: int = 1, iterations: int = 100):
    """A 2-level U-Net (4 features) fitted to one phantom with Dice + cross-entropy: organ Dice about 0.8 on others."""
    import torch

    from ..phantom import PHANTOM_LABELS, make_phantom
    from ..preprocess import normalize
    from ..training.losses import build_loss

    package = engine()
    image, labels = make_phantom(shape=SHAPE, spacing=SPACING, seed=seed, classes=2)
    preprocessing = package.Preprocessing(spacing=SPACING, normalization="zscore")  # as a trained model records it
    inputs = torch.from_numpy(normalize(image.array[None], preprocessing))[None]
    target = torch.from_numpy(labels.array.astype(np.int64))[None]
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and the result is reproducible
    try:
        model = package.UNet3D(in_channels=1, out_channels=3, depth=2, base_width=4)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        loss = build_loss("dicece", classes=3)
        for _ in range(iterations):
            value = loss(model(inputs), target)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    names = [package.Label(0, "background", (0.0, 0.0, 0.0))] + [
        package.Label(value, *PHANTOM_LABELS[value]) for value in (1, 2)]
    return package.Checkpoint.from_model(model.eval(), names, preprocessing, SHAPE)


def addPhantom(seed: int = 2, name: str = "phantom"):
    """A phantom volume node in the scene (oblique, left-handed) and its true labelmap (an engine Volume)."""
    from ..phantom import make_phantom

    image, labels = make_phantom(shape=SHAPE, spacing=SPACING, seed=seed, classes=2, direction=DIRECTION)
    return addVolumeNode(image, name), labels


def dice(labelmap: np.ndarray, truth: np.ndarray, value: int) -> float:
    """The engine's Dice of label ``value`` between two labelmap arrays."""
    from ..metrics import dice as engineDice

    return engineDice(labelmap == value, truth == value)
