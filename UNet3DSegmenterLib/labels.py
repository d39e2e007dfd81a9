"""Output classes: value in the labelmap, name, display colour; and colours for labels given none.

Torch-free, so that the Slicer side and the data tools use the same :class:`Label` as checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

# Distinct, readable colours for labels that come without one (RGB in 0..1).
PALETTE = [(0.89, 0.10, 0.11), (0.22, 0.49, 0.72), (0.30, 0.69, 0.29), (0.60, 0.31, 0.64), (1.00, 0.50, 0.00),
           (1.00, 1.00, 0.20), (0.65, 0.34, 0.16), (0.97, 0.51, 0.75), (0.40, 0.76, 0.65), (0.55, 0.63, 0.80)]
BACKGROUND_COLOR = (0.0, 0.0, 0.0)

IGNORE_NAME = "ignore"
"""The label name (nnU-Net's spelling) that marks voxels nobody annotated: sparse annotation."""
IGNORE_INDEX = 255
"""The class index of unannotated voxels in prepared training targets (never an output class)."""


@dataclass
class Label:
    """One output class: its value in the labelmap, its name and its display colour (RGB, 0..1)."""

    value: int
    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)


def default_color(index: int) -> tuple[float, float, float]:
    """The palette colour of the ``index``-th foreground label (1, 2, ...); black for background (0)."""
    return BACKGROUND_COLOR if index == 0 else PALETTE[(index - 1) % len(PALETTE)]


def ignore_value(names: dict[int, str]) -> int | None:
    """The label value named ``ignore`` (any case) in ``names``, or None; ValueError when background
    or more than one value carries the name."""
    values = [value for value, name in names.items() if str(name).strip().lower() == IGNORE_NAME]
    if len(values) > 1:
        raise ValueError(f"labels {values} are all named {IGNORE_NAME!r}: name one label value {IGNORE_NAME!r}")
    if values == [0]:
        raise ValueError(f"label 0 is background and cannot be {IGNORE_NAME!r}: give unannotated voxels a value "
                         "of their own, e.g. 3=ignore")
    return values[0] if values else None
