"""``unet3d-segmenter predict``: one volume, one DICOM series, or a folder of volumes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError
from .io import case_name, is_dicom_folder, list_volume_files, volume_suffix
from .predictor import Predictor, predict_file
from .progress import ProgressBar, emit_json


def _plan(args: argparse.Namespace) -> list[tuple[Path, Path, Path | None]]:
    """(input, output, probabilities) for each case, with every path checked before any work."""
    source, output, probabilities = args.input, args.output, args.probabilities
    if not source.exists():
        raise UserError(f"input not found: {source}: check the path")
    if source.is_dir() and not is_dicom_folder(source):
        files = list_volume_files(source)
        if not files:
            raise UserError(f"{source} holds no volume files (.nii.gz, .nii, .nrrd, .mha) and no DICOM series")
        if volume_suffix(output):
            raise UserError(f"the input {source} is a folder, so --output must be a folder, not {output}")
        if probabilities is not None and volume_suffix(probabilities):
            raise UserError(f"the input is a folder, so --probabilities must be a folder, not {probabilities}")
        return [(path, output / path.name, probabilities / path.name if probabilities else None)
                for path in files]
    if output.is_dir() or not volume_suffix(output):
        name = case_name(source) + (volume_suffix(source) or ".nii.gz")
        output = output / name
        probabilities = probabilities / name if probabilities and not volume_suffix(probabilities) else probabilities
    if probabilities is not None and not volume_suffix(probabilities):
        raise UserError(f"--probabilities {probabilities}: use a file name ending in .nii.gz, .nrrd or .mha")
    return [(source, output, probabilities)]


def _check_writable(paths: list[Path]) -> None:
    for folder in {path.parent for path in paths}:
        existing = next((parent for parent in [folder, *folder.parents] if parent.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"output folder {folder} is not writable: choose another --output")


def run_predict(args: argparse.Namespace) -> int:
    cases = _plan(args)
    _check_writable([output for _, output, _ in cases] + [p for _, _, p in cases if p is not None])
    predictor = Predictor(args.checkpoint, device=args.device, overlap=args.overlap, batch_size=args.batch_size,
                          tta=args.tta, largest_component=args.largest_component, precision=args.precision)
    failures = []
    for index, (source, output, probabilities) in enumerate(cases, start=1):
        name = case_name(source)
        bar = ProgressBar(f"[{index}/{len(cases)}] {name}", "windows")  # stays silent until updated

        def progress(done: int, total: int, name=name, bar=bar) -> None:
            if args.progress_json:
                emit_json(event="progress", case=name, done=done, total=total)
            else:
                bar.update(done, total)

        try:
            predict_file(predictor, source, output, probabilities, progress=progress)
        except UserError as error:
            if len(cases) == 1:
                raise
            failures.append(name)
            print(f"error: {name}: {error}", file=sys.stderr)
            continue
        finally:
            bar.close()
        if args.progress_json:
            emit_json(event="written", case=name, output=str(output))
        else:
            print(f"wrote {output}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} of {len(cases)} cases failed: {', '.join(failures)}", file=sys.stderr)
        return 2
    return 0
