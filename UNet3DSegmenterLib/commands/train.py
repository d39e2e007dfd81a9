"""``unet3d-segmenter train``: train a model from labelled volumes.

Everything not given is chosen from the data (spacing, patch size, normalisation), so
``unet3d-segmenter train --data DATA --output RUN`` is a sensible first run.

Stopping: a file named ``STOP`` in the output folder, Ctrl-C or SIGTERM ends the run after the
current iteration; it writes ``last.pt``, ``log.csv`` and the curves, removes the ``STOP`` file,
says that it stopped and exits 0, and ``--resume`` continues from there. The file works the same
on every system and through launchers that do not pass signals on (Slicer's ``PythonSlicer``), so
it is how the Slicer module stops a run.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..progress import ProgressBar, emit_json
from ..protocol import EXIT_OK, stop_file, withdraw_stop_request

_EXAMPLES = """\
Everything not given is chosen from the training cases (spacing, patch size, normalisation).

examples:
  unet3d-segmenter train --data Task04_Hippocampus --output runs/hippocampus
  unet3d-segmenter train --data cases/ --output runs/fold0 --folds 5 --fold 0 --labels 1=liver 2=tumour
  unet3d-segmenter train --data cases/ --output runs/cv --folds 5 --split 0.8 0 0.2   (every fold, a test set,
                                                                                       then ensemble.pt)
  unet3d-segmenter train --data cases/ --output runs/a --split 0.8 0.1 0.1 --group-by '^(Case_[0-9]+)'
  unet3d-segmenter train --data msd_hippocampus --output runs/b --split-file Resources/Models/hippocampus_split.json
  unet3d-segmenter train --data cases/ --output runs/quick --time-budget 15  (as many epochs as fit in 15 minutes)
  unet3d-segmenter train --data cases/ --output runs/sparse --labels 1=anterior 2=posterior 3=ignore
                                                         (voxels labelled 3 are not annotated: sparse labels)
  unet3d-segmenter train --data cases/ --output runs/fold0 --resume          (continue a stopped run)
  unet3d-segmenter train --data cases/ --output runs/fold0 --overwrite       (replace the model in runs/fold0;
                                                                              without it, a folder that holds
                                                                              a model is refused)
  unet3d-segmenter train --config runs/hippocampus/run.json --epochs 200     (a saved run, changed)
  touch runs/hippocampus/STOP     (from anywhere: stop after this iteration, saving last.pt; or Ctrl-C)
  torchrun --nproc_per_node=4 -m UNet3DSegmenterLib train --data cases/ --output runs/ddp   (4 GPUs)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options: one per TrainingConfig field, grouped as a newcomer reads them."""
    from ..training.config import add_arguments as add_config_arguments

    parser.epilog = _EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser)
    parser.add_argument("--progress-json", action="store_true",
                        help="print progress as one JSON object per line on stdout (for the Slicer module)")


def run(args: argparse.Namespace) -> int:
    from ..training.config import config_from_arguments
    from ..training.cross_validation import CrossValidationResult, cross_validate
    from ..training.trainer import train

    config = config_from_arguments(args)
    reporter = _JsonReporter() if args.progress_json else _TerminalReporter()
    stop = _StopRequest(stop_file(config.output))
    with stop:
        result = (cross_validate if config.cross_validation else train)(config, progress=reporter, cancel=stop)
    reporter.close()
    if result.stopped == "cancelled":
        withdraw_stop_request(config.output)  # honoured: it must not stop the next run in this folder
        kept = (f"{result.output} holds the folds so far" if isinstance(result, CrossValidationResult)
                else f"{result.last_checkpoint} holds the weights so far")
        print(f"stopped as asked; {kept}: continue with --resume", file=sys.stderr)
        return EXIT_OK
    if args.progress_json:
        return EXIT_OK
    if isinstance(result, CrossValidationResult):
        print(_cross_validation_table(result.report), file=sys.stderr)
        print(f"ensemble of the {config.folds} folds: {result.ensemble}; everything is in {result.output}",
              file=sys.stderr)
    else:
        dice = "no validation cases" if result.best_dice != result.best_dice else f"mean Dice {result.best_dice:.4f}"
        if result.time_plan is not None:
            dice += f", {result.epochs_completed} epochs planned for {config.time_budget:g} minutes"
        print(f"best checkpoint: {result.best_checkpoint} ({dice}, epoch {result.best_epoch}); "
              f"everything is in {result.output}", file=sys.stderr)
    return EXIT_OK


class _StopRequest:
    """True once ``file`` exists or the first Ctrl-C or SIGTERM came: training then stops after the
    current iteration. A second Ctrl-C interrupts at once."""

    def __init__(self, file: Path):
        self.file = file
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        if not self.requested and self.file.exists():
            self.requested = True
            print(f"\n{self.file} found: stopping after this iteration", file=sys.stderr)
        return self.requested

    def _handle(self, number, frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this iteration (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class _JsonReporter:
    """Events as JSON lines on stdout, exactly as the trainer reports them."""

    def __call__(self, event: Mapping[str, Any]) -> None:
        emit_json(**event)

    def close(self) -> None:
        pass


class _TerminalReporter:
    """On a terminal a live bar per epoch; always one summary line per epoch, on stderr."""

    def __init__(self):
        self.bar: ProgressBar | None = None
        self.interactive = sys.stderr.isatty()

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event["event"]
        if kind == "preparing" and event["done"] == event["total"]:
            self.close()
            print(f"prepared {event['total']} {event['kind']} cases", file=sys.stderr)
        elif not self.interactive:
            pass  # a log file gets the summary lines only
        elif kind == "preparing":
            self._bar(f"preparing {event['kind']} cases", "cases").update(event["done"], event["total"])
        elif kind == "iteration":
            bar = self._bar(f"epoch {event['epoch']}/{event['epochs']}", "it")
            bar.update(event["iteration"], event["iterations"], f"loss {event['loss']:.4f}")
        if kind == "epoch":
            self.close()
            print(_epoch_line(event), file=sys.stderr)
        elif kind == "fold":
            self.close()
            print(f"fold {event['fold']} of {event['folds']} (0..{event['folds'] - 1})", file=sys.stderr)
        elif kind == "test":
            self.close()
            print(_test_table(event), file=sys.stderr)

    def _bar(self, label: str, unit: str) -> ProgressBar:
        if self.bar is None or self.bar.label != label:
            self.close()
            self.bar = ProgressBar(label, unit)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _epoch_line(event: Mapping[str, Any]) -> str:
    line = f"epoch {event['epoch']}/{event['epochs']}: loss {event['train_loss']:.4f}"
    if "dice" in event:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in event["dice"].items())
        line += f", Dice {scores} (mean {event['mean_dice']:.3f}"
        line += f", on {event['scored_on']})" if "scored_on" in event else ")"
    minutes, seconds = divmod(int(event["eta"]), 60)
    return line + f", lr {event['lr']:.2e}, {event['seconds']:.0f} s, eta {minutes}m{seconds:02d}s"


def _test_table(event: Mapping[str, Any]) -> str:
    """The test report's means: loss, then Dice, IoU and HD95 per class."""
    lines = [f"test set: {event['cases']} cases scored with {event['checkpoint']}: loss {event['loss']:.4f}",
             f"  {'class':<16}  {'Dice':>6}  {'IoU':>6}  {'HD95 mm':>8}"]
    for name, dice in event["dice"].items():
        lines.append(f"  {name:<16}  {dice:6.4f}  {event['iou'][name]:6.4f}  {_millimetres(event['hd95'][name]):>8}")
    lines.append(f"  {'mean':<16}  {event['mean_dice']:6.4f}")
    if "scored_on" in event:
        lines.append(f"scored on {event['scored_on']}")
    return "\n".join(lines + [f"written to {event['report']}"])


def _cross_validation_table(report: Mapping[str, Any]) -> str:
    """Validation Dice per fold and class, then the mean and standard deviation over the folds."""
    names = report["labels"]
    widths = {value: max(6, len(name)) for value, name in names.items()}

    def row(title: str, scores: Mapping[str, Any]) -> str:
        return f"  {title:<18}" + "".join(f"  {scores[value]['dice']:>{widths[value]}.4f}" for value in names)

    lines = [f"{'validation Dice':<20}" + "".join(f"  {name:>{widths[value]}}" for value, name in names.items())]
    lines += [row(f"fold {entry['fold']}", entry["mean"]) for entry in report["per_fold"]]
    lines += [row("mean over folds", report["mean"]), row("std over folds", report["std"])]
    test = report.get("test")
    if test:
        lines.append(f"test Dice ({len(test['cases'])} cases)")
        lines.append(row("ensemble", test["ensemble"]["mean"]))
        if test["mean_of_folds"]:
            lines.append(row("mean of the folds", test["mean_of_folds"]))
    return "\n".join(lines)


def _millimetres(value: float | None) -> str:
    return "inf" if value is None or value == float("inf") else f"{value:.2f}"
