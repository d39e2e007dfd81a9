"""How much annotation a model needs: Dice on whole held-out cases against annotated slices and cases.

Two curves on the hippocampus data (../shared/data/msd_hippocampus), each point one training run
with ``--time-budget`` (the same minutes for every point of a curve) and Dice measured on whole,
densely labelled held-out cases:

  slices: the training labelmaps keep every n-th axial slice (array axis 0 of the (z, y, x) order,
          the images' third axis, superior in their RAS affine); the other slices become the label
          ``ignore``, so training learns from the annotated slices only (the 3D U-Net's sparse
          setting). n = 1 is dense annotation.
  cases:  dense labels on the first k training cases (k = 1, 2, 4, 8, 16, all).

The held-out cases are the validation cases of the trainer's default split (seed 0, 20 %); the
training cases are the others, in name order, so that fewer cases are a prefix of more. Training
runs use no validation (``--val-fraction 0``): the model at the end of the budget is scored, as a
user with a handful of labelled cases would get it. The network is the bundled model's (depth 4,
``--depth``) with epochs of 50 iterations (``--iterations-per-epoch``), so that a short budget
is planned in small steps; everything else is the trainer's defaults. The budget counts the
preparation of the cases, as a user's minutes do.

The protocol at full size (n = 1, 2, 4, 8 at one budget; k = 1, 2, 4, 8, 16, all at 5 and
15 minutes) takes over two hours of CPU; a reduced run names its points::

    .venv/bin/python bench/sparse.py --output /tmp/sparse-bench                  # the full protocol
    .venv/bin/python bench/sparse.py --output /tmp/sparse-bench --minutes 4 --every 1 4 8 --cases 2 8

It prints one JSON line per run and a summary; record both in bench/RESULTS.md with the CPU.
``--plot`` draws both curves from such printed lines (of one or more invocations) into a PNG::

    .venv/bin/python bench/sparse.py --plot run-a.log run-b.log --figure docs/images/sparse-annotation.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib.datalist import Case, load_datalist  # noqa: E402
from UNet3DSegmenterLib.inference.predictor import Predictor  # noqa: E402
from UNet3DSegmenterLib.io import read_volume, write_volume  # noqa: E402
from UNet3DSegmenterLib.metrics import dice  # noqa: E402
from UNet3DSegmenterLib.sparse import keep_every_nth_slice  # noqa: E402
from UNet3DSegmenterLib.training.splits import make_split  # noqa: E402
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
LABELS = {0: "background", 1: "anterior", 2: "posterior"}
IGNORE = 3


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def split(data: Path) -> tuple[list[Case], list[Case]]:
    """(training cases in name order, held-out cases): the trainer's default split."""
    datalist = load_datalist(data)
    chosen = make_split([case.name for case in datalist.cases], 0.2, seed=0)
    return datalist.subset(sorted(chosen.train)), datalist.subset(chosen.validation)


def write_dataset(cases: list[Case], every: int, folder: Path) -> Path:
    """A JSON datalist of ``cases`` with labels kept on every ``every``-th slice (the rest 'ignore')."""
    entries = []
    for case in cases:
        label = case.label
        if every > 1:
            labels = read_volume(case.label)
            label = folder / "labels" / f"{case.name}.nii.gz"
            write_volume(labels.with_array(keep_every_nth_slice(np.rint(labels.array).astype(np.uint8), every,
                                                                IGNORE)), label)
        entries.append({"image": str(case.image.resolve()), "label": str(Path(label).resolve()), "name": case.name})
    names = {str(value): name for value, name in LABELS.items()} | ({str(IGNORE): "ignore"} if every > 1 else {})
    path = folder / "dataset.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"labels": names, "modality": {"0": "MRI"}, "training": entries}))
    return path


def held_out_dice(checkpoint: Path, cases: list[Case]) -> dict:
    """Mean Dice per class over whole held-out cases (dense labels)."""
    predictor = Predictor(checkpoint, device="cpu")
    scores: dict[str, list[float]] = {name: [] for value, name in LABELS.items() if value}
    for case in cases:
        predicted = predictor.predict(read_volume(case.image)).labelmap.array
        reference = np.rint(read_volume(case.label).array)
        for value, name in LABELS.items():
            if value:
                scores[name].append(dice(predicted == value, reference == value))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    return {**means, "mean": float(np.mean(list(means.values())))}


def run(output: Path, training: list[Case], held_out: list[Case], every: int, count: int, minutes: float,
        seed: int, depth: int, iterations: int, workers: int | None) -> dict:
    name = f"every{every}_cases{count}_{minutes:g}min"
    dataset = write_dataset(training[:count], every, output / "data" / name)
    started = time.perf_counter()
    result = train(TrainingConfig(data=dataset, output=output / "runs" / name, time_budget=minutes, val_fraction=0,
                                  seed=seed, overwrite=True, depth=depth, iterations_per_epoch=iterations,
                                  workers=workers))
    seconds = time.perf_counter() - started
    annotated = 1 / every
    record = {"every": every, "cases": count, "minutes": minutes, "annotated_slices": round(annotated, 3),
              "epochs": result.epochs_completed, "train_seconds": round(seconds, 1), "stopped": result.stopped,
              "seconds_per_iteration": result.time_plan.seconds_per_iteration if result.time_plan else None,
              "dice": held_out_dice(result.best_checkpoint, held_out), "held_out_cases": len(held_out)}
    print(json.dumps(record), flush=True)
    return record


def read_records(logs: list[Path]) -> list[dict]:
    """The per-run lines that :func:`run` printed, from any number of logs."""
    records = []
    for log in logs:
        for line in log.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if "every" in record:  # (not the header or the summary)
                records.append(record)
    return records


def plot(records: list[dict], figure: Path) -> None:
    """Mean held-out Dice against annotated slices (left) and against labelled cases (right, one line a budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = max(record["cases"] for record in records)
    shortest = min(record["minutes"] for record in records)  # the slices curve's budget
    fig, (slices, cases) = plt.subplots(1, 2, figsize=(10, 4))
    sparse = sorted((r for r in records if r["cases"] == everything and r["minutes"] == shortest),
                    key=lambda r: r["every"])
    slices.plot([r["every"] for r in sparse], [r["dice"]["mean"] for r in sparse], "o-")
    slices.set_xscale("log", base=2)
    slices.set_xticks([r["every"] for r in sparse], [f"every {r['every']}" if r["every"] > 1 else "all" for r in sparse])
    slices.set_xlabel(f"axial slices labelled ({everything} cases, {shortest:g} min)")
    slices.set_ylabel("mean Dice, held-out cases")
    for minutes in sorted({r["minutes"] for r in records}):
        dense = sorted((r for r in records if r["every"] == 1 and r["minutes"] == minutes), key=lambda r: r["cases"])
        cases.plot([r["cases"] for r in dense], [r["dice"]["mean"] for r in dense], "o-", label=f"{minutes:g} min")
    cases.set_xscale("log", base=2)
    counts = sorted({r["cases"] for r in records if r["every"] == 1})
    cases.set_xticks(counts, [str(count) for count in counts])
    cases.set_xlabel("labelled training cases (every slice)")
    cases.legend(title="training time")
    for axes in (slices, cases):
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    fig.suptitle(f"Hippocampus (anterior and posterior): Dice on {records[0]['held_out_cases']} whole held-out cases")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, help="work folder of the training runs")
    parser.add_argument("--plot", type=Path, nargs="+", help="draw the curves from these printed logs; trains nothing")
    parser.add_argument("--figure", type=Path, default=Path("sparse-annotation.png"), help="the PNG --plot writes")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 15.0],
                        help="time budgets; the slices curve uses the first")
    parser.add_argument("--every", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="keep every n-th axial slice (all training cases, first budget)")
    parser.add_argument("--cases", type=int, nargs="*", default=[1, 2, 4, 8, 16, 0],
                        help="labelled training cases (0: all), dense labels, every budget")
    parser.add_argument("--held-out", type=int, default=None, help="score on the first N held-out cases only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads (1: on a shared machine, 2 OpenMP threads slow down tenfold with load)")
    parser.add_argument("--workers", type=int, default=None,
                        help="patch loader processes (default: the trainer's; 0 keeps each run on one core, "
                             "for two invocations side by side)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--iterations-per-epoch", type=int, default=50)
    args = parser.parse_args()
    if args.plot:
        plot(read_records(args.plot), args.figure)
        return 0
    if args.output is None:
        parser.error("--output is required to train")
    if not args.data.is_dir():
        print(f"{args.data} not found: this benchmark needs the hippocampus data in ../shared/data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    training, held_out = split(args.data)
    held_out = held_out[:args.held_out] if args.held_out else held_out
    print(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(), "training_cases": len(training),
                      "held_out_cases": len(held_out)}), flush=True)
    settings = (args.seed, args.depth, args.iterations_per_epoch, args.workers)
    records = [run(args.output, training, held_out, every, len(training), args.minutes[0], *settings)
               for every in args.every]
    for minutes in args.minutes:
        for count in args.cases:
            count = count or len(training)
            if any(r["every"] == 1 and r["cases"] == count and r["minutes"] == minutes for r in records):
                continue  # the dense run with every case is a point of both curves
            records.append(run(args.output, training, held_out, 1, count, minutes, *settings))
    print(json.dumps({"summary": [{key: record[key] for key in ("every", "cases", "minutes", "epochs")}
                                  | {"mean_dice": round(record["dice"]["mean"], 4)} for record in records]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
