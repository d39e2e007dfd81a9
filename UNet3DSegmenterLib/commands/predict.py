"""``unet3d-segmenter predict``: one volume, one DICOM series, or a folder of volumes (files or DICOM series
folders)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from ..atomic import remove_stale_partials
from ..batch import FORMAT_SUFFIXES, Case, SeriesFilter, find_cases, parse_shard, share
from ..dicom_seg import is_dicom_seg_name, require_highdicom
from ..errors import UserError
from ..io import FORMATS, case_name, check_input_spacing, is_dicom_folder, is_series_folder_name, volume_suffix
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
                        help="labelmap file (a .dcm name: a DICOM SEG, for DICOM series inputs), or a folder when the "
                             "input is a folder or a tree of series (outputs mirror the input's tree)")
    parser.add_argument("--input-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm of .npy inputs (default 1 1 1; other formats record their own)")
    parser.add_argument("--probabilities", type=Path, default=None,
                        help="also write class probabilities (multi-component image, or a FRACTIONAL DICOM SEG for a "
                             ".dcm name; a folder for folder input)")
    parser.add_argument("--uncertainty", type=Path, default=None, metavar="PATH",
                        help="also write where the model is unsure, one float per voxel (--uncertainty-measure; a "
                             "folder for folder input), from the same pass")
    SegmentOptions.add_arguments(parser.add_argument_group("segmentation"))
    parser.add_argument("--progress-json", action="store_true",
                        help="print progress as one JSON object per line on stdout (for the Slicer module)")


def _plan(args: argparse.Namespace, options: SegmentOptions) -> list[Case]:
    """Every case with its outputs, each path checked before any work; a folder or tree as batch.py finds it."""
    source, output, probabilities = args.input, args.output, args.probabilities
    if not source.exists():
        raise UserError(f"input not found: {source}: check the path")
    if source.is_dir() and not is_dicom_folder(source):
        for option, path in (("--output", output), ("--probabilities", probabilities)):
            if path is not None and _names_a_file(path):
                raise UserError(f"the input {source} is a folder, so {option} must be a folder, not {path}")
        return find_cases(source, output, probabilities, options.output_format,
                          SeriesFilter.parse(options.series_filter))
    if options.series_filter:
        raise UserError(f"--series-filter picks series of a folder or tree, and {source} is one volume: leave it out")
    for option, path in (("--output", output), ("--probabilities", probabilities)):
        if path is not None and not _names_a_file(path) and not is_series_folder_name(path):
            raise UserError(f"{option} {path}: use a file name ending in {FORMATS} (or .dcm for a DICOM SEG), "
                            "or a folder name without an extension")
    if output.is_dir() or not _names_a_file(output):
        name = case_name(source) + (FORMAT_SUFFIXES[options.output_format] if options.output_format else
                                    volume_suffix(source) or ".nii.gz")
        output = output / name
        probabilities = probabilities / name if probabilities and not _names_a_file(probabilities) else probabilities
    if probabilities is not None and not _names_a_file(probabilities):
        raise UserError(f"--probabilities {probabilities}: use a file name ending in .nii.gz, .nrrd, .mha or .dcm")
    _check_format(output, options.output_format)
    for path in (path for path in (output, probabilities) if path is not None and is_dicom_seg_name(path)):
        if not source.is_dir():
            raise UserError(f"{path}: a DICOM SEG references the DICOM series it segments, and {source} is not a "
                            "DICOM series: write .nii.gz, .nrrd or .mha instead")
        if path.parent.resolve() == source.resolve():
            raise UserError(f"{path} lies in the DICOM series folder it segments, which would then hold a second "
                            "series: write it elsewhere")
    return [Case(source, output, probabilities, case_name(source))]


def _names_a_file(path: Path) -> bool:
    return bool(volume_suffix(path)) or is_dicom_seg_name(path)


def _check_format(output: Path, output_format: str | None) -> None:
    """Refuse an --output-format that the output's own extension contradicts."""
    name = output.name.lower()
    if output_format and not (name.endswith(FORMAT_SUFFIXES[output_format])
                              or (output_format == "nifti" and name.endswith(".nii"))):
        raise UserError(f"--output-format {output_format} and --output {output} disagree: give a file name ending in "
                        f"{FORMAT_SUFFIXES[output_format]}, or a folder")


def _uncertainty_outputs(args: argparse.Namespace, options: SegmentOptions, cases: list[Case]) -> dict[Path, Path]:
    """Each case's --uncertainty file by its output, checked as --probabilities is (the same rules place it)."""
    if args.uncertainty is None:
        return {}
    try:
        planned = _plan(argparse.Namespace(**{**vars(args), "probabilities": args.uncertainty}), options)
    except UserError as error:
        raise UserError(str(error).replace("--probabilities", "--uncertainty")) from None
    placed = {case.output: case.probabilities for case in planned if case.probabilities is not None}
    segs = [path for path in placed.values() if is_dicom_seg_name(path)]
    if segs:  # a SEG holds segments, not one float per voxel
        raise UserError(f"--uncertainty {segs[0]}: a DICOM SEG cannot hold it; give a file name ending in .nii.gz, "
                        ".nrrd or .mha (with a folder of DICOM SEG results, name the uncertainty files one by one "
                        "or leave --uncertainty out)")
    return placed


def _check_writable(paths: list[Path]) -> None:
    for folder in {path.parent for path in paths}:
        existing = next((parent for parent in [folder, *folder.parents] if parent.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"output folder {folder} is not writable: choose another --output")


def run(args: argparse.Namespace) -> int:
    """Segment every case the options name (this process's share of them); exit status 2 when some cases of a
    folder failed."""
    from ..checkpoint import checkpoint_paths
    from ..inference.predictor import Predictor
    from ..training.distributed import Distributed

    options = SegmentOptions.from_arguments(args)
    every = _plan(args, options)
    uncertainty = _uncertainty_outputs(args, options, every)
    check_input_spacing(args.input_spacing, [case.source for case in every])
    outputs = [path for case in every for path in case.outputs] + list(uncertainty.values())
    check_outputs(outputs, [case.source for case in every] + checkpoint_paths(args.checkpoint))
    _check_writable(outputs)
    if any(is_dicom_seg_name(path) for path in outputs):
        require_highdicom()  # before hours of work whose results could not be written
    remove_stale_partials(outputs)
    distributed = Distributed.start(options.device)  # under torchrun: this process's rank, and its GPU made current
    try:
        shard = parse_shard(options.shard) if options.shard is not None else None
        cases = _my_cases(every, shard, distributed, folder=len(every) > 1 or every[0].source != args.input,
                          uncertainty=uncertainty)
        failures = _predict(args, Predictor(args.checkpoint, options), cases, uncertainty, single=len(every) == 1)
        failed = round(distributed.mean(len(failures)) * distributed.world_size)
    finally:
        distributed.stop()
    if failed:
        print(error_line(f"{failed} of {len(every)} cases failed" + (f": {', '.join(failures)}" if failures else "")
                         + (" (see each process's lines)" if distributed.enabled else "")), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _my_cases(every: list[Case], shard: tuple[int, int] | None, distributed, folder: bool,
              uncertainty: dict[Path, Path]) -> list[Case]:
    """This process's share of the cases (``--shard``, or its rank under torchrun), less those already done:
    every output written, its ``--uncertainty`` file included."""
    if shard is not None and distributed.enabled:
        raise UserError("--shard and torchrun both share out the cases: use one of them")
    if distributed.enabled and distributed.any(_fingerprint(every) != distributed.mean(_fingerprint(every))):
        raise UserError("the processes of this run see different cases (a different input tree on some machine): "
                        "give every machine the same input")
    index, count = shard or (distributed.rank, distributed.world_size)
    mine = share(every, index, count)
    pending = [case for case in mine
               if not (folder and case.done and (case.output not in uncertainty or uncertainty[case.output].exists()))]
    if len(pending) < len(mine):
        print(f"skipped {len(mine) - len(pending)} cases already done (their outputs exist; delete them to redo)",
              file=sys.stderr)
    if count > 1:
        print(f"share {index}/{count}: {len(mine)} of {len(every)} cases", file=sys.stderr)
    return pending


def _fingerprint(cases: list[Case]) -> int:
    """A number that differs, almost surely, between two different lists of cases (exact in a float64)."""
    digest = hashlib.sha1("\n".join(str(case.source) for case in cases).encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _predict(args: argparse.Namespace, predictor, cases: list[Case], uncertainty: dict[Path, Path],
             single: bool) -> list[str]:
    """Run the cases, reporting each as it is written; returns the names of those that failed."""
    from ..inference.predictor import predict_files

    names = [case.name for case in cases]
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
    plan = [(case.source, case.output, case.probabilities) for case in cases]
    uncertainty_outputs = [uncertainty[case.output] for case in cases] if uncertainty else None
    for index, error in predict_files(predictor, plan, progress, spacing=args.input_spacing, warn=warn,
                                      uncertainty=predictor.options.uncertainty_measure,
                                      uncertainty_outputs=uncertainty_outputs):
        name, output = names[index], cases[index].output
        if bars[index].done != bars[index].total:
            bars[index].close()
        if error is not None:
            if single:
                raise error
            failures.append(name)
            print(error_line(f"{name}: {error}"), file=sys.stderr)
        elif args.progress_json:
            emit_json(event="written", case=name, output=str(output))
        else:
            print(f"wrote {output}", file=sys.stderr)
    return failures
