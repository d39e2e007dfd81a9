"""Training/validation splits by case, written next to the checkpoint as ``split.json``.

Splitting by case (never by patch) keeps every voxel of a validation case out of training. The
split is a function of the sorted case names and the seed, so it is the same on every machine and
every DDP rank; k-fold splits partition the shuffled cases into k nearly equal folds.

Example::

    >>> split = make_split(["a", "b", "c", "d", "e"], folds=5, fold=0, seed=0)
    >>> write_split(split, "run/split.json")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomically
from ..errors import UserError


@dataclass
class Split:
    """Case names for training and for validation, and how they were chosen."""

    train: list[str]
    validation: list[str]
    seed: int = 0
    val_fraction: float | None = None
    folds: int | None = None
    fold: int | None = None


def make_split(names: Sequence[str], val_fraction: float = 0.2, folds: int | None = None,
               fold: int | None = None, seed: int = 0) -> Split:
    """Split ``names`` by a validation fraction, or take fold ``fold`` of ``folds`` as validation.

    ``val_fraction`` 0 puts every case in training (no validation). At least one case always
    stays in training, and a non-zero fraction validates on at least one case.
    """
    names = sorted(names)
    order = [names[index] for index in np.random.default_rng(seed).permutation(len(names))]
    if folds is not None:
        if folds < 2 or fold is None or not 0 <= fold < folds:
            raise UserError(f"k-fold needs --folds K of at least 2 and --fold i with 0 <= i < K, got folds {folds}, "
                            f"fold {fold}")
        if len(names) < folds:
            raise UserError(f"{folds}-fold cross-validation needs at least {folds} cases, found {len(names)}")
        validation = order[fold::folds]
        return Split(_without(names, validation), sorted(validation), seed, None, folds, fold)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    count = 0 if val_fraction == 0 else min(max(1, round(val_fraction * len(names))), len(names) - 1)
    if val_fraction > 0 and count == 0:
        raise UserError(f"only {len(names)} case: validation needs at least 2 (or use --val-fraction 0)")
    validation = order[:count]
    return Split(_without(names, validation), sorted(validation), seed, val_fraction, None, None)


def _without(names: list[str], removed: list[str]) -> list[str]:
    excluded = set(removed)
    return [name for name in names if name not in excluded]


def write_split(split: Split, path: str | os.PathLike) -> Path:
    """Write the split as JSON (atomically) so that the run can be repeated or audited."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, json.dumps(asdict(split), indent=2) + "\n")


def read_split(path: str | os.PathLike) -> Split:
    """Read a ``split.json`` written by :func:`write_split`."""
    path = Path(path)
    try:
        return Split(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot read the split {path} ({error}): delete it to split again") from None
