"""Training cases prepared once, and random patches drawn from them.

Reading, resampling and normalising a volume costs far more than cutting a patch out of it, so each
case is prepared once (and kept in memory, or in a cache folder that later runs reuse) and patches
are then cut from the prepared arrays. A fraction of patches (1/3 by default) is centred on a voxel
of a randomly chosen foreground class, because small structures would otherwise hardly ever be
seen. Where a case is annotated sparsely (voxels of the ``ignore`` label, class index
:data:`~UNet3DSegmenterLib.labels.IGNORE_INDEX` in the target), the other patches are centred on a
random annotated voxel instead of anywhere, so that no patch is spent on voxels without a label.

Each patch is a pure function of ``(seed, sample id)``, where the sampler hands out ids by epoch
and rank. The patches of a run are therefore the same whatever the number of loader workers, a
resumed run sees exactly the patches it would have seen, and DDP ranks never share a patch.

Example::

    >>> loader = get_dataloader("data/images", "data/labels", batch_size=2, patch_size=(64, 64, 64))
    >>> for images, labels in loader:          # (2, 1, 64, 64, 64) float32, (2, 64, 64, 64) int64
    ...     outputs = model(images)
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..atomic import WRITE_STOPPED, atomic_path, write_stopped
from ..datalist import Case, folder_pair, load_case
from ..errors import UserError
from ..labels import IGNORE_INDEX
from ..paths import safe_file_name
from ..preprocess import Preprocessing, normalize, resample_for_model, resample_to_grid
from ..volume import float3, int3

FOREGROUND_FRACTION = 1 / 3
PatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_MAX_LOCATIONS = 200_000  # per class and case: enough to sample from, small for huge CT masks


@dataclass
class PreparedCase:
    """A case ready for sampling: normalised image (c, z, y, x) float32 and class indices (z, y, x).

    ``locations[k]`` holds flat indices of voxels of foreground class ``k + 1`` (a sample of them
    when there are very many); ``annotated`` those of annotated voxels (any class), only where some
    voxels are unannotated (None: every voxel is annotated).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    locations: list[np.ndarray]
    annotated: np.ndarray | None = None


def prepare_case(case: Case, preprocessing: Preprocessing, label_values: Sequence[int],
                 crop_foreground: bool = False, resample_labels: bool = False,
                 label_names: dict[int, str] | None = None, ignore: int | None = None) -> PreparedCase:
    """Read, resample and normalise one case exactly as inference will, and map labels to classes.

    ``label_values[k]`` is the label value of output class ``k``; voxels of the value ``ignore``
    (unannotated) get the class index :data:`IGNORE_INDEX`. With ``crop_foreground`` the
    arrays are cut to the box holding every non-zero image voxel and every label (after
    normalisation, so the intensities are those that inference sees).
    """
    names = label_names if label_names is not None else \
        {int(value): str(value) for value in [*label_values, *([ignore] if ignore is not None else [])]}
    image, labels = load_case(case, names, resample_labels)
    channels = image.array if image.array.ndim == 4 else image.array[None]
    if len(channels) != preprocessing.channels:
        raise UserError(f"case {case.name}: the image {case.image} has {len(channels)} channel(s) where the model "
                        f"takes {preprocessing.channels} (as the first training case has): give every case the "
                        "same channels")
    image = resample_for_model(image.with_array(channels.astype(np.float32, copy=False)), preprocessing, "linear")
    if not labels.same_grid(image):
        labels = resample_to_grid(labels, image, "nearest")
    lookup = np.zeros(int(labels.array.max()) + 1, np.uint8)
    for index, value in enumerate(label_values):
        if value < len(lookup):
            lookup[value] = index
    if ignore is not None and ignore < len(lookup):
        lookup[ignore] = IGNORE_INDEX
    target = lookup[labels.array]
    array = normalize(image.array, preprocessing)
    if crop_foreground:
        box = _nonzero_box(np.any(image.array != 0, axis=0) | ((target > 0) & (target != IGNORE_INDEX)))
        array, target = array[(slice(None), *box)], target[box]
    return _sampled(case.name, np.ascontiguousarray(array), np.ascontiguousarray(target), len(label_values))


def _sampled(name: str, image: np.ndarray, target: np.ndarray, classes: int) -> PreparedCase:
    """The prepared case with the voxel lists that patch sampling draws from."""
    locations = _class_locations(target, classes, name)
    annotated = None
    if np.any(np.asarray(target) == IGNORE_INDEX):
        annotated = _sample_of(np.flatnonzero(np.asarray(target) != IGNORE_INDEX), _case_rng(name))
    return PreparedCase(name, image, target, locations, annotated)


def _nonzero_box(mask: np.ndarray) -> tuple[slice, ...]:
    if not mask.any():
        return tuple(slice(0, size) for size in mask.shape)
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _class_locations(target: np.ndarray, classes: int, name: str) -> list[np.ndarray]:
    rng = _case_rng(name)
    return [_sample_of(np.flatnonzero(target == index), rng) for index in range(1, classes)]


def _case_rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _sample_of(flat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``flat`` indices, or a sorted sample of :data:`_MAX_LOCATIONS` of them."""
    if len(flat) > _MAX_LOCATIONS:
        flat = np.sort(rng.choice(flat, _MAX_LOCATIONS, replace=False))
    return flat.astype(np.int64)


def prepare_cases(cases: Sequence[Case], preprocessing: Preprocessing, label_values: Sequence[int],
                  crop_foreground: bool = False, resample_labels: bool = False,
                  label_names: dict[int, str] | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: Callable[[int, int], None] | None = None, ignore: int | None = None) -> list[PreparedCase]:
    """Prepare every case, from ``cache_dir`` where it already holds them (memory-mapped, so loader
    workers share the pages), else from the files (and store them there); ``ignore`` is the label
    value of unannotated voxels (see :func:`prepare_case`)."""
    prepared = []
    for index, case in enumerate(cases):
        arguments = (case, preprocessing, label_values, crop_foreground, resample_labels, label_names, ignore)
        prepared.append(_cached(cache_dir, *arguments) if cache_dir else prepare_case(*arguments))
        if progress is not None:
            progress(index + 1, len(cases))
    return prepared


def _cached(cache_dir, case: Case, preprocessing: Preprocessing, label_values, crop_foreground,
            resample_labels, label_names, ignore) -> PreparedCase:
    """The prepared case from the cache folder; the key covers the files and every setting."""
    key = hashlib.sha1(json.dumps([
        [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in (case.image, case.label)
    ] + [preprocessing.to_dict(), list(map(int, label_values)), crop_foreground, resample_labels]
        + ([list(case.spacing)] if case.spacing else []) + ([{"ignore": ignore}] if ignore is not None else [])
    ).encode())
    stem = Path(cache_dir) / f"{safe_file_name(case.name)}-{key.hexdigest()[:16]}"
    image_file, target_file = (stem.with_name(stem.name + suffix) for suffix in (".image.npy", ".target.npy"))
    if not (image_file.exists() and target_file.exists()):
        prepared = prepare_case(case, preprocessing, label_values, crop_foreground, resample_labels, label_names,
                                ignore)
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for file, array in ((image_file, prepared.image), (target_file, prepared.target)):
                with atomic_path(file, ".npy") as temporary:  # the target last: its presence means both are whole
                    np.save(temporary, array)
        except OSError as error:
            if error.errno in WRITE_STOPPED:
                raise write_stopped(image_file, error.strerror or str(error)) from None
            raise UserError(f"cannot keep prepared cases in {stem.parent}: {error.strerror or error}; "
                            "choose another --cache-dir") from None
        return prepared
    image, target = np.load(image_file, mmap_mode="r"), np.load(target_file, mmap_mode="r")
    return _sampled(case.name, image, target, len(label_values))


def crop_patch(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """The window of ``patch_size`` at ``start`` (z, y, x) of the last three axes, zero-padded where
    it leaves the array (a start may be negative)."""
    shape = array.shape[-3:]
    inside = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch_size, shape))
    index: tuple = (Ellipsis, *inside)
    window = np.asarray(array[index])
    padding = [(sl.start - s, s + p - sl.stop) for sl, s, p in zip(inside, start, patch_size)]
    if not any(before or after for before, after in padding):
        return window
    return np.pad(window, [(0, 0)] * (array.ndim - 3) + padding)


class PatchDataset(Dataset):
    """Random (image, label) patches from prepared cases, indexed by sample id.

    Args:
        cases: prepared cases.
        patch_size: (z, y, x) voxels.
        foreground_fraction: probability that a patch is centred on a voxel of a random foreground
            class present in its case (otherwise its position is uniform).
        seed: with the sample id, fixes every random choice.
        transform: called as ``transform(image, label)`` on every patch, returns the pair to use
            (see :func:`get_dataloader`).

    Item ``i`` is ``(image (c, z, y, x) float32 tensor, label (z, y, x) int64 tensor of class indices)``.
    """

    # set by get_dataloader: what class k means, and how the images were prepared
    label_values: list[int] | None = None
    preprocessing: Preprocessing | None = None

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int],
                 foreground_fraction: float = FOREGROUND_FRACTION, seed: int = 0,
                 transform: PatchTransform | None = None):
        if not cases:
            raise ValueError("no cases to sample patches from")
        self.cases = list(cases)
        self.patch_size = tuple(int(size) for size in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        self.transform = transform

    def __len__(self) -> int:
        """The number of cases. Any non-negative integer is a valid sample id; :class:`EpochSampler`
        says which ones an epoch uses."""
        return len(self.cases)

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(sample_id)))
        case = self.cases[rng.integers(len(self.cases))]
        start = self.patch_start(case, rng)
        image = crop_patch(case.image, start, self.patch_size)
        label = crop_patch(case.target, start, self.patch_size)
        pair = torch.from_numpy(np.ascontiguousarray(image, np.float32)), torch.from_numpy(label.astype(np.int64))
        return pair if self.transform is None else self._transformed(*pair)

    def _transformed(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user's transform of one patch, checked: a wrong return would otherwise fail far away,
        inside the DataLoader's batching."""
        assert self.transform is not None
        result = self.transform(image, label)
        pair = isinstance(result, tuple) and len(result) == 2
        if not (pair and all(isinstance(item, torch.Tensor) for item in result)):
            raise TypeError(f"the transform {self.transform!r} must return (image, label) as two tensors, "
                            f"got {type(result).__name__}")
        return result

    def patch_start(self, case: PreparedCase, rng: np.random.Generator) -> tuple[int, ...]:
        """Where the patch begins: centred on a random foreground voxel, else on a random annotated
        voxel where the case is annotated sparsely, else uniform."""
        shape = case.target.shape
        low = [min(0, n - p) for n, p in zip(shape, self.patch_size)]
        high = [max(0, n - p) for n, p in zip(shape, self.patch_size)]
        present = [locations for locations in case.locations if len(locations)]
        if present and rng.random() < self.foreground_fraction:
            locations = present[rng.integers(len(present))]
        elif case.annotated is not None and len(case.annotated):
            locations = case.annotated
        else:
            return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high))
        centre = np.unravel_index(locations[rng.integers(len(locations))], shape)
        return tuple(int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.patch_size, low, high))


class EpochSampler(Sampler[int]):
    """Hands out the sample ids of one epoch for one rank: ``samples`` ids, never shared between
    epochs or ranks, starting at ``start`` (to resume mid-epoch).

    Each pass moves to the next epoch by itself; the trainer sets the epoch explicitly.
    """

    def __init__(self, samples: int, rank: int = 0, world_size: int = 1):
        self.samples, self.rank, self.world_size = int(samples), int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        first = (self.epoch * self.world_size + self.rank) * self.samples
        ids = range(first + self.start, first + self.samples)
        self.epoch, self.start = self.epoch + 1, 0
        return iter(ids)

    def __len__(self) -> int:
        return self.samples - self.start


def default_workers() -> int:
    """Loader processes: enough to keep the model fed, leaving most cores to the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // 4)) if cores > 2 else 1


def make_loader(dataset: PatchDataset, sampler: EpochSampler, batch_size: int, workers: int | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose workers prepare batches ahead of the model (``workers=0``: in process)."""
    workers = default_workers() if workers is None else int(workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def get_dataloader(image_dir: str | os.PathLike, label_dir: str | os.PathLike, batch_size: int = 2,
                   transform: PatchTransform | None = None, patch_size: Sequence[int] = (64, 64, 64),
                   spacing: Sequence[float] | None = None, resize: Sequence[int] | None = None,
                   normalization: str = "zscore", window: tuple[float, float] | None = None,
                   batches: int | None = None, foreground_fraction: float = FOREGROUND_FRACTION,
                   crop_foreground: bool = False, cache_dir: str | os.PathLike | None = None,
                   workers: int | None = None, seed: int = 0, resample_labels: bool = False) -> DataLoader:
    """A DataLoader of (image, label) patch batches from a folder pair, for your own training loop.

    Args:
        image_dir, label_dir: folders of volumes with matching file names.
        batch_size: patches per batch.
        transform: your own augmentation or conversion, called in the loader (its workers, when
            there are any: then it must be picklable, e.g. a module-level function or a class
            instance, not a lambda) on every patch as ``transform(image, label)`` with a (c, z, y, x)
            float32 tensor and a (z, y, x) int64 tensor; it returns the ``(image, label)`` to batch.
        patch_size: (z, y, x) voxels.
        spacing: resample to this (x, y, z) spacing in mm first (None keeps each case's own).
        resize: instead of a spacing, resample every case to this (z, y, x) size in voxels.
        normalization: 'zscore' (MR), 'none', or 'ct' (uses a Preprocessing's fixed numbers: pass
            those through the trainer instead).
        window: clip to (low, high) and scale to [0, 1]; replaces ``normalization``.
        batches: batches per pass over the loader (default: enough for one patch per case).
        foreground_fraction: share of patches centred on a labelled voxel of a random class.
        crop_foreground, cache_dir, workers, seed, resample_labels: see :func:`prepare_cases`.

    Images come as (batch, channels, z, y, x) float32, labels as (batch, z, y, x) int64 class
    indices: class ``k`` is the ``k``-th smallest label value found (``loader.dataset.label_values``).
    Every pass draws new patches.

    Example::

        >>> def flip_left_right(image, label):
        ...     return image.flip(-1), label.flip(-1)
        >>> loader = get_dataloader("data/images", "data/labels", 2, transform=flip_left_right)
    """
    datalist = folder_pair(image_dir, label_dir)
    label_values = discover_label_values(datalist.cases)
    preprocessing = Preprocessing(spacing=float3(spacing) if spacing is not None else None,
                                  normalization="window" if window is not None else normalization, clip=window,
                                  size=int3(resize) if resize is not None else None)
    cases = prepare_cases(datalist.cases, preprocessing, label_values, crop_foreground, resample_labels,
                          cache_dir=cache_dir)
    dataset = PatchDataset(cases, patch_size, foreground_fraction, seed, transform)
    dataset.label_values, dataset.preprocessing = label_values, preprocessing
    samples = batch_size * (batches or -(-len(cases) // batch_size))
    return make_loader(dataset, EpochSampler(samples), batch_size, workers)


def discover_label_values(cases: Sequence[Case]) -> list[int]:
    """Every label value used by any case's labelmap (0 always first), read from the files."""
    from ..io import read_volume

    values = {0}
    for case in cases:
        values.update(int(value) for value in np.unique(read_volume(case.label, spacing=case.spacing).array))
    return sorted(values)
