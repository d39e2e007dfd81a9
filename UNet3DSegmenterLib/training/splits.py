"""Training / validation / test splits by case, written next to the checkpoint as ``split.json``.

Splitting by case (never by patch) keeps every voxel of a validation or test case out of training.
With ``group_by`` (a regular expression) cases whose names share its first captured group (one
subject scanned several times, e.g. ``Case_040_Week5`` and ``Case_040_Week6`` with
``(Case_\\d+)``) are kept together: a subject never falls in two sets or two folds.

A split is a function of the sorted case names, the seed and ``group_by``, so it is the same on
every machine and every DDP rank. The groups are shuffled; validation takes groups from the front
of that order, the test set from its back; k-fold hands the remaining groups, largest first, to
the fold with the fewest cases. Without groups and test cases this is exactly the split of earlier
versions, so an old run's ``--seed`` still draws its old split.

Example::

    >>> split = make_split(["a", "b", "c", "d", "e"], val_fraction=0.2, test_fraction=0.2, seed=0)
    >>> write_split(split, "run/split.json")
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomically
from ..errors import UserError

log = logging.getLogger("UNet3DSegmenterLib")

SET_NAMES = ("train", "validation", "test")


@dataclass
class Split:
    """Case names for training, validation and test, and how they were chosen."""

    train: list[str]
    validation: list[str]
    seed: int = 0
    val_fraction: float | None = None
    folds: int | None = None
    fold: int | None = None
    test: list[str] = field(default_factory=list)
    test_fraction: float | None = None
    group_by: str | None = None


def case_groups(names: Sequence[str], group_by: str | None) -> dict[str, list[str]]:
    """Group key -> sorted case names: the regular expression's first group (or whole match) per case.

    Without ``group_by`` every case is its own group. A name the expression does not match is an error
    rather than a group of its own, which could put one subject on both sides of a split.
    """
    if group_by is None:
        return {name: [name] for name in sorted(names)}
    pattern = compile_group_by(group_by)
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        match = pattern.search(name)
        if match is None:
            raise UserError(f"case {name} does not match --group-by {group_by!r}: write an expression that "
                            "matches every case name, e.g. '^(.+?)_Week' for Case_040_Week5")
        key = next((group for group in match.groups() if group is not None), match.group(0))
        groups.setdefault(key, []).append(name)
    return groups


def compile_group_by(group_by: str) -> re.Pattern:
    """The ``--group-by`` expression, compiled; a clear error when it is not a regular expression."""
    try:
        return re.compile(group_by)
    except re.error as error:
        raise UserError(f"--group-by {group_by!r} is not a valid regular expression ({error})") from None


def make_split(names: Sequence[str], val_fraction: float = 0.2, folds: int | None = None,
               fold: int | None = None, seed: int = 0, test_fraction: float = 0.0,
               group_by: str | None = None) -> Split:
    """Split ``names`` by fractions of the cases, or take fold ``fold`` of ``folds`` as validation.

    ``test_fraction`` of the cases are held out as a test set (with k-fold: out of every fold).
    ``val_fraction`` 0 puts every non-test case in training (no validation). At least one case
    always stays in training, and a non-zero fraction takes at least one case.
    """
    groups = case_groups(names, group_by)
    keys = sorted(groups)
    order = [keys[index] for index in np.random.default_rng(seed).permutation(len(keys))]
    total = sum(len(cases) for cases in groups.values())
    if not 0 <= test_fraction < 1:
        raise UserError(f"the test share must be at least 0 and below 1, got {test_fraction}")
    if folds is not None:
        if folds < 2 or fold is None or not 0 <= fold < folds:
            raise UserError(f"k-fold needs --folds K of at least 2 and --fold i with 0 <= i < K, got folds {folds}, "
                            f"fold {fold}")
        test = _take_from_back(order, groups, _count(test_fraction, total, total - folds, "test"))
        remaining = [key for key in order if key not in test]
        if len(remaining) < folds:
            raise UserError(f"{folds}-fold cross-validation needs at least {folds} "
                            f"{'subjects' if group_by else 'cases'} outside the test set, found {len(remaining)}")
        validation = _fold_partition(remaining, groups, folds)[fold]
        return _split(groups, validation, test, seed, None, folds, fold, test_fraction, group_by)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    if val_fraction > 0 and total < 2:
        raise UserError(f"only {total} case: validation needs at least 2 (or use --val-fraction 0)")
    validation = _take_from_front(order, groups, _count(val_fraction, total, total - 1, "validation"))
    rest = [key for key in order if key not in validation]
    test = _take_from_back(rest, groups, _count(test_fraction, total, total - 1 - _size(validation, groups), "test"))
    if len(validation) + len(test) == len(order):
        raise UserError(f"the {'subjects' if group_by else 'cases'} of this split leave none for training: "
                        "use smaller validation and test shares, or more cases")
    return _split(groups, validation, test, seed, val_fraction, None, None, test_fraction, group_by)


def _count(fraction: float, total: int, most: int, kind: str) -> int:
    """Cases a set of ``fraction`` should hold: at least 1 when the fraction is not 0, at most ``most``."""
    if fraction == 0:
        return 0
    if most < 1:
        raise UserError(f"only {total} cases: too few for a {kind} set besides the others; "
                        f"lower the shares or add cases")
    return min(max(1, round(fraction * total)), most)


def _size(keys: Sequence[str], groups: dict[str, list[str]]) -> int:
    return sum(len(groups[key]) for key in keys)


def _take_from_front(order: list[str], groups: dict[str, list[str]], count: int) -> list[str]:
    """Whole groups from the front of ``order`` until they hold at least ``count`` cases."""
    taken: list[str] = []
    for key in order:
        if _size(taken, groups) >= count:
            break
        taken.append(key)
    return taken


def _take_from_back(order: list[str], groups: dict[str, list[str]], count: int) -> list[str]:
    return _take_from_front(order[::-1], groups, count)


def _fold_partition(order: list[str], groups: dict[str, list[str]], folds: int) -> list[list[str]]:
    """Groups, largest first (a stable sort keeps the shuffled order among equals), each to the
    fold with the fewest cases so far (the first such fold on a tie): single cases go round-robin."""
    partition: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for key in sorted(order, key=lambda key: -len(groups[key])):
        smallest = sizes.index(min(sizes))
        partition[smallest].append(key)
        sizes[smallest] += len(groups[key])
    return partition


def _split(groups: dict[str, list[str]], validation_keys, test_keys, seed: int, val_fraction, folds, fold,
           test_fraction: float, group_by: str | None) -> Split:
    validation = sorted(name for key in validation_keys for name in groups[key])
    test = sorted(name for key in test_keys for name in groups[key])
    held_out = set(validation) | set(test)
    train = sorted(name for cases in groups.values() for name in cases if name not in held_out)
    return Split(train, validation, seed, val_fraction, folds, fold, test, test_fraction or None, group_by)


def write_split(split: Split, path: str | os.PathLike) -> Path:
    """Write the split as JSON (atomically) so that the run can be repeated or audited."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, json.dumps(asdict(split), indent=2) + "\n")


def read_split(path: str | os.PathLike) -> Split:
    """Read a ``split.json`` (written by :func:`write_split`, or by hand with ``train``, ``validation``
    and optionally ``test`` lists of case names); a case in two sets is refused."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        split = Split(**record)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot read the split {path} ({error}): give a split.json with \"train\", "
                        "\"validation\" and \"test\" lists of case names") from None
    for kind in SET_NAMES:
        names = getattr(split, kind)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UserError(f"the split {path}: \"{kind}\" must be a list of case names")
    seen: dict[str, str] = {}
    for kind in SET_NAMES:
        for name in getattr(split, kind):
            if name in seen:
                raise UserError(f"the split {path} puts case {name} in both {seen[name]} and {kind}: "
                                "a case belongs to one set")
            seen[name] = kind
    if not split.train:
        raise UserError(f"the split {path} has no training cases")
    return split


def check_split_cases(split: Split, names: Sequence[str], source: str, data: str) -> None:
    """Check ``split`` (read from ``source``) against the cases of the dataset ``data``.

    A case of the split missing from the data is an error; cases of the data that the split does
    not list are left out of the run, and said so.
    """
    available = set(names)
    listed = [name for kind in SET_NAMES for name in getattr(split, kind)]
    missing = sorted(set(listed) - available)
    if missing:
        raise UserError(f"the split {source} names case {missing[0]} ({len(missing)} missing in all), which is not "
                        f"in {data}: give the data the split was made for")
    left_out = len(available) - len(listed)
    if left_out:
        log.info("%d case(s) of %s are in none of the sets of %s and are left out", left_out, data, source)


def check_groups(split: Split, group_by: str, source: str) -> None:
    """Refuse a split in which one group (subject) has cases in two sets."""
    names = [name for kind in SET_NAMES for name in getattr(split, kind)]
    where = {name: kind for kind in SET_NAMES for name in getattr(split, kind)}
    for key, cases in case_groups(names, group_by).items():
        kinds = sorted({where[name] for name in cases}, key=SET_NAMES.index)
        if len(kinds) > 1:
            raise UserError(f"the split {source} puts subject {key} (by --group-by {group_by!r}) in both "
                            f"{kinds[0]} and {kinds[1]}: move its cases into one set")
