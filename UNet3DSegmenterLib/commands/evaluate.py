"""``unet3d-segmenter evaluate``: score predicted label maps against references, as a table and JSON."""

from __future__ import annotations

import argparse

from ..atomic import write_json
from ..evaluation import evaluate, format_table
from ..io import volume_files
from ..paths import check_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` subcommand's options to ``parser``."""
    parser.add_argument("--prediction", required=True, metavar="PATH",
                        help="predicted label map, or a folder of them (matched to references by case name)")
    parser.add_argument("--reference", required=True, metavar="PATH",
                        help="reference (ground-truth) label map, or a folder of them")
    parser.add_argument("--ignore-label", type=int, metavar="VALUE", default=None,
                        help="the references' value for unannotated voxels (sparse annotation): every metric "
                             "is then computed on annotated voxels only")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write the results to this JSON file (infinite distances, where a class "
                             "is missing on one side, are written as null)")


def run(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` subcommand: print the table, optionally write JSON; returns the exit status."""
    check_outputs([args.json], [file for source in (args.prediction, args.reference) for file in volume_files(source)])
    result = evaluate(args.prediction, args.reference, args.ignore_label)
    if args.json:
        write_json(result, args.json)
    print(format_table(result))
    return 0
