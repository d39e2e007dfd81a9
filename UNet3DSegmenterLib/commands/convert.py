"""``unet3d-segmenter convert``: one volume to another format, with its geometry and values.

INPUT is a volume file, a folder holding one DICOM series, or a DICOM SEG file; OUTPUT is a file whose extension picks
the format, or a folder path without an extension for a DICOM series (see ``io.write_dicom_series``
for its file names and tags). Integer data (labelmaps) keep their exact values in every format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import DICOM_MODALITIES
from ..errors import UserError

_EXAMPLES = """\
examples:
  unet3d-segmenter convert ct_series/ ct.nii.gz                     (DICOM series to NIfTI)
  unet3d-segmenter convert labels.nii.gz labels.seg.nrrd            (a labelmap stays a labelmap)
  unet3d-segmenter convert ct.nii.gz ct_dicom --modality CT --patient-name "Doe^Jane"
  unet3d-segmenter convert volume.npy volume.nrrd --input-spacing 0.8 0.8 2.5
  unet3d-segmenter convert result.dcm labels.nii.gz --grid ct_series/    (a DICOM SEG on its series' grid)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand's arguments."""
    parser.epilog = _EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", type=Path, help="a volume file (.nii.gz, .nii, .nrrd, .mha, .npy), a DICOM series folder, "
                                                 "or a DICOM SEG file (.dcm; read as the labelmap of its segments)")
    parser.add_argument("output", type=Path,
                        help="a volume file (the extension picks the format; .npy keeps the array only) or a new "
                             "folder (no extension) for a DICOM series")
    parser.add_argument("--input-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm of a .npy input (default 1 1 1; other formats record their own)")
    parser.add_argument("--grid", type=Path, default=None, metavar="IMAGE",
                        help="a DICOM SEG input: write it on this image's grid (its source series, say) rather than "
                             "on the slices its frames span")
    dicom = parser.add_argument_group("DICOM output")
    dicom.add_argument("--modality", choices=DICOM_MODALITIES, default=None,
                       help="the series' modality (default OT; CT or MR also choose CT or MR image storage)")
    dicom.add_argument("--patient-name", default=None, help="patient name, e.g. Doe^Jane (default: the input's name)")
    dicom.add_argument("--patient-id", default=None, help="patient ID (default: the input's name)")
    dicom.add_argument("--series-description", default=None, help="series description (default: the input's name)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import remove_stale_partials
    from ..io import (
        case_name,
        check_input_spacing,
        is_series_folder_name,
        write_dicom_series,
        write_volume,
    )
    from ..paths import check_outputs
    from ..volume import Volume

    check_input_spacing(args.input_spacing, [args.input])
    check_outputs([args.output], [args.input, args.grid])
    remove_stale_partials([args.output])
    to_dicom = is_series_folder_name(args.output)
    dicom_options = [f"--{name.replace('_', '-')}" for name in ("modality", "patient_name", "patient_id",
                                                                "series_description") if getattr(args, name) is not None]
    if dicom_options and not to_dicom:
        raise UserError(f"{dicom_options[0]} is for DICOM output, and {args.output} is a file: "
                        "give a folder path without an extension, or leave the option out")
    volume = _read_input(args)
    if to_dicom:
        name = case_name(args.input)
        write_dicom_series(volume, args.output, args.modality or "OT", _or(args.patient_name, name),
                           _or(args.patient_id, name), _or(args.series_description, name))
    else:
        write_volume(volume, args.output)
    print(f"wrote {args.output}: {volume.describe_grid()}, {volume.array.dtype}"
          + (f", {volume.channels} channels" if volume.channels > 1 else ""), file=sys.stderr)
    if args.output.name.lower().endswith(".npy") and not volume.same_grid(Volume(volume.array)):
        print(f"note: {args.output} holds the array only; its spacing, origin and direction are not stored "
              "(give --input-spacing when reading it back)", file=sys.stderr)
    return 0


def _read_input(args: argparse.Namespace):
    from ..dicom_seg import is_dicom_seg_file, read_dicom_seg
    from ..io import read_volume

    if args.grid is None:
        return read_volume(args.input, spacing=args.input_spacing)
    if not is_dicom_seg_file(args.input):
        raise UserError(f"--grid places a DICOM SEG, and {args.input} is not one: leave --grid out")
    return read_dicom_seg(args.input, grid=read_volume(args.grid, check_finite=False)).labelmap


def _or(value: str | None, default: str) -> str:
    return default if value is None else value
