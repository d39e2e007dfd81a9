"""``unet3d-segmenter predict``: one volume, one DICOM series, or a folder of volumes (files or DICOM series
folders)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..atomic import remove_stale_partials
from ..errors import UserError
from ..io import (
    FORMATS,
    case_name,
    check_input_spacing,
    is_dicom_folder,
    is_series_folder_name,
    list_volumes,
    volume_suffix,
)
from ..paths import check_outputs
from ..progress import ProgressBar, emit_json
from ..protocol import EXIT_USER_ERROR, error_line
from ..segment_options import SegmentOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``predict`` subcommand's options."""
    parser.add_argument("--checkpoint", "-c", required=True, type=Path, nargs="+", metavar="CHECKPOINT",
                        help="model checkpoint (.pt); several, or a folder of fold checkpoints, make an ensemble "
                             "that averages their probabilities; or an nnU-Net v2 model folder (or one of its "
                             "fold_N folders), whose folds' logits are averaged")
    parser.add_argument("--input", "-i", required=True, type=Path,
                        help="a volume file (.nii.gz, .nrrd, .mha, .npy), a DICOM series folder, or a folder of "
                             "volumes (files or DICOM series folders)")
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="labelmap file, or a folder when the input is a folder of volumes")
    parser.add_argument("--input-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm of .npy inputs (default 1 1 1; other formats record their own)")
    parser.add_argument("--probabilities", type=Path, default=None,
                        help="also write class probabilities (multi-component image; a folder for folder input)")
    parser.add_argument("--uncertainty", type=Path, default=None, metavar="PATH",
                        help="also write where the model is unsure, one float per voxel (--uncertainty-measure; a "
                             "folder for folder input), from the same pass")
    SegmentOptions.add_arguments(parser.add_argument_group("segmentation"))
    parser.add_argument("--progress-json", action="store_true",
                        help="print progress as one JSON object per line on stdout (for the Slicer module)")


def _plan(args: argparse.Namespace) -> list[tuple[Path, Path, Path | None]]:
    """(input, output, probabilities) for each case, with every path checked before any work."""
    source, output, probabilities = args.input, args.output, args.probabilities
    if not source.exists():
        raise UserError(f"input not found: {source}: check the path")
    if source.is_dir() and not is_dicom_folder(source):
        volumes = list_volumes(source)
        if not volumes:
            raise UserError(f"{source} holds no volume files ({FORMATS}) and no DICOM series")
        if volume_suffix(output):
            raise UserError(f"the input {source} is a folder, so --output must be a folder, not {output}")
        if probabilities is not None and volume_suffix(probabilities):
            raise UserError(f"the input is a folder, so --probabilities must be a folder, not {probabilities}")
        return [(path, output / _output_name(path), probabilities / _output_name(path) if probabilities else None)
                for path in volumes]
    for option, path in (("--output", output), ("--probabilities", probabilities)):
        if path is not None and not volume_suffix(path) and not is_series_folder_name(path):
            raise UserError(f"{option} {path}: use a file name ending in {FORMATS}, or a folder name without "
                            "an extension")
    if output.is_dir() or not volume_suffix(output):
        name = _output_name(source)
        output = output / name
        probabilities = probabilities / name if probabilities and not volume_suffix(probabilities) else probabilities
    if probabilities is not None and not volume_suffix(probabilities):
        raise UserError(f"--probabilities {probabilities}: use a file name ending in .nii.gz, .nrrd or .mha")
    return [(source, output, probabilities)]


def _uncertainty_outputs(args: argparse.Namespace, cases: list[tuple[Path, Path, Path | None]]) -> list[Path]:
    """Each case's --uncertainty file, checked as --probabilities is (the same rules place it)."""
    if args.uncertainty is None:
        return []
    try:
        planned = _plan(argparse.Namespace(**{**vars(args), "probabilities": args.uncertainty}))
    except UserError as error:
        raise UserError(str(error).replace("--probabilities", "--uncertainty")) from None
    return [path for _, _, path in planned if path is not None]


def _output_name(source: Path) -> str:
    """A case's output file name: its own (same format), or the case's name + .nii.gz for a DICOM series."""
    return case_name(source) + (volume_suffix(source) or ".nii.gz")


def _check_writable(paths: list[Path]) -> None:
    for folder in {path.parent for path in paths}:
        existing = next((parent for parent in [folder, *folder.parents] if parent.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"output folder {folder} is not writable: choose another --output")


def run(args: argparse.Namespace) -> int:
    """Segment every case the options name; exit status 2 when some cases of a folder failed."""
    from ..checkpoint import checkpoint_paths
    from ..inference.predictor import Predictor, predict_files

    options = SegmentOptions.from_arguments(args)
    cases = _plan(args)
    uncertainty = _uncertainty_outputs(args, cases)
    check_input_spacing(args.input_spacing, [source for source, _, _ in cases])
    outputs = [output for _, output, _ in cases] + [p for _, _, p in cases if p is not None] + uncertainty
    check_outputs(outputs, [source for source, _, _ in cases] + checkpoint_paths(args.checkpoint))
    _check_writable(outputs)
    remove_stale_partials(outputs)
    predictor = Predictor(args.checkpoint, options)
    names = [case_name(source) for source, _, _ in cases]
    bars = {index: ProgressBar(f"[{index + 1}/{len(cases)}] {name}", "windows")  # silent until updated
            for index, name in enumerate(names)}

    def progress(index: int):
        def report(done: int, total: int) -> None:
            if args.progress_json:
                emit_json(event="progress", case=names[index], done=done, total=total)
            else:
                bars[index].update(done, total)
                if done == total:  # the case's windows are done; its file is written in the background
                    bars[index].close()
        return report

    def warn(index: int):
        def report(message: str) -> None:
            if args.progress_json:
                emit_json(event="warning", case=names[index], message=message)
            else:
                print(f"warning: {names[index]}: {message}", file=sys.stderr)
        return report

    failures = []
    for index, error in predict_files(predictor, cases, progress, spacing=args.input_spacing, warn=warn,
                                      uncertainty=options.uncertainty_measure, uncertainty_outputs=uncertainty):
        name, output = names[index], cases[index][1]
        if bars[index].done != bars[index].total:
            bars[index].close()
        if error is not None:
            if len(cases) == 1:
                raise error
            failures.append(name)
            print(error_line(f"{name}: {error}"), file=sys.stderr)
        elif args.progress_json:
            emit_json(event="written", case=name, output=str(output))
        else:
            print(f"wrote {output}", file=sys.stderr)
    if failures:
        print(error_line(f"{len(failures)} of {len(cases)} cases failed: {', '.join(failures)}"), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
