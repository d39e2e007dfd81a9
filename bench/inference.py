"""Inference speed and memory: our predictor against MONAI's sliding_window_inference, same weights.

For each benchmark volume (a generated 192x192x160 phantom, and the MNI152 template from
../shared/data when present) a classic UNet3D (widths 16-32-64-128-256) is trained briefly on that
volume, so that its predictions are confident as a trained model's are; then the same weights run
through
  (a) MONAI: sliding_window_inference, roi 96^3, overlap 0.5, gaussian, sw_batch_size 2, fp32, no_grad;
  (b) ours:  Predictor with its defaults (patch 96^3, overlap 0.5),
alternating, several repeats. Both include z-score normalisation and the argmax labelmap.

Prints one JSON document: seconds (median), megavoxels/s, peak RSS over the baseline, our/MONAI time
ratio, achieved GFLOP/s of the forward passes against a single Conv3d measured on this machine, and
the voxel agreement of our labelmap with MONAI's fp32 labelmap.

    python bench/inference.py [--repeats 3] [--norms batch instance] [--train-iterations 40]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label  # noqa: E402
from UNet3DSegmenterLib.inference.predictor import Predictor  # noqa: E402
from UNet3DSegmenterLib.inference.sliding_window import window_positions  # noqa: E402
from UNet3DSegmenterLib.io import read_volume  # noqa: E402
from UNet3DSegmenterLib.models import UNet3D  # noqa: E402
from UNet3DSegmenterLib.phantom import make_phantom  # noqa: E402
from UNet3DSegmenterLib.preprocess import Preprocessing, normalize  # noqa: E402

PATCH = (96, 96, 96)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class PeakMemory:
    """Samples this process's resident memory every few milliseconds; reports the peak over the start."""

    def __enter__(self):
        _release_free_memory()
        self.baseline = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.increase_mb = (self.peak - self.baseline) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _release_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def benchmark_volumes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    image, label = make_phantom(shape=(160, 192, 192), spacing=(1.0, 1.0, 1.0), seed=7, classes=2)
    volumes = [("phantom_192x192x160", image.array.astype(np.float32), label.array.astype(np.int64))]
    mni = SHARED / "mni152_2009a_tissue"
    if mni.is_dir():
        image = read_volume(next((mni / "images").glob("*.nii.gz")))
        label = read_volume(next((mni / "labels").glob("*.nii.gz")))
        volumes.append(("mni152_197x233x189", image.array.astype(np.float32), label.array.astype(np.int64)))
    else:
        print(f"note: {mni} not found, benchmarking the phantom only", file=sys.stderr)
    return volumes


def train_briefly(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, iterations: int) -> None:
    """A few dozen Adam steps on 64^3 patches of the volume itself: enough for confident outputs."""
    generator = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    normalized = normalize(image[None], Preprocessing())[0]
    model.train()
    for _ in range(iterations):
        starts = [generator.integers(0, s - 64 + 1, size=2) for s in image.shape]
        windows = [tuple(slice(int(starts[axis][b]), int(starts[axis][b]) + 64) for axis in range(3)) for b in range(2)]
        x = torch.from_numpy(np.stack([normalized[w] for w in windows]))[:, None]
        y = torch.from_numpy(np.stack([label[w] for w in windows]))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def forward_gflop(model: torch.nn.Module, patch=PATCH) -> float:
    """Multiply-adds x 2 of every convolution for one window."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.ConvTranspose3d):
            total[0] += 2 * inputs[0].numel() * module.weight.shape[1] * module.weight[0, 0].numel()
        else:
            total[0] += 2 * output.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.no_grad():
        model(torch.zeros(1, 1, *patch))
    for hook in hooks:
        hook.remove()
    return total[0] / 1e9


def single_conv_gflops() -> dict:
    """The GFLOP/s one 32->32 3x3x3 Conv3d reaches here, fp32 (PyTorch default) and bf16 channels-last."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).eval()
    x = torch.randn(2, 32, 96, 96, 96)
    flop = 2 * x.numel() * 32 * 27
    results = {}
    for name, dtype, layout in [("fp32", torch.float32, torch.contiguous_format),
                                ("bf16_channels_last", torch.bfloat16, torch.channels_last_3d)]:
        layer = conv.to(dtype=dtype, memory_format=layout)
        inputs = x.to(dtype=dtype, memory_format=layout)
        with torch.inference_mode():
            layer(inputs)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                layer(inputs)
                times.append(time.perf_counter() - start)
        results[name] = round(flop / min(times) / 1e9, 1)
    return results


def run_monai(model, image: np.ndarray) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    tensor = torch.from_numpy(normalize(image[None], Preprocessing()))[None]
    with torch.no_grad():
        logits = sliding_window_inference(tensor, PATCH, 2, model, overlap=0.5, mode="gaussian")
    return logits[0].argmax(0).numpy().astype(np.uint8)


def run_ours(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    from UNet3DSegmenterLib.volume import Volume

    return predictor.predict(Volume(image)).labelmap.array


def bench_volume(name: str, image: np.ndarray, label: np.ndarray, norm: str, repeats: int, iterations: int) -> dict:
    torch.manual_seed(0)
    classes = int(label.max()) + 1
    model = UNet3D(in_channels=1, out_channels=classes, depth=5, base_width=16, norm=norm)
    train_briefly(model, image, label, iterations)
    labels = [Label(value, f"class {value}") for value in range(classes)]
    checkpoint = Checkpoint.from_model(model, labels, Preprocessing(spacing=None), PATCH, overlap=0.5)
    predictor = Predictor(checkpoint, device="cpu")
    engines = {"monai": lambda: run_monai(model, image), "ours": lambda: run_ours(predictor, image)}
    times = {engine: [] for engine in engines}
    memory = {engine: 0.0 for engine in engines}
    outputs = {}
    run_ours(predictor, image[:96, :96, :96])  # one warm-up each, outside the timings
    run_monai(model, image[:96, :96, :96])
    for _ in range(repeats):
        for engine, function in engines.items():
            with PeakMemory() as peak:
                start = time.perf_counter()
                outputs[engine] = function()
                times[engine].append(time.perf_counter() - start)
            memory[engine] = max(memory[engine], peak.increase_mb)
    windows = len(window_positions(image.shape, PATCH, 0.5))
    gflop = forward_gflop(model) * windows
    megavoxels = image.size / 1e6
    result = {"volume": name, "shape_zyx": list(image.shape), "norm": norm, "windows": windows,
              "forward_gflop": round(gflop, 1), "repeats": repeats}
    for engine in engines:
        seconds = statistics.median(times[engine])
        result[engine] = {"seconds_median": round(seconds, 2), "seconds_all": [round(t, 2) for t in times[engine]],
                          "megavoxels_per_s": round(megavoxels / seconds, 3),
                          "achieved_gflops": round(gflop / seconds, 1),
                          "peak_rss_increase_mb": round(memory[engine], 1)}
    result["speedup_ours_vs_monai"] = round(result["monai"]["seconds_median"] / result["ours"]["seconds_median"], 2)
    result["time_ratio_ours_over_monai"] = round(1 / result["speedup_ours_vs_monai"], 3)
    result["memory_ratio_ours_over_monai"] = round(memory["ours"] / max(memory["monai"], 1e-6), 3)
    result["voxel_agreement_with_fp32"] = round(float((outputs["ours"] == outputs["monai"]).mean()), 6)
    result["fp32_labelmap_accuracy_vs_reference"] = round(float((outputs["monai"] == label).mean()), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--norms", nargs="+", default=["batch", "instance"], choices=["batch", "instance"])
    parser.add_argument("--train-iterations", type=int, default=40)
    args = parser.parse_args()
    report = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "single_conv3d_gflops": single_conv_gflops(),
        "results": [],
    }
    for name, image, label in benchmark_volumes():
        for norm in args.norms:
            report["results"].append(bench_volume(name, image, label, norm, args.repeats, args.train_iterations))
            print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
