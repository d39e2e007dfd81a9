"""Every segmentation option, declared once: :class:`SegmentOptions`.

As :class:`~UNet3DSegmenterLib.training.config.TrainingConfig` is for training: each field carries
its help, default, choices and command-line spelling in its metadata, and from that one declaration
come ``predict``'s options (:meth:`SegmentOptions.add_arguments`), :class:`Predictor`'s keywords,
the checks, the Slicer Logic's keywords (``largestComponent`` as well as ``largest_component``), the
panel's parameters (``parameter`` in the metadata) and the command line of the panel's background
run (:meth:`SegmentOptions.to_arguments`). The files a command reads and writes (``--checkpoint``,
``--input``, ``--output``, ...) stay with the command.

Adding an option is one field here, for example::

    keep_probabilities: bool = option(False, "also keep the class probabilities")

and the code that reads ``options.keep_probabilities``. This module imports no torch, so the Slicer
side and ``predict --help`` can use it without loading the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .choices import DEVICES, OUTPUT_FORMATS, PRECISIONS, UNCERTAINTIES
from .errors import UserError

ROI_CORNERS = ("R1", "A1", "S1", "R2", "A2", "S2")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, metavar: Any = None,
           parameter: str | None = None, repeat: bool = False) -> Any:
    """A segmentation option; ``parameter`` names the Slicer panel's parameter that holds it (None: not shown);
    ``repeat``: the option may be given several times, each adding one value."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                            "parameter": parameter, "repeat": repeat})


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment, whatever the input: every field has a default that suits a first run.

    ``overlap`` None means the overlap the checkpoint records (usually 0.5); ``batch_size`` None
    means 2 windows on the CPU, 4 on a GPU; ``roi`` None means the whole volume.

    Example::

        >>> options = SegmentOptions(device="cpu", largest_component=True)
        >>> Predictor("model.pt", options).predict(read_volume("ct.nii.gz"))
    """

    device: str = option("auto", "where to compute (auto: the CUDA GPU when PyTorch sees one, else the CPU)",
                         choices=DEVICES, parameter="device")
    overlap: float | None = option(None, "fraction of a window shared with its neighbours, in [0, 1) "
                                   "(default: the checkpoint's)", parameter="overlap")
    tta: bool = option(False, "mirroring test-time augmentation: average over the eight axis flips (8x slower; "
                       "an nnU-Net model: the flips its trainer allowed)",
                       parameter="testTimeAugmentation")
    largest_component: bool = option(False, "keep the largest connected component of each class",
                                     parameter="largestComponent")
    uncertainty_measure: str = option(
        "entropy", "how --uncertainty (and the panel's confidence view) says where the model is unsure: the entropy "
        "of the class probabilities (0 sure .. 1 undecided) or the winning class's probability (1 sure)",
        choices=UNCERTAINTIES)
    precision: str = option("auto", "compute precision (auto: bf16 on CPUs with native bf16, fp16 on CUDA, "
                            "else fp32)", choices=PRECISIONS)
    batch_size: int | None = option(
        None, "windows per forward pass (default 2 on the CPU, 4 on a GPU, 1 for an nnU-Net model)")
    roi: tuple[float, float, float, float, float, float] | None = option(
        None, "segment only inside this box: two opposite corners in RAS mm, as Slicer shows them (the labelmap "
        "covers the whole input, 0 outside the box)", metavar=ROI_CORNERS)
    # Which cases of a folder or tree, how their outputs are named, and this process's share (see batch.py);
    # a Predictor, which segments one volume at a time, has no use for them.
    output_format: str | None = option(
        None, "format of the outputs the tool names (a folder's cases, or --output a folder): dicom-seg writes "
        "DICOM SEG files that reference their series (default: the input's format, NIfTI for a DICOM series)",
        choices=OUTPUT_FORMATS)
    series_filter: tuple[str, ...] | None = option(
        None, "segment only the series of a folder or tree whose modality or series description matches a shell "
        "pattern (any case): modality=CT, 'description=*portal*'; give it again for both",
        metavar="KEY=PATTERN", repeat=True)
    shard: str | None = option(None, "do share I (0..N-1) of N of the cases, as one task of a Slurm array job; "
                               "under torchrun the shares follow the processes' ranks by themselves", metavar="I/N")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            allowed, value = item.metadata["choices"], getattr(self, item.name)
            if allowed and value is not None and value not in allowed:
                raise UserError(f"unknown {item.name} {value!r}: choose one of {', '.join(allowed)}")
        for name in ("tta", "largest_component"):
            value = getattr(self, name)
            if isinstance(value, str) or value not in (True, False):
                raise UserError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.overlap is not None:
            overlap = _number(self.overlap, "overlap")
            if not 0 <= overlap < 1:
                raise UserError(f"overlap must be at least 0 and below 1, got {self.overlap}")
            object.__setattr__(self, "overlap", overlap)
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise UserError(f"batch size must be at least 1 window, got {self.batch_size}")
        if self.roi is not None:
            region = self.region()  # checks the six numbers
            object.__setattr__(self, "roi", (*region.first, *region.second))
        self._check_cases()

    def _check_cases(self) -> None:
        """The options that pick and share the cases (their parsers live with the cases, in batch.py)."""
        if self.series_filter is not None:
            if isinstance(self.series_filter, str):
                raise UserError(f"series_filter is a list of KEY=PATTERN strings, got {self.series_filter!r}")
            object.__setattr__(self, "series_filter", tuple(self.series_filter))
        if self.series_filter or self.shard is not None:
            from .batch import SeriesFilter, parse_shard

            SeriesFilter.parse(self.series_filter)
            if self.shard is not None:
                parse_shard(self.shard)

    # --- Python keywords -----------------------------------------------------------------------

    @classmethod
    def keywords(cls) -> dict[str, str]:
        """Keyword -> field: each field's own name and its camelCase spelling (the Slicer Logic's)."""
        names = {item.name: item.name for item in dataclasses.fields(cls)}
        return {**names, **{_camel(name): name for name in names}}

    def with_keywords(self, **keywords: Any) -> SegmentOptions:
        """These options with ``keywords`` (field names, or their camelCase) replaced; TypeError for an unknown one."""
        known = self.keywords()
        unknown = sorted(set(keywords) - set(known))
        if unknown:
            raise TypeError(f"unknown segment option {unknown[0]!r}: the options are "
                            f"{', '.join(item.name for item in dataclasses.fields(self))}")
        return dataclasses.replace(self, **{known[key]: value for key, value in keywords.items()})

    def overlap_for(self, checkpoint: Any) -> float:
        """The overlap to use with ``checkpoint``: the one chosen, else the one the checkpoint records."""
        return float(checkpoint.overlap) if self.overlap is None else self.overlap

    def region(self) -> Any:
        """The :class:`~UNet3DSegmenterLib.roi.RegionOfInterest` of ``roi``, or None for the whole volume."""
        from .roi import RegionOfInterest

        return RegionOfInterest.from_values(self.roi) if self.roi is not None else None

    # --- the Slicer panel ----------------------------------------------------------------------

    @classmethod
    def parameter_names(cls) -> dict[str, str]:
        """Field -> the name of the panel's parameter that holds it, for the fields the panel shows."""
        return {item.name: item.metadata["parameter"] for item in dataclasses.fields(cls)
                if item.metadata["parameter"]}

    @classmethod
    def from_parameters(cls, parameters: Any, **keywords: Any) -> SegmentOptions:
        """The options the panel's parameters hold (see :meth:`parameter_names`), with ``keywords`` on top."""
        values = {name: getattr(parameters, parameter) for name, parameter in cls.parameter_names().items()}
        return cls(**values).with_keywords(**keywords)

    # --- the command line ----------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | Any) -> None:
        """One option per field (``--largest-component``), each with its help, choices and default."""
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            meta = item.metadata
            kwargs: dict[str, Any] = {"dest": item.name, "default": item.default, "help": meta["help"]}
            if item.default is False:
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = _argument_type(hints[item.name])
                if meta["choices"]:
                    kwargs["choices"] = meta["choices"]
                if meta["repeat"]:
                    kwargs["action"] = "append"
                if isinstance(meta["metavar"], tuple):
                    kwargs.update(metavar=meta["metavar"], nargs=len(meta["metavar"]))
                elif meta["metavar"]:
                    kwargs["metavar"] = meta["metavar"]
                if item.default is not None:
                    kwargs["help"] += f" (default {item.default})"
            parser.add_argument(_flag(item.name), **kwargs)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> SegmentOptions:
        """The options that :meth:`add_arguments`' parser read."""
        return cls(**{item.name: getattr(args, item.name) for item in dataclasses.fields(cls)})

    def to_arguments(self) -> list[str]:
        """These options as ``predict`` command-line arguments; an option left at its default is left out."""
        arguments: list[str] = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value == item.default:
                continue
            if isinstance(value, bool):
                arguments.append(_flag(item.name))
            elif item.metadata["repeat"]:
                arguments += [text for each in value for text in (_flag(item.name), str(each))]
            elif isinstance(value, tuple):
                arguments += [_flag(item.name), *(repr(number) for number in value)]
            else:
                arguments += [_flag(item.name), repr(value) if isinstance(value, float) else str(value)]
        return arguments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument_type(hint: Any) -> Any:
    """The type of one command-line value of a field: ``float`` for ``float | None`` and for a tuple of floats."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    kind = kinds[0]
    return typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda match: match.group(1).upper(), name)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {value!r}")
    return float(value)
