"""Inference speed and memory: our predictor against MONAI's sliding_window_inference, same weights.

Every goal of the inference work is measured by one case of this script, in one process:

- ``volumes``: a generated 192x192x160 phantom, and the MNI152 template from ../shared/data when
  present, each with a classic UNet3D (widths 16-32-64-128-256) in batch norm and in instance norm,
  trained briefly on that volume so that its outputs are as confident as a trained model's; the same
  weights through (a) MONAI's sliding_window_inference (roi 96^3, overlap 0.5, gaussian,
  sw_batch_size 2, fp32, no_grad) and (b) our Predictor with its defaults (patch 96^3, overlap 0.5),
  alternating, several repeats. Both include z-score normalisation and the argmax labelmap.
- ``hippocampus``: the bundled model (Resources/Models/hippocampus.pt) on real hippocampus crops
  (the validation cases of its split), MONAI (roi 40x56x40, same settings) against our Predictor,
  volumes already in memory.
- ``paths``: forward time per batch of each inference path (the channels-last rewrite, the untouched
  network under autocast, float32) and the one the calibration picks, at several window sizes,
  for the bundled model and the 16-256 UNet3D.
- ``large``: a CT-sized volume (400x512x512 by default) through our Predictor: seconds and peak
  memory over the process's memory before, against the input's float32 size.
- ``folder``: ``predict`` on a folder of real crops: cases per second with reading ahead and writing
  behind (predict_files) against one case after the other (predict_file), both with one predictor.
- ``oom`` (``--device cuda`` only): the out-of-memory fallback on a real GPU, squeezed by a memory
  cap: the window sums move to the CPU, then everything does; the labelmap must not change.

With ``--device cuda`` both engines run on the GPU (ours in fp16 autocast, MONAI in fp32).

Prints one JSON document. Peak memory is the rise of resident memory over its level just before a
run (sampled every 5 ms). Use ``--cases`` to run some of them::

    python bench/inference.py [--cases volumes hippocampus paths large folder] [--repeats 3]
        [--norms batch instance] [--train-iterations 40] [--large-shape 400 512 512] [--threads N]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, load_checkpoint  # noqa: E402
from UNet3DSegmenterLib.inference.calibration import CalibratedForward, measure_paths  # noqa: E402
from UNet3DSegmenterLib.inference.predictor import Predictor, predict_file, predict_files  # noqa: E402
from UNet3DSegmenterLib.inference.sliding_window import window_positions  # noqa: E402
from UNet3DSegmenterLib.io import read_volume  # noqa: E402
from UNet3DSegmenterLib.models import UNet3D  # noqa: E402
from UNet3DSegmenterLib.phantom import make_phantom  # noqa: E402
from UNet3DSegmenterLib.preprocess import Preprocessing, normalize  # noqa: E402
from UNet3DSegmenterLib.runtime import cpu_supports_bf16, processor_record  # noqa: E402
from UNet3DSegmenterLib.volume import Volume  # noqa: E402

PATCH = (96, 96, 96)
DEVICE = torch.device("cpu")  # --device
REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared" / "data"
BUNDLED = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"
CASES = ("volumes", "hippocampus", "paths", "large", "folder", "oom")


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


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


# --- volumes: UNet3D 16-256 on the phantom and MNI152 -------------------------------------------

def benchmark_volumes(names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    volumes = []
    if "phantom" in names:
        image, label = make_phantom(shape=(160, 192, 192), spacing=(1.0, 1.0, 1.0), seed=7, classes=2)
        volumes.append(("phantom_192x192x160", image.array.astype(np.float32), label.array.astype(np.int64)))
    mni = SHARED / "mni152_2009a_tissue"
    if "mni152" not in names:
        pass
    elif mni.is_dir():
        image = read_volume(next((mni / "images").glob("*.nii.gz")))
        label = read_volume(next((mni / "labels").glob("*.nii.gz")))
        volumes.append(("mni152_197x233x189", image.array.astype(np.float32), label.array.astype(np.int64)))
    else:
        print(f"note: {mni} not found, skipping it", file=sys.stderr)
    return volumes


def train_briefly(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, iterations: int) -> None:
    """A few dozen Adam steps on 64^3 patches of the volume itself: enough for confident outputs."""
    generator = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    normalized = normalize(image[None], Preprocessing())[0]
    model.to(DEVICE).train()
    for _ in range(iterations):
        starts = [generator.integers(0, s - 64 + 1, size=2) for s in image.shape]
        windows = [tuple(slice(int(starts[axis][b]), int(starts[axis][b]) + 64) for axis in range(3)) for b in range(2)]
        x = torch.from_numpy(np.stack([normalized[w] for w in windows]))[:, None].to(DEVICE)
        y = torch.from_numpy(np.stack([label[w] for w in windows])).to(DEVICE)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def trained_unet(norm: str, image: np.ndarray, label: np.ndarray, iterations: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_channels=int(label.max()) + 1, depth=5, base_width=16, norm=norm)
    train_briefly(model, image, label, iterations)
    return model


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
        model(torch.zeros(1, 1, *patch, device=next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    return total[0] / 1e9


def single_conv_gflops() -> dict:
    """The GFLOP/s one 32->32 3x3x3 Conv3d reaches here, fp32 (PyTorch default) and bf16 channels-last.

    bf16 only where it is native: elsewhere PyTorch falls back to a one-thread reference convolution that
    takes many minutes for this one layer and says nothing about the engine."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).eval()
    x = torch.randn(2, 32, 96, 96, 96)
    flop = 2 * x.numel() * 32 * 27
    native_bf16 = cpu_supports_bf16()
    results: dict = {} if native_bf16 else {"bf16_channels_last": "not native here: not measured"}
    kinds = [("fp32", torch.float32, torch.contiguous_format)]
    if native_bf16:
        kinds.append(("bf16_channels_last", torch.bfloat16, torch.channels_last_3d))
    for name, dtype, layout in kinds:
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


def run_monai(model, image: np.ndarray, roi=PATCH) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    tensor = torch.from_numpy(normalize(image[None], Preprocessing()))[None].to(DEVICE)
    with torch.no_grad():
        logits = sliding_window_inference(tensor, roi, 2, model, overlap=0.5, mode="gaussian")
    return logits[0].argmax(0).cpu().numpy().astype(np.uint8)


def run_ours(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    return predictor.predict(Volume(image)).labelmap.array


def compare(engines: dict, repeats: int) -> tuple[dict, dict, dict, dict]:
    """Alternating runs of each engine: wall seconds, CPU seconds and peak memory (MB) of each run,
    and each engine's last output. With one thread, CPU seconds are a figure that other jobs on a
    shared machine disturb far less than wall-clock time."""
    times: dict = {engine: [] for engine in engines}
    cpu_times: dict = {engine: [] for engine in engines}
    memory = dict.fromkeys(engines, 0.0)
    outputs: dict = {}
    for _ in range(repeats):
        for engine, function in engines.items():
            with PeakMemory() as peak:
                start, cpu = time.perf_counter(), time.process_time()
                outputs[engine] = function()
                times[engine].append(time.perf_counter() - start)
                cpu_times[engine].append(time.process_time() - cpu)
            memory[engine] = max(memory[engine], peak.increase_mb)
    return times, cpu_times, memory, outputs


def bench_volume(name: str, image: np.ndarray, label: np.ndarray, norm: str, repeats: int, iterations: int) -> dict:
    model = trained_unet(norm, image, label, iterations)
    labels = [Label(value, f"class {value}") for value in range(int(label.max()) + 1)]
    checkpoint = Checkpoint.from_model(model.cpu(), labels, Preprocessing(spacing=None), PATCH, overlap=0.5)
    predictor = Predictor(checkpoint, device=str(DEVICE))
    model.to(DEVICE)
    run_ours(predictor, image[:96, :96, :192])  # one warm-up each (and our calibration), outside the timings
    run_monai(model, image[:96, :96, :192])
    times, cpu_times, memory, outputs = compare({"monai": lambda: run_monai(model, image),
                                      "ours": lambda: run_ours(predictor, image)}, repeats)
    windows = len(window_positions(image.shape, PATCH, 0.5))
    gflop = forward_gflop(model) * windows
    result = {"volume": name, "shape_zyx": list(image.shape), "norm": norm, "windows": windows,
              "forward_gflop": round(gflop, 1), "repeats": repeats,
              "our_path": _choices(predictor)}
    for engine in times:
        seconds = statistics.median(times[engine])
        result[engine] = {"seconds_median": round(seconds, 2), "seconds_all": [round(t, 2) for t in times[engine]],
                          "cpu_seconds_median": _median(cpu_times[engine]),
                          "megavoxels_per_s": round(image.size / 1e6 / seconds, 3),
                          "achieved_gflops": round(gflop / seconds, 1),
                          "peak_rss_increase_mb": round(memory[engine], 1)}
    result["speedup_ours_vs_monai"] = round(result["monai"]["seconds_median"] / result["ours"]["seconds_median"], 2)
    result["cpu_time_ratio_monai_over_ours"] = round(result["monai"]["cpu_seconds_median"]
                                                     / result["ours"]["cpu_seconds_median"], 2)
    result["memory_ratio_ours_over_monai"] = round(memory["ours"] / max(memory["monai"], 1e-6), 3)
    result["voxel_agreement_with_fp32"] = round(float((outputs["ours"] == outputs["monai"]).mean()), 6)
    result["fp32_labelmap_accuracy_vs_reference"] = round(float((outputs["monai"] == label).mean()), 4)
    return result


def _choices(predictor: Predictor) -> dict:
    return {"x".join(map(str, shape)): path for forward in predictor._prepared.values()
            for shape, path in getattr(forward, "choices", {}).items()}


# --- hippocampus: the bundled model on real crops ------------------------------------------------

def hippocampus_cases(count: int) -> list[Path]:
    images = SHARED / "msd_hippocampus" / "images"
    if not images.is_dir():
        return []
    names = json.loads((BUNDLED.parent / "hippocampus_split.json").read_text())["validation"]
    return [images / f"{name}.nii.gz" for name in names[:count]]


def bench_hippocampus(repeats: int, count: int) -> dict:
    paths = hippocampus_cases(count)
    if not paths:
        return {"skipped": f"{SHARED / 'msd_hippocampus'} not found"}
    checkpoint = load_checkpoint(BUNDLED)
    model = checkpoint.build_model().eval().to(DEVICE)
    volumes = [read_volume(path) for path in paths]
    arrays = [volume.array.astype(np.float32) for volume in volumes]
    predictor = Predictor(checkpoint, device=str(DEVICE))
    for volume, array in zip(volumes, arrays):  # warm-up (and our calibration of each batch shape)
        predictor.predict(volume)
        run_monai(model, array, checkpoint.patch_size)
    times, cpu_times, memory, outputs = compare({
        "monai": lambda: [run_monai(model, array, checkpoint.patch_size) for array in arrays],
        "ours": lambda: [predictor.predict(volume).labelmap.array for volume in volumes]}, repeats)
    fp32 = Predictor(checkpoint, device=str(DEVICE), precision="fp32")
    fp32._prepared_model = lambda device, dtype, member=0: model  # the network exactly as trained, float32
    ours_fp32 = [fp32.predict(volume).labelmap.array for volume in volumes]
    voxels = sum(array.size for array in arrays)
    result = {"cases": len(paths), "patch": list(checkpoint.patch_size), "repeats": repeats,
              "our_path": _choices(predictor)}
    for engine in times:
        result[engine] = {"seconds_median": _median(times[engine]), "seconds_all": [round(t, 3) for t in times[engine]],
                          "cpu_seconds_median": _median(cpu_times[engine]),
                          "cases_per_s": round(len(paths) / statistics.median(times[engine]), 2),
                          "peak_rss_increase_mb": round(memory[engine], 1)}
    result["speedup_ours_vs_monai"] = round(result["monai"]["seconds_median"] / result["ours"]["seconds_median"], 2)
    result["cpu_time_ratio_monai_over_ours"] = round(result["monai"]["cpu_seconds_median"]
                                                     / result["ours"]["cpu_seconds_median"], 2)
    result["voxel_agreement_with_our_fp32"] = round(_same(outputs["ours"], ours_fp32) / voxels, 6)
    result["voxel_agreement_with_monai_fp32"] = round(_same(outputs["ours"], outputs["monai"]) / voxels, 6)
    result["our_fp32_agreement_with_monai_fp32"] = round(_same(ours_fp32, outputs["monai"]) / voxels, 6)
    return result


def _same(first: list[np.ndarray], second: list[np.ndarray]) -> int:
    return sum(int((one == other).sum()) for one, other in zip(first, second))


# --- paths: each inference path's forward time, and the calibrated choice ------------------------

def bench_paths(repeats: int) -> list[dict]:
    """Forward seconds of a batch of windows through each path at several window sizes."""
    cpu = torch.device("cpu")
    dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    networks = {"bundled_hippocampus": load_checkpoint(BUNDLED).build_model().eval()}
    for norm in ("instance", "batch"):
        torch.manual_seed(0)
        networks[f"unet3d_16_256_{norm}"] = UNet3D(1, 3, depth=5, base_width=16, norm=norm).eval()
    shapes = {"bundled_hippocampus": [(1, 40, 56, 40), (2, 40, 56, 40), (2, 64, 64, 64), (2, 96, 96, 96)],
              "unet3d_16_256_instance": [(2, 64, 64, 64), (2, 96, 96, 96), (2, 128, 128, 128)],
              "unet3d_16_256_batch": [(2, 96, 96, 96)]}
    results = []
    for name, model in networks.items():
        forward = CalibratedForward(model, cpu, dtype)
        paths = dict(forward.paths)
        if dtype != torch.float32:
            paths["fp32"] = model
        for windows, *size in shapes[name]:
            batch = torch.randn(windows, 1, *size)
            with torch.inference_mode():
                forward(batch)  # the calibrated choice (measured, or read from the cache)
            runs = [measure_paths(paths, batch) for _ in range(repeats)]
            seconds = {path: _median([run[path] for run in runs]) for path in paths}
            chosen = forward.choices[tuple(batch.shape)]
            results.append({"network": name, "window": size, "batch": windows, "dtype": str(dtype)[6:],
                            "seconds": seconds, "chosen": chosen,
                            "chosen_over_autocast": round(seconds[chosen] / seconds["autocast"], 3)
                            if "autocast" in seconds else None,
                            "chosen_over_fp32": round(seconds[chosen] / seconds.get("fp32", seconds["plain"]), 3)
                            if "fp32" in seconds or "plain" in seconds else None})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


# --- large: a CT-sized volume --------------------------------------------------------------------

def bench_large(shape: tuple[int, int, int], iterations: int) -> dict:
    """Seconds and peak memory of one CT-sized volume; on CUDA, the sums (and the image) on the GPU."""
    predictor = _large_predictor(iterations)
    volume = Volume(_ct_like(shape), spacing=(0.8, 0.8, 1.0))
    predictor.predict(Volume(volume.array[:96, :192, :192]))  # the model prepared, its paths measured
    model_memory = _model_memory(predictor)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak:
        started = time.perf_counter()
        labelmap = predictor.predict(volume).labelmap.array
        seconds = time.perf_counter() - started
    input_mb = volume.array.size * 4 / 2**20
    result = {"device": str(DEVICE), "shape_zyx": list(shape), "windows": len(window_positions(shape, PATCH, 0.5)),
              "seconds": round(seconds, 1), "megavoxels_per_s": round(volume.array.size / 1e6 / seconds, 3),
              "input_float32_mb": round(input_mb, 1), "peak_rss_increase_mb": round(peak.increase_mb, 1),
              "peak_over_input": round(peak.increase_mb / input_mb, 3),
              "model_weights_and_one_batch_mb": round(model_memory, 1),
              "peak_minus_model_over_input": round((peak.increase_mb - model_memory) / input_mb, 3),
              "labels_found": np.unique(labelmap).tolist(), "our_path": _choices(predictor)}
    if DEVICE.type == "cuda":
        result["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def _large_predictor(iterations: int) -> Predictor:
    """The 16-256 instance-norm UNet3D, trained briefly on a phantom, three classes."""
    image, label = make_phantom(shape=(160, 192, 192), spacing=(1.0, 1.0, 1.0), seed=7, classes=2)
    model = trained_unet("instance", image.array.astype(np.float32), label.array.astype(np.int64), iterations)
    labels = [Label(value, f"class {value}") for value in range(3)]
    checkpoint = Checkpoint.from_model(model.cpu(), labels, Preprocessing(spacing=None), PATCH)
    return Predictor(checkpoint, device=str(DEVICE))


def _ct_like(shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-sized float32 volume: a generated phantom, tiled, with noise (no download needed)."""
    tile, _ = make_phantom(shape=(100, 128, 128), spacing=(1.0, 1.0, 1.0), seed=3, classes=2, modality="CT")
    reps = [-(-size // tile_size) for size, tile_size in zip(shape, tile.array.shape)]
    array = np.tile(tile.array.astype(np.float32), reps)[: shape[0], : shape[1], : shape[2]]
    array += np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 10
    return np.ascontiguousarray(array)


def _model_memory(predictor: Predictor) -> float:
    """Resident memory (MB) a one-band volume adds: the weights' copies and one batch of activations."""
    with PeakMemory() as peak:
        predictor.predict(Volume(np.zeros((96, 96, 192), np.float32)))
    return peak.increase_mb


# --- folder: many small cases with one predictor ------------------------------------------------

def bench_folder(count: int, repeats: int) -> dict:
    paths = hippocampus_cases(count)
    if not paths:
        return {"skipped": f"{SHARED / 'msd_hippocampus'} not found"}
    predictor = Predictor(load_checkpoint(BUNDLED), device=str(DEVICE))
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as folder:
        cases = [(path, Path(folder) / path.name, None) for path in paths]

        def pipelined():
            errors = [error for _, error in predict_files(predictor, cases) if error is not None]
            assert not errors, errors

        def one_by_one():
            for source, output, _ in cases:
                predict_file(predictor, source, output)

        one_by_one()  # warm-up: the model prepared, its paths measured
        times, _, _, _ = compare({"read_ahead_write_behind": pipelined, "one_by_one": one_by_one}, repeats)
    result: dict = {"cases": len(paths), "repeats": repeats}
    for engine in times:
        result[engine] = {"seconds_median": _median(times[engine]),
                          "cases_per_s": round(len(paths) / statistics.median(times[engine]), 2)}
    result["speedup_of_overlap"] = round(result["one_by_one"]["seconds_median"]
                                         / result["read_ahead_write_behind"]["seconds_median"], 3)
    return result


# --- oom: the out-of-memory fallback on a real GPU ----------------------------------------------

def bench_oom(shape: tuple[int, int, int], iterations: int) -> dict:
    """Squeeze the GPU (a per-process memory cap) until the first plan runs out of memory, and check
    that the predictor falls back (sums on the CPU, then the CPU only) and gives the same labelmap."""
    if DEVICE.type != "cuda":
        return {"skipped": "needs --device cuda"}
    import logging

    predictor = _large_predictor(iterations)
    volume = Volume(_ct_like(shape), spacing=(0.8, 0.8, 1.0))
    torch.cuda.reset_peak_memory_stats()
    expected = predictor.predict(Volume(volume.array[:96, :192, :192])).labelmap.array  # model on the GPU
    one_batch = torch.cuda.max_memory_allocated()
    reference = predictor.predict(volume).labelmap.array
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger("UNet3DSegmenterLib").addHandler(handler)
    results = {}
    try:
        for name, cap in (("sums_on_cpu", one_batch + 256 * 2**20), ("cpu_only", 2**20)):
            small = name == "cpu_only"  # the CPU-only plan on a smaller volume, to stay within minutes
            target = Volume(volume.array[:96, :192, :192]) if small else volume
            messages.clear()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), DEVICE)
            started = time.perf_counter()
            labelmap = predictor.predict(target).labelmap.array
            seconds = time.perf_counter() - started
            torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
            agreement = float((labelmap == (expected if small else reference)).mean())
            results[name] = {"gpu_cap_mb": round(cap / 2**20, 1), "shape_zyx": list(target.shape),
                             "warnings": list(messages), "seconds": round(seconds, 1),
                             "voxel_agreement_with_unconstrained": round(agreement, 6)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
        logging.getLogger("UNet3DSegmenterLib").removeHandler(handler)
    return {"one_batch_gpu_mb": round(one_batch / 2**20, 1), **results}


def _openvino_version() -> str | None:
    """The OpenVINO runtime our side may use (offered to the calibration where installed), or None."""
    from UNet3DSegmenterLib.inference.openvino_path import import_without_telemetry, openvino_available

    return import_without_telemetry().__version__ if openvino_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--volumes", nargs="+", default=["phantom", "mni152"], choices=["phantom", "mni152"])
    parser.add_argument("--norms", nargs="+", default=["batch", "instance"], choices=["batch", "instance"])
    parser.add_argument("--train-iterations", type=int, default=40)
    parser.add_argument("--hippocampus-cases", type=int, default=20)
    parser.add_argument("--folder-cases", type=int, default=42)
    parser.add_argument("--large-shape", type=int, nargs=3, default=[400, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--threads", type=int, default=0,
                        help="compute threads for every engine (0: PyTorch's default, one per core)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                    "processor": processor_record(), "native_bf16": cpu_supports_bf16(),
                    "openvino": _openvino_version(),
                    "device": str(DEVICE), "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None},
        "single_conv3d_gflops": single_conv_gflops() if DEVICE.type == "cpu" else None,
    }
    if "volumes" in args.cases:
        report["volumes"] = []
        for name, image, label in benchmark_volumes(args.volumes):
            for norm in args.norms:
                report["volumes"].append(bench_volume(name, image, label, norm, args.repeats, args.train_iterations))
                print(json.dumps(report["volumes"][-1]), file=sys.stderr, flush=True)
    if "hippocampus" in args.cases:
        report["hippocampus"] = bench_hippocampus(args.repeats, args.hippocampus_cases)
        print(json.dumps(report["hippocampus"]), file=sys.stderr, flush=True)
    if "paths" in args.cases and DEVICE.type == "cpu":
        report["paths"] = bench_paths(args.repeats)
    if "large" in args.cases:
        report["large"] = bench_large(tuple(args.large_shape), args.train_iterations)
        print(json.dumps(report["large"]), file=sys.stderr, flush=True)
    if "folder" in args.cases:
        report["folder"] = bench_folder(args.folder_cases, args.repeats)
    if "oom" in args.cases:
        report["oom"] = bench_oom(tuple(args.large_shape), args.train_iterations)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
