"""Segment a volume with a checkpoint: preprocess, sliding window, back to the input grid.

This is the one pipeline that the command line, the Python API and the Slicer module all call::

    predictor = Predictor("hippocampus.pt")
    result = predictor.predict(read_volume("case.nii.gz"))
    write_volume(result.labelmap, "case_seg.nii.gz")

An ensemble (an ensemble file, a folder of fold checkpoints, or a list of checkpoints) is averaged
per volume: each network runs its whole sliding window exactly as it would alone, and its softmax
probabilities are added to one running sum on the preprocessed grid. Memory is that of one network's
prediction plus one sum, whatever the number of networks; an ensemble of one network is that network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, CheckpointSource, Ensemble, load_checkpoint, members_of
from ..errors import UserError
from ..preprocess import preprocess_image
from ..runtime import resolve_device, resolve_precision
from ..volume import Volume
from .fast import input_layout, prepare_for_inference
from .postprocess import keep_largest_component, labelmap_from_probabilities, probabilities_on_grid
from .sliding_window import CancelCheck, ProgressCallback, sliding_window_inference, window_positions

log = logging.getLogger("UNet3DSegmenterLib")

@dataclass
class Prediction:
    """A segmentation on the input's grid, and the class probabilities when asked for."""

    labelmap: Volume
    probabilities: Volume | None = None


class Predictor:
    """Segments volumes with a checkpoint or an ensemble; build once, call :meth:`predict` for each volume.

    Args:
        checkpoint: a :class:`Checkpoint` or :class:`Ensemble`, the path of a ``.pt`` file, a folder
            of checkpoints (e.g. a cross-validation's output), or a list of paths (an ensemble).
        device: 'auto', 'cpu' or 'cuda'.
        overlap: window overlap in [0, 1); default from the checkpoint (usually 0.5).
        batch_size: windows per forward pass; default 2 on the CPU, 4 on a GPU.
        tta: average over the eight axis flips (mirroring test-time augmentation), 8x slower.
        largest_component: keep only the largest connected component of each class.
        precision: 'auto' (bfloat16 on CPUs with native bf16, fp16 autocast on CUDA, else fp32),
            'fp32', 'bf16' or 'fp16'.
    """

    def __init__(self, checkpoint: Checkpoint | Ensemble | CheckpointSource, device: str = "auto",
                 overlap: float | None = None, batch_size: int | None = None, tta: bool = False,
                 largest_component: bool = False, precision: str = "auto"):
        self.checkpoint = checkpoint if isinstance(checkpoint, (Checkpoint, Ensemble)) else load_checkpoint(checkpoint)
        self.members = members_of(self.checkpoint)
        self.device = resolve_device(device)
        self.overlap = self.checkpoint.overlap if overlap is None else float(overlap)
        if not 0 <= self.overlap < 1:
            raise UserError(f"overlap must be at least 0 and below 1, got {self.overlap}")
        self.batch_size = batch_size or (4 if self.device.type == "cuda" else 2)
        self.tta = tta
        self.largest_component = largest_component
        self.precision = precision
        self._models = [member.build_model() for member in self.members]
        self._prepared: dict = {}

    def predict(self, volume: Volume, probabilities: bool = False, progress: ProgressCallback | None = None,
                cancel: CancelCheck | None = None) -> Prediction:
        """Segment ``volume``; the labelmap (and probabilities) lie on exactly its grid."""
        self._check_input(volume)
        preprocessed = preprocess_image(volume, self.checkpoint.preprocessing)
        class_probabilities = self._probabilities(torch.from_numpy(preprocessed.array), progress, cancel)
        on_input = probabilities_on_grid(preprocessed.with_array(class_probabilities), volume)
        values = [label.value for label in self.checkpoint.labels]
        labelmap = labelmap_from_probabilities(on_input.array, values)
        if self.largest_component:
            labelmap = keep_largest_component(labelmap, values)
        return Prediction(volume.with_array(labelmap), on_input if probabilities else None)

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
        total: torch.Tensor | None = None
        for index in range(len(self.members)):
            done_before = sum(windows[:index])
            report = None if progress is None else \
                (lambda done, _, before=done_before: progress(before + done, sum(windows)))
            logits = self._infer(image, index, report, cancel)
            probabilities = torch.softmax(logits, dim=0).cpu()
            del logits
            total = probabilities if total is None else total.add_(probabilities)
        assert total is not None
        if len(self.members) > 1:
            total /= len(self.members)
        return total.numpy()

    def _infer(self, image: torch.Tensor, member: int, progress, cancel) -> torch.Tensor:
        """Sliding window on the chosen device; on CUDA out-of-memory fall back step by step, and say so."""
        if self.device.type != "cuda":
            return self._sliding_window(image, member, self.device, self.device, progress, cancel)
        plans = [(self.device, self.device), (self.device, torch.device("cpu")),
                 (torch.device("cpu"), torch.device("cpu"))]
        for attempt, (compute, accumulate) in enumerate(plans):
            try:
                return self._sliding_window(image, member, compute, accumulate, progress, cancel)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if attempt == len(plans) - 1:
                    raise
                following = plans[attempt + 1]
                log.warning("GPU out of memory; retrying with %s",
                            "the accumulator on the CPU" if following[0].type == "cuda" else "the CPU only")
        raise AssertionError("unreachable")

    def _sliding_window(self, image: torch.Tensor, member: int, compute: torch.device, accumulate: torch.device,
                        progress, cancel) -> torch.Tensor:
        dtype = resolve_precision(self.precision, compute)
        model = self._prepared_model(compute, dtype, member)
        autocast = torch.autocast("cuda", dtype=dtype, enabled=compute.type == "cuda" and dtype != torch.float32)
        with torch.inference_mode(), autocast:
            return sliding_window_inference(
                image.to(compute), model, self.members[member].patch_size, len(self.checkpoint.labels),
                overlap=self.overlap, batch_size=self.batch_size, mirror=self.tta,
                prepare_batch=lambda batch: input_layout(batch, compute, dtype),
                accumulate_device=accumulate, progress=progress, cancel=cancel,
            )

    def _prepared_model(self, device: torch.device, dtype: torch.dtype, member: int = 0):
        key = (str(device), dtype, member)
        if key not in self._prepared:
            self._prepared[key] = prepare_for_inference(self._models[member], device, dtype)
        return self._prepared[key]


def predict_file(predictor: Predictor, input_path: Path, output_path: Path,
                 probabilities_path: Path | None = None, progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None, spacing: Sequence[float] | None = None) -> Prediction:
    """Read, segment and write one case; outputs are written only once the whole case succeeded.

    ``spacing`` (x, y, z) in mm is that of a ``.npy`` input, which records none (default 1 mm).
    """
    from ..io import read_volume, write_volume

    volume = read_volume(input_path, spacing=spacing)
    result = predictor.predict(volume, probabilities=probabilities_path is not None,
                               progress=progress, cancel=cancel)
    write_volume(result.labelmap, output_path)
    if probabilities_path is not None and result.probabilities is not None:
        write_volume(result.probabilities.with_array(result.probabilities.array.astype(np.float32)),
                     probabilities_path)
    return result
