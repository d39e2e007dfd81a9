"""Segment a volume with a checkpoint: preprocess, sliding window, back to the input grid.

This is the one pipeline that the command line, the Python API and the Slicer module all call::

    predictor = Predictor("hippocampus.pt")
    result = predictor.predict(read_volume("case.nii.gz"))
    write_volume(result.labelmap, "case_seg.nii.gz")

An ensemble (an ensemble file, a folder of fold checkpoints, or a list of checkpoints) is averaged
per volume: each network runs its whole sliding window exactly as it would alone, and its softmax
probabilities are added to one running sum on the preprocessed grid. Memory is that of one network's
prediction plus one sum, whatever the number of networks; an ensemble of one network is that network.

Before any work, what is to be segmented (the whole volume, or the voxels inside a region of
interest, see roi.py) is compared with the checkpoint's training fingerprint (fingerprint.py): an
input far outside what the network was trained on is segmented all the same, with a warning
(logged, passed to ``warn``, and kept on the :class:`Prediction`).

Asked for, the prediction also says where it is unsure (``uncertainty='entropy'`` or
``'probability'``, see :func:`~UNet3DSegmenterLib.inference.postprocess.uncertainty_from_probabilities`):
computed from the same averaged logits as the labelmap, slab by slab, with no second pass; its
memory is one float volume (and its copy on the input grid where that differs from the model's).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import nnunet_preprocess
from ..checkpoint import Checkpoint, CheckpointSource, Ensemble, load_checkpoint, members_of
from ..choices import UNCERTAINTIES, check_choice
from ..errors import UserError
from ..preprocess import preprocess_image
from ..roi import RegionOfInterest, crop, paste
from ..runtime import resolve_device, resolve_precision, reuse_freed_memory
from ..segment_options import SegmentOptions
from ..volume import Volume
from .calibration import CalibratedForward
from .fast import freeze
from .postprocess import (
    keep_largest_component,
    label_dtype,
    labelmap_from_probabilities,
    labelmap_on_grid,
    probabilities_on_grid,
    uncertainty_from_logits,
    uncertainty_from_probabilities,
    uncertainty_on_grid,
)
from .sliding_window import CancelCheck, ProgressCallback, WindowGrid, sliding_window_slabs, window_positions

log = logging.getLogger("UNet3DSegmenterLib")


WarningCallback = Callable[[str], None]


@dataclass
class Prediction:
    """A segmentation on the input's grid, the class probabilities and the uncertainty (one float
    volume) when asked for, and the warnings about the input (one plain line each; see fingerprint.py)."""

    labelmap: Volume
    probabilities: Volume | None = None
    warnings: list[str] = field(default_factory=list)
    uncertainty: Volume | None = None


class Predictor:
    """Segments volumes with a checkpoint or an ensemble; build once, call :meth:`predict` for each volume.

    Args:
        checkpoint: a :class:`Checkpoint` or :class:`Ensemble`, the path of a ``.pt`` file, a folder
            of checkpoints (e.g. a cross-validation's output), or a list of paths (an ensemble).
        options: how to segment (:class:`~UNet3DSegmenterLib.segment_options.SegmentOptions`);
            ``keywords`` replace single options: ``device`` ('auto', 'cpu', 'cuda', 'mps'),
            ``overlap`` (window overlap in [0, 1); default from the checkpoint, usually 0.5),
            ``batch_size`` (windows per forward pass; default 2 on the CPU, 4 on a GPU, 1 for an
            nnU-Net model), ``tta`` (average over the eight axis flips, 8x slower),
            ``largest_component`` (keep only the largest connected component of each class),
            ``precision`` ('auto': bfloat16 on CPUs with native bf16, fp16 autocast on CUDA, else fp32;
            'fp32', 'bf16', 'fp16') and ``roi`` (six numbers, two corners in RAS mm: :meth:`predict`
            segments inside that box).
            ``output_format``, ``series_filter`` and ``shard`` pick and name the cases of a folder for
            ``predict`` (see batch.py); one volume at a time, a Predictor has no use for them.

    Example::

        >>> Predictor("model.pt", device="cpu", largest_component=True).predict(read_volume("ct.nii.gz"))
    """

    def __init__(self, checkpoint: Checkpoint | Ensemble | CheckpointSource, options: SegmentOptions | None = None,
                 **keywords: Any):
        self.options = (options or SegmentOptions()).with_keywords(**keywords)
        self.checkpoint = checkpoint if isinstance(checkpoint, (Checkpoint, Ensemble)) else load_checkpoint(checkpoint)
        self.members = members_of(self.checkpoint)
        self.device = resolve_device(self.options.device)
        self.overlap = self.options.overlap_for(self.checkpoint)
        if not 0 <= self.overlap < 1:
            raise UserError(f"overlap must be at least 0 and below 1, got {self.overlap}")
        self.batch_size = self.options.batch_size or _default_batch_size(self.device, self.checkpoint)
        self.tta = self.options.tta
        self.largest_component = self.options.largest_component
        self.precision = self.options.precision
        self.model_name = _model_name(checkpoint)  # recorded in DICOM SEG outputs
        self._models = [freeze(member.build_model(share_weights=True)) for member in self.members]
        self._prepared: dict = {}

    def predict(self, volume: Volume, probabilities: bool = False, progress: ProgressCallback | None = None,
                cancel: CancelCheck | None = None, roi: RegionOfInterest | None = None,
                warn: WarningCallback | None = None, uncertainty: str | None = None) -> Prediction:
        """Segment ``volume``, or only its voxels inside ``roi`` (default: the options' ``roi``); the labelmap
        (and probabilities) lie on exactly its grid, 0 (background) outside the ROI.


        ``uncertainty`` ('entropy' or 'probability') also returns that measure per voxel on the same
        grid (outside the ROI: entropy 0, probability 1, as for a sure background).

        Each warning about the input goes to ``warn(line)`` (default: the ``UNet3DSegmenterLib`` logger)
        before the work starts, and is kept in ``Prediction.warnings``.
        """
        self._check_input(volume)
        if uncertainty is not None:
            check_choice(uncertainty, UNCERTAINTIES, "uncertainty measure")
        roi = roi if roi is not None else self.options.region()
        block = roi.block(volume) if roi is not None else None
        region = crop(volume, block) if block is not None else volume
        warnings = self.input_warnings(region)
        for warning in warnings:
            (warn or log.warning)(warning)
        result = self._segment(region, probabilities, progress, cancel, uncertainty)
        result.warnings = warnings
        if block is None:
            return result
        background = [1.0 if label.value == 0 else 0.0 for label in self.checkpoint.labels]
        return Prediction(volume.with_array(paste(result.labelmap.array, volume, block)),
                          None if result.probabilities is None else
                          volume.with_array(paste(result.probabilities.array, volume, block, background)),
                          warnings,
                          None if result.uncertainty is None else
                          volume.with_array(paste(result.uncertainty.array, volume, block,
                                                  1.0 if uncertainty == "probability" else 0.0)))

    def input_warnings(self, volume: Volume) -> list[str]:
        """How ``volume`` lies far outside the images the network was trained on (none known: [])."""
        fingerprint = self.checkpoint.fingerprint
        return fingerprint.warnings(volume) if fingerprint is not None else []

    def _segment(self, volume: Volume, probabilities: bool, progress, cancel,
                 uncertainty: str | None = None) -> Prediction:
        """The pipeline proper: preprocess, sliding window, back to ``volume``'s grid."""
        if self.checkpoint.preprocessing.nnunet is not None:
            return self._segment_as_nnunet(volume, self.checkpoint.preprocessing.nnunet, probabilities, progress,
                                           cancel)
        preprocessed = preprocess_image(volume, self.checkpoint.preprocessing)
        values = [label.value for label in self.checkpoint.labels]
        image = torch.from_numpy(preprocessed.array)
        on_input = None
        unsure: np.ndarray | None = None
        if probabilities or len(self.members) > 1 or not preprocessed.same_grid(volume):
            on_model_grid = preprocessed.with_array(self._probabilities(image, progress, cancel))
            if uncertainty is not None:
                unsure = uncertainty_from_probabilities(on_model_grid.array, uncertainty)
            if probabilities:
                on_input = probabilities_on_grid(on_model_grid, volume)
                labelmap = labelmap_from_probabilities(on_input.array, values)
            else:  # on the model's grid already, or resampled block by block
                labelmap = labelmap_on_grid(on_model_grid, volume, values)
        elif uncertainty is not None:  # both from the averaged logits, slab by slab
            output = _LabelmapAndUncertainty(values, preprocessed.shape, uncertainty)
            labelmap = self._infer(image, 0, output, progress, cancel)
            unsure = output.uncertainty
        else:  # the labelmap straight from the sums of logits, slab by slab: no class-sized volume in memory
            labelmap = self._infer(image, 0, _Labelmap(values, preprocessed.shape), progress, cancel)
        if self.largest_component:
            labelmap = keep_largest_component(labelmap, values)
        measured = None if unsure is None else uncertainty_on_grid(preprocessed.with_array(unsure), volume)
        return Prediction(volume.with_array(labelmap), on_input if probabilities else None, uncertainty=measured)

    def _segment_as_nnunet(self, volume: Volume, plan: dict, probabilities: bool, progress, cancel) -> Prediction:
        """A model trained by nnU-Net: its preprocessing, its window grid and weights, the networks' logits
        averaged (as nnU-Net averages folds), its export back to ``volume``'s grid (nnunet_preprocess.py)."""
        prepared = nnunet_preprocess.prepare(volume, plan)
        classes, total = len(self.checkpoint.labels), None
        padded = [nnunet_preprocess.pad_to_patch(prepared.array, member.patch_size) for member in self.members]
        windows = [len(self._nnunet_windows(member).positions(array.shape[1:], member.patch_size))  # type: ignore[misc]
                   for member, (array, _) in zip(self.members, padded)]
        for member, (array, unpad) in enumerate(padded):
            report = None if progress is None else _offset_progress(progress, sum(windows[:member]), sum(windows))
            logits = self._infer(torch.from_numpy(array), member, _Logits(classes, array.shape[1:]), report, cancel)
            logits = logits[(slice(None), *unpad)]
            total = logits if total is None else np.add(total, logits, out=total)  # float16, as nnU-Net sums folds
        assert total is not None
        if len(self.members) > 1:
            total /= np.float16(len(self.members))
        values = [label.value for label in self.checkpoint.labels]
        labelmap, on_input = nnunet_preprocess.labels_back(total, prepared, plan, values, probabilities)
        if self.largest_component:
            labelmap = keep_largest_component(labelmap, values)
        return Prediction(volume.with_array(labelmap),
                          None if on_input is None else volume.with_array(on_input))

    def _nnunet_windows(self, member: Checkpoint) -> WindowGrid:
        """nnU-Net's window corners (its step is 1 - overlap), its Gaussian and the mirroring axes its
        trainer allowed."""
        plan = member.preprocessing.nnunet
        assert plan is not None
        step = 1 - self.overlap

        def positions(shape, patch_size) -> list[tuple[int, ...]]:
            return list(itertools.product(*(nnunet_preprocess.window_starts(size, patch, step)
                                            for size, patch in zip(shape, patch_size))))

        return WindowGrid(positions, torch.from_numpy(nnunet_preprocess.gaussian_weights(member.patch_size)),
                          tuple(plan["mirror_axes"] or ()), accumulate_dtype=torch.float16)

    def _check_input(self, volume: Volume) -> None:
        expected = self.checkpoint.in_channels
        if volume.channels != expected:
            kind = "a 3D scalar volume" if volume.channels == 1 else f"{volume.channels} channels (4D or multi-component)"
            raise UserError(f"the input has {kind}, but the checkpoint expects {expected} channel(s)")
        if min(volume.shape) < 2:
            raise UserError(f"the input is {volume.shape} voxels (z, y, x): a 3D volume is needed")

    def _probabilities(self, image: torch.Tensor, progress, cancel) -> np.ndarray:
        """Softmax probabilities (classes, z, y, x) on the preprocessed grid, averaged over the networks."""
        windows = [len(window_positions(image.shape[-3:], member.patch_size, self.overlap)) for member in self.members]
        classes, total = len(self.checkpoint.labels), None
        for member in range(len(self.members)):
            report = None if progress is None else _offset_progress(progress, sum(windows[:member]), sum(windows))
            probabilities = self._infer(image, member, _Probabilities(classes, image.shape[-3:]), report, cancel)
            total = probabilities if total is None else np.add(total, probabilities, out=total)
        assert total is not None
        if len(self.members) > 1:
            total /= len(self.members)
        return total

    def _infer(self, image: torch.Tensor, member: int, output: _Output, progress, cancel) -> np.ndarray:
        """Sliding window on the chosen device; on CUDA out-of-memory fall back step by step, and say so."""
        if self.device.type != "cuda":
            return self._sliding_window(image, member, self.device, self.device, output, progress, cancel)
        plans = [(self.device, self.device), (self.device, torch.device("cpu")),
                 (torch.device("cpu"), torch.device("cpu"))]
        for attempt, (compute, accumulate) in enumerate(plans):
            try:
                return self._sliding_window(image, member, compute, accumulate, output, progress, cancel)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if attempt == len(plans) - 1:
                    raise
                following = plans[attempt + 1]
                log.warning("GPU out of memory; retrying with %s",
                            "the accumulator on the CPU" if following[0].type == "cuda" else "the CPU only")
        raise AssertionError("unreachable")

    def _sliding_window(self, image: torch.Tensor, member: int, compute: torch.device, accumulate: torch.device,
                        output: _Output, progress, cancel) -> np.ndarray:
        dtype = resolve_precision(self.precision, compute)
        forward = self._prepared_model(compute, dtype, member)
        network = self.members[member]
        keep_freed = compute.type == "cpu" and _reuse_pays(self._models[member], self.batch_size,
                                                           network.patch_size, dtype)
        with torch.inference_mode(), reuse_freed_memory() if keep_freed else contextlib.nullcontext():
            # the image lives where the sums do: with sums on the CPU, only each batch visits the GPU
            windows = self._nnunet_windows(network) if network.preprocessing.nnunet is not None else None
            try:
                for z, slab in sliding_window_slabs(
                        image.to(accumulate), forward, network.patch_size, len(self.checkpoint.labels),
                        overlap=self.overlap, batch_size=self.batch_size, mirror=self.tta,
                        accumulate_device=accumulate, normalize=output.normalized, progress=progress, cancel=cancel,
                        windows=windows):
                    output.write(z, slab)
            finally:
                if len(self.members) > 1:  # the members take turns: one set of working buffers at a time
                    forward.release_memory()
        return output.array

    def _prepared_model(self, device: torch.device, dtype: torch.dtype, member: int = 0):
        """Network ``member`` on ``device`` in ``dtype``, run the fastest way measured here (see calibration)."""
        key = (str(device), dtype, member)
        if key not in self._prepared:
            self._prepared[key] = CalibratedForward(self._models[member], device, dtype)
        return self._prepared[key]


_REUSE_LIMIT = 128 * 2**20  # bytes of a batch's first activation, above which freed memory is given back


def _reuse_pays(model: torch.nn.Module, batch_size: int, patch_size: Sequence[int], dtype: torch.dtype) -> bool:
    """Whether to keep freed activations in the heap for the next batch (runtime.reuse_freed_memory).

    For small batches it pays: faulting in fresh pages took a third of the bundled model's forward
    pass. For large ones it does not: a full-size nnU-Net network on a 24x256x256 window (200 MB at
    its first convolution) spends its time convolving, and its activations, of many sizes, kept side
    by side, fragmented the heap far above what is ever in use at once. The size of the first
    convolution's output tells the two apart (a 2x96^3 batch of 16 channels in float32 is 113 MB)."""
    first = next((module for module in model.modules() if isinstance(module, torch.nn.Conv3d)), None)
    channels = first.out_channels if first is not None else 1
    return batch_size * math.prod(patch_size) * channels * dtype.itemsize <= _REUSE_LIMIT


def _default_batch_size(device: torch.device, checkpoint: Checkpoint | Ensemble) -> int:
    """Windows per forward pass unless asked: one for a model trained by nnU-Net, as nnU-Net runs it
    (its windows are sized to fill a GPU in training; on the CPU two at a time made the same speed and
    a compiled network of twice the memory); otherwise 4 on a GPU and 2 on the CPU."""
    if checkpoint.preprocessing.nnunet is not None:
        return 1
    return 4 if device.type == "cuda" else 2


def _offset_progress(progress: ProgressCallback, before: int, total: int) -> ProgressCallback:
    """One network's window count as part of the whole ensemble's, ``before`` windows already done."""
    return lambda done, _: progress(before + done, total)


class _Output:
    """Where the finished slabs of the sliding window go."""

    normalized: bool  # whether it needs the weighted averages, or the weighted sums are enough
    array: np.ndarray

    def write(self, z: int, slab: torch.Tensor) -> None:
        raise NotImplementedError


class _Labelmap(_Output):
    """Label values by argmax, written slab by slab into one labelmap."""

    normalized = False

    def __init__(self, values: list[int], shape: tuple[int, ...]):
        self.values = values
        self.array = np.empty(shape, label_dtype(values))

    def write(self, z: int, slab: torch.Tensor) -> None:
        self.array[z: z + slab.shape[1]] = labelmap_from_probabilities(slab, self.values)


class _LabelmapAndUncertainty(_Labelmap):
    """Label values by argmax and the uncertainty of the softmax, from the averaged logits of each slab."""

    normalized = True

    def __init__(self, values: list[int], shape: tuple[int, ...], measure: str):
        super().__init__(values, shape)
        self.measure = measure
        self.uncertainty = np.empty(shape, np.float32)

    def write(self, z: int, slab: torch.Tensor) -> None:
        super().write(z, slab)
        self.uncertainty[z: z + slab.shape[1]] = uncertainty_from_logits(slab, self.measure)


class _Probabilities(_Output):
    """Class probabilities (softmax of the averaged logits), written slab by slab."""

    normalized = True

    def __init__(self, classes: int, shape: tuple[int, ...]):
        self.array = np.empty((classes, *shape), np.float32)

    def write(self, z: int, slab: torch.Tensor) -> None:
        self.array[:, z: z + slab.shape[1]] = torch.softmax(slab, dim=0).cpu().numpy()


class _Logits(_Output):
    """The weighted averages of the logits in float16, written slab by slab: nnU-Net's models average
    logits, and nnU-Net keeps them in float16."""

    normalized = True

    def __init__(self, classes: int, shape: tuple[int, ...]):
        self.array = np.empty((classes, *shape), np.float16)

    def write(self, z: int, slab: torch.Tensor) -> None:
        self.array[:, z: z + slab.shape[1]] = slab.cpu().numpy()


def predict_file(predictor: Predictor, input_path: Path, output_path: Path,
                 probabilities_path: Path | None = None, progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None, spacing: Sequence[float] | None = None,
                 roi: RegionOfInterest | None = None, warn: WarningCallback | None = None) -> Prediction:
    """Read, segment and write one case; outputs are written only once the whole case succeeded.

    ``spacing`` (x, y, z) in mm is that of a ``.npy`` input, which records none (default 1 mm);
    ``roi`` and ``warn`` are those of :meth:`Predictor.predict`.
    """
    from ..io import read_volume

    result = predictor.predict(read_volume(input_path, spacing=spacing), probabilities=probabilities_path is not None,
                               progress=progress, cancel=cancel, roi=roi, warn=warn)
    _write_outputs(result, output_path, probabilities_path, _SegSource(input_path, predictor))
    return result


def predict_files(predictor: Predictor, cases: Sequence[tuple[Path, Path, Path | None]],
                  progress: Callable[[int], ProgressCallback | None] | None = None,
                  spacing: Sequence[float] | None = None, roi: RegionOfInterest | None = None,
                  warn: Callable[[int], WarningCallback | None] | None = None,
                  uncertainty: str | None = None, uncertainty_outputs: Sequence[Path] | None = None
                  ) -> Iterator[tuple[int, UserError | None]]:
    """Segment many cases ``(input, output, probabilities or None)`` with one prepared predictor.

    While one case computes, a background thread reads the next and another writes the last, so
    the network never waits on the disk. ``progress(index)`` gives a case its progress callback.
    Yields ``(index, error)`` for every case, in order, once its outputs are written; ``error`` is
    the :class:`UserError` that stopped that case (a bad file spoils only itself; other errors
    propagate). Each output appears whole or not at all, as with :func:`predict_file`. ``spacing`` is
    that of ``.npy`` inputs; ``roi`` applies to every case (a case it misses fails alone), and
    ``warn(index)`` gives a case its warning callback. With ``uncertainty`` (a measure of
    :meth:`Predictor.predict`), each case's uncertainty is written to its ``uncertainty_outputs`` file.
    """
    from ..io import read_volume as read

    read_volume = functools.partial(read, spacing=spacing)

    with ThreadPoolExecutor(1, "read-ahead") as reader, ThreadPoolExecutor(1, "write-behind") as writer, \
            reuse_freed_memory():
        following = reader.submit(read_volume, cases[0][0]) if cases else None
        previous: tuple[int, Future | UserError] | None = None
        for index, (source, output, probabilities) in enumerate(cases):
            reading, following = following, (reader.submit(read_volume, cases[index + 1][0])
                                             if index + 1 < len(cases) else None)
            try:
                assert reading is not None
                result = predictor.predict(reading.result(), probabilities=probabilities is not None,
                                           progress=progress(index) if progress else None, roi=roi,
                                           warn=warn(index) if warn else None,
                                           uncertainty=uncertainty if uncertainty_outputs else None)
                outcome: Future | UserError = writer.submit(
                    _write_outputs, result, output, probabilities, _SegSource(source, predictor),
                    uncertainty_outputs[index] if uncertainty_outputs else None)
            except UserError as error:
                outcome = error
            if previous is not None:
                yield _written(*previous)
            previous = (index, outcome)
        if previous is not None:
            yield _written(*previous)


def _written(index: int, outcome: Future | UserError) -> tuple[int, UserError | None]:
    if isinstance(outcome, UserError):
        return index, outcome
    try:
        outcome.result()
    except UserError as error:
        return index, error
    return index, None


def _model_name(checkpoint) -> str:
    """The file name(s) a checkpoint came from ('' for one built in memory)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return Path(checkpoint).name
    if isinstance(checkpoint, Sequence):
        return ", ".join(Path(item).name for item in checkpoint)
    return ""


@dataclass
class _SegSource:
    """What a DICOM SEG output needs beyond the labelmap: the series it references and the model's labels."""

    series: Path
    predictor: Predictor


def _write_outputs(result: Prediction, output_path: Path, probabilities_path: Path | None,
                   seg_source: _SegSource | None = None, uncertainty_path: Path | None = None) -> None:
    """Write the labelmap and the probabilities; a ``.dcm`` name is a DICOM SEG (FRACTIONAL for probabilities)."""
    from ..dicom_seg import is_dicom_seg_name, write_dicom_seg
    from ..io import write_volume

    for path, probabilities in ((output_path, None), (probabilities_path, result.probabilities)):
        if path is None or (path is probabilities_path and probabilities is None):
            continue
        if is_dicom_seg_name(path):
            if seg_source is None:
                raise UserError(f"cannot write {path}: a DICOM SEG needs the DICOM series it segments")
            write_dicom_seg(result.labelmap, seg_source.series, seg_source.predictor.checkpoint.labels, path,
                            seg_source.predictor.model_name, probabilities)
        elif probabilities is None:
            write_volume(result.labelmap, path)
        else:
            write_volume(probabilities.with_array(probabilities.array.astype(np.float32)), path)
    if uncertainty_path is not None and result.uncertainty is not None:
        write_volume(result.uncertainty, uncertainty_path)
