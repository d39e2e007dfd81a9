"""``unet3d-segmenter train``: train a model from labelled volumes.

Everything not given is chosen from the data (spacing, patch size, normalisation), so
``unet3d-segmenter train --data DATA --output RUN`` is a sensible first run. Ctrl-C (or SIGTERM,
which is how the Slicer module cancels) stops after the current iteration and saves ``last.pt``;
``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import UserError
from .progress import ProgressBar, emit_json

EXIT_CANCELLED = 130

_DATA_HELP = ("training data: a folder with images/ and labels/ (same file names), a Medical Segmentation "
              "Decathlon folder (dataset.json, imagesTr/, labelsTr/), or a JSON list of {\"image\", \"label\"} pairs")


_EXAMPLES = """\
Everything not given is chosen from the training cases (spacing, patch size, normalisation).

examples:
  unet3d-segmenter train --data Task04_Hippocampus --output runs/hippocampus
  unet3d-segmenter train --data cases/ --output runs/fold0 --folds 5 --fold 0 --labels 1=liver 2=tumour
  unet3d-segmenter train --data cases/ --output runs/fold0 --resume          (continue a stopped run)
  torchrun --nproc_per_node=4 -m UNet3DSegmenterLib train --data cases/ --output runs/ddp   (4 GPUs)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options, grouped as a newcomer reads them."""
    parser.epilog = _EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--data", "-d", required=True, type=Path, help=_DATA_HELP)
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="folder for best.pt, last.pt, log.csv, curves.png, split.json, validation_report.json")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None, choices=["unet3d", "resunet3d", "vnet"], help="network (default unet3d)")
    model.add_argument("--depth", type=int, default=5, help="levels including the bottleneck (default 5)")
    model.add_argument("--base-width", type=int, default=16, help="channels at the first level (default 16)")
    model.add_argument("--norm", default="instance", choices=["instance", "batch"])
    model.add_argument("--dropout", type=float, default=0.0)
    data = parser.add_argument_group("preprocessing (default: chosen from the training cases)")
    data.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                      help="patch in voxels (default: median case shape, rounded and capped)")
    data.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                      help="resample to this spacing in mm (default: median case spacing)")
    data.add_argument("--normalization", default="auto", choices=["auto", "zscore", "ct", "none"],
                      help="auto: 'ct' window for CT datasets, z-score otherwise")
    data.add_argument("--labels", nargs="+", metavar="VALUE=NAME",
                      help="label names, e.g. 1=anterior 2=posterior (default: dataset.json or 'label N')")
    data.add_argument("--crop-foreground", action="store_true", help="cut training cases to their non-zero box")
    data.add_argument("--cache-dir", type=Path, help="keep prepared cases here for later runs")
    data.add_argument("--resample-labels", action="store_true",
                      help="resample labelmaps that lie on another grid onto their image instead of refusing them")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, default=100)
    optimisation.add_argument("--iterations-per-epoch", type=int, default=100, help="patch batches per epoch")
    optimisation.add_argument("--batch-size", type=int, default=2)
    optimisation.add_argument("--lr", type=float, help="learning rate (default 1e-3 AdamW, 1e-2 SGD)")
    optimisation.add_argument("--weight-decay", type=float, help="(default 1e-2 AdamW, 3e-5 SGD)")
    optimisation.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    optimisation.add_argument("--schedule", default="poly", choices=["poly", "cosine", "constant"],
                              help="learning-rate decay after the warm-up")
    optimisation.add_argument("--warmup-epochs", type=int, default=1)
    optimisation.add_argument("--loss", default="dicece", choices=["dicece", "dice", "focal", "weighted_dice"])
    optimisation.add_argument("--class-weights", type=float, nargs="+", metavar="W",
                              help="weighted_dice: one weight per class, background first (default: inverse frequency)")
    optimisation.add_argument("--grad-clip", type=float, default=12.0, help="largest gradient norm (0: off)")
    optimisation.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                              help="auto: mixed precision on CUDA and on CPUs with native bf16, else fp32")
    optimisation.add_argument("--no-augment", action="store_true", help="switch data augmentation off")
    optimisation.add_argument("--foreground-fraction", type=float, default=1 / 3,
                              help="share of patches centred on a labelled voxel (default 1/3)")
    validation = parser.add_argument_group("validation and stopping")
    validation.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (0: none)")
    validation.add_argument("--folds", type=int, metavar="K", help="k-fold cross-validation: number of folds")
    validation.add_argument("--fold", type=int, metavar="I", help="which fold validates (0..K-1)")
    validation.add_argument("--val-every", type=int, default=1, help="epochs between validations")
    validation.add_argument("--patience", type=int, help="stop after this many epochs without a better Dice")
    validation.add_argument("--dice-threshold", type=float, help="stop once every class reaches this Dice")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--workers", type=int, help="patch loader processes (default: automatic)")
    run_group.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
    run_group.add_argument("--init", type=Path, metavar="CKPT", help="start from this checkpoint's weights")
    run_group.add_argument("--progress-json", action="store_true",
                           help="print progress as one JSON object per line on stdout (for the Slicer module)")


def config_from_arguments(args: argparse.Namespace):
    """The :class:`~UNet3DSegmenterLib.trainer.TrainingConfig` the options describe."""
    from .trainer import TrainingConfig

    if (args.folds is None) != (args.fold is None):
        raise UserError("k-fold needs both --folds K and --fold I")
    return TrainingConfig(
        data=args.data, output=args.output, architecture=args.arch, depth=args.depth, base_width=args.base_width,
        norm=args.norm, dropout=args.dropout, patch_size=args.patch_size, spacing=args.spacing,
        normalization=args.normalization, label_names=_label_names(args.labels), crop_foreground=args.crop_foreground,
        cache_dir=args.cache_dir, resample_labels=args.resample_labels, epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, loss=args.loss, class_weights=args.class_weights, grad_clip=args.grad_clip,
        precision=args.precision, augment=not args.no_augment, foreground_fraction=args.foreground_fraction,
        val_fraction=args.val_fraction, folds=args.folds, fold=args.fold, val_every=args.val_every,
        patience=args.patience, dice_threshold=args.dice_threshold, device=args.device, seed=args.seed,
        workers=args.workers, resume=args.resume, init=args.init,
    )


def _label_names(items: list[str] | None) -> dict[int, str] | None:
    if not items:
        return None
    names = {}
    for item in items:
        value, separator, name = item.partition("=")
        if not separator or not value.strip().isdigit() or not name.strip():
            raise UserError(f"--labels {item!r}: write each label as VALUE=NAME, e.g. 1=liver")
        names[int(value)] = name.strip()
    return names


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    config = config_from_arguments(args)
    reporter = _JsonReporter() if args.progress_json else _TerminalReporter()
    stop = _StopOnSignal()
    with stop:
        result = train(config, progress=reporter, cancel=stop)
    reporter.close()
    if result.stopped == "cancelled":
        print(f"stopped; {result.last_checkpoint} holds the weights so far: continue with --resume", file=sys.stderr)
        return EXIT_CANCELLED
    if not args.progress_json:
        dice = "no validation cases" if result.best_dice != result.best_dice else f"mean Dice {result.best_dice:.4f}"
        print(f"best checkpoint: {result.best_checkpoint} ({dice}, epoch {result.best_epoch}); "
              f"everything is in {result.output}", file=sys.stderr)
    return 0


class _StopOnSignal:
    """The first Ctrl-C or SIGTERM asks training to stop after the current iteration; a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __call__(self) -> bool:
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

    def __call__(self, event: dict) -> None:
        emit_json(**event)

    def close(self) -> None:
        pass


class _TerminalReporter:
    """On a terminal a live bar per epoch; always one summary line per epoch, on stderr."""

    def __init__(self):
        self.bar: ProgressBar | None = None
        self.interactive = sys.stderr.isatty()

    def __call__(self, event: dict) -> None:
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

    def _bar(self, label: str, unit: str) -> ProgressBar:
        if self.bar is None or self.bar.label != label:
            self.close()
            self.bar = ProgressBar(label, unit)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _epoch_line(event: dict) -> str:
    line = f"epoch {event['epoch']}/{event['epochs']}: loss {event['train_loss']:.4f}"
    if "dice" in event:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in event["dice"].items())
        line += f", Dice {scores} (mean {event['mean_dice']:.3f})"
    minutes, seconds = divmod(int(event["eta"]), 60)
    return line + f", lr {event['lr']:.2e}, {event['seconds']:.0f} s, eta {minutes}m{seconds:02d}s"
