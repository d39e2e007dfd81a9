"""Read an nnU-Net v2 trained-model folder into the engine's own Checkpoint and Ensemble.

A folder ``Trainer__Plans__configuration`` holds ``dataset.json`` (channels, labels), ``plans.json``
(network, patch, spacing, normalisation, resampling) and ``fold_*/checkpoint_final.pth`` (or
``checkpoint_best.pth``). Each fold becomes a :class:`~UNet3DSegmenterLib.checkpoint.Checkpoint`
whose network is built in nnunet_networks.py and whose preprocessing is nnU-Net's own
(nnunet_preprocess.py); several folds are an :class:`~UNet3DSegmenterLib.checkpoint.Ensemble`,
whose logits are averaged, as nnU-Net averages its folds.

nnU-Net loads its checkpoints with ``weights_only=False``, which runs whatever the file says. Here
they load with ``weights_only=True`` and an allow-list of the plain values they hold besides
tensors (numpy scalars and their dtypes in the training log): a file that needs anything else is
refused, and nothing in it runs.

Supported: 3D configurations (3d_fullres, 3d_lowres on its own) with the plain or residual-encoder
U-Net, any number of channels, label-based training. Refused, in one line: 2D configurations,
cascades (a stage that needs the previous stage's segmentation) and region-based training.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .labels import Label, default_color
from .nnunet_networks import NETWORKS
from .nnunet_preprocess import plan_record
from .preprocess import Preprocessing

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
ARCHITECTURE_NAMES = {"PlainConvUNet": "nnunet_plain", "ResidualEncoderUNet": "nnunet_resenc"}
"""nnU-Net's network class -> the engine's registry name (models.ARCHITECTURES)."""
_MAX_JSON_BYTES = 64 * 1024 * 1024


def is_nnunet_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an nnU-Net trained-model folder (it holds plans.json and dataset.json)."""
    path = Path(path)
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def load_nnunet_folder(folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                       checkpoint_name: str = "checkpoint_final.pth"):
    """The folds of an nnU-Net v2 model folder as one Checkpoint (one fold) or an Ensemble (several).

    Args:
        folder: the ``Trainer__Plans__configuration`` folder.
        folds: fold numbers (or ``"all"``); default every ``fold_*`` folder holding ``checkpoint_name``,
            as nnU-Net's predictor chooses.
        checkpoint_name: ``checkpoint_final.pth`` (nnU-Net's default) or ``checkpoint_best.pth``.

    Example::

        >>> model = load_nnunet_folder("Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres", folds=[0])
        >>> Predictor(model).predict(read_volume("case.nii.gz"))
    """
    from .checkpoint import Ensemble

    folder = Path(folder)
    if not is_nnunet_folder(folder):
        raise UserError(f"{folder} is not an nnU-Net model folder (it needs plans.json and dataset.json): give the "
                        "Trainer__Plans__configuration folder")
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise UserError(f"unknown nnU-Net checkpoint name {checkpoint_name!r}: choose one of {', '.join(CHECKPOINT_NAMES)}")
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    files = _fold_files(folder, folds, checkpoint_name)
    members = [_fold_checkpoint(folder, fold, file, plans, dataset) for fold, file in files]
    if len(members) == 1:
        return members[0]
    return Ensemble(members, {"from": f"nnU-Net v2 folder {folder}", "folds": ", ".join(str(fold) for fold, _ in files),
                              "average": "logits, as nnU-Net averages its folds"})


def nnunet_source(path: str | os.PathLike) -> tuple[Path, list[str] | None, str] | None:
    """What ``path`` asks of an nnU-Net model folder: (folder, folds or None for all, checkpoint name).

    The folder itself means every trained fold; ``FOLDER/fold_0`` that fold; ``FOLDER/fold_0/checkpoint_best.pth``
    that fold's checkpoint of that name. None when ``path`` is none of these.
    """
    path = Path(path)
    if is_nnunet_folder(path):
        return path, None, "checkpoint_final.pth"
    if path.is_dir() and path.name.startswith("fold_") and is_nnunet_folder(path.parent):
        return path.parent, [path.name[5:]], "checkpoint_final.pth"
    if path.suffix == ".pth" and path.parent.name.startswith("fold_") and is_nnunet_folder(path.parent.parent):
        return path.parent.parent, [path.parent.name[5:]], path.name
    return None


def nnunet_model_files(path: str | os.PathLike) -> list[Path]:
    """The files an nnU-Net model (see :func:`nnunet_source`) is read from: plans.json, dataset.json and the
    checkpoints of its chosen (else every trained) fold."""
    source = nnunet_source(path)
    assert source is not None, f"{path} is no nnU-Net model"
    folder, folds, checkpoint_name = source
    names = folds or [fold.name[5:] for fold in sorted(folder.glob("fold_*")) if (fold / checkpoint_name).is_file()]
    return [folder / "plans.json", folder / "dataset.json", *(folder / f"fold_{name}" / checkpoint_name for name in names)]


def _read_json(path: Path) -> dict:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes, too large for an nnU-Net record: check the folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: not JSON ({error}); check the nnU-Net folder") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not an nnU-Net record (a JSON object is needed)")
    return record


def _fold_files(folder: Path, folds: Sequence[int | str] | None, checkpoint_name: str) -> list[tuple[str, Path]]:
    if folds is None:
        names = sorted((path.name[5:] for path in folder.glob("fold_*")
                        if (path / checkpoint_name).is_file() and (path.name[5:].isdigit() or path.name == "fold_all")),
                       key=lambda fold: (not fold.isdigit(), int(fold) if fold.isdigit() else 0))
        if not names:
            raise UserError(f"{folder} holds no fold_*/{checkpoint_name}: finish training, or choose another "
                            f"checkpoint ({', '.join(CHECKPOINT_NAMES)})")
    else:
        names = [str(fold) for fold in folds]
    files = [(name, folder / f"fold_{name}" / checkpoint_name) for name in names]
    for name, file in files:
        if not file.is_file():
            raise UserError(f"fold {name} of {folder} has no {checkpoint_name}: choose folds that were trained")
    return files


def safe_load(path: Path) -> dict:
    """An nnU-Net checkpoint loaded with ``weights_only=True`` and the allow-list of plain numpy values."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise UserError(f"{path}: loading nnU-Net checkpoints safely needs PyTorch 2.5 or newer (this is "
                        f"{torch.__version__}): upgrade PyTorch")
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120]
        raise UserError(f"refused to load {path}: it holds Python objects beyond weights and plain values "
                        f"({reason}); nothing in it was run") from None
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        raise UserError(f"cannot read nnU-Net checkpoint {path}: not a PyTorch checkpoint or damaged "
                        f"({type(error).__name__})") from None
    weights = record.get("network_weights") if isinstance(record, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise UserError(f"{path} is not an nnU-Net checkpoint (no network_weights): give a fold's checkpoint_final.pth")
    return record


def _numpy_allow_list() -> list:
    """numpy's scalar reconstruction and the dtypes of plain numbers: what nnU-Net's training log holds."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(kind)) for kind in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                                  "uint8", "uint16", "uint32", "uint64", "bool")]
    return [multiarray.multiarray.scalar, np.dtype, *dtypes]


def _configuration(folder: Path, plans: dict, record: dict, path: Path) -> tuple[str, dict]:
    """The configuration this folder was trained with (the last part of its name, else the checkpoint's record),
    with what it inherits merged in."""
    configurations = plans.get("configurations") or {}
    name = folder.name.split("__")[-1]
    if name not in configurations:
        name = str((record.get("init_args") or {}).get("configuration", ""))
    if name not in configurations:
        raise UserError(f"{folder} does not say which configuration of its plans.json it holds (the folder is "
                        "named Trainer__Plans__configuration by nnU-Net): keep nnU-Net's folder name")
    configuration, seen = dict(configurations[name]), {name}
    while "inherits_from" in configuration:
        parent = configuration.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise UserError(f"{path.parent.parent / 'plans.json'}: configuration {name} inherits from an unknown or "
                            f"circular {parent}")
        seen.add(parent)
        configuration = {**configurations[parent], **configuration}
    if configuration.get("previous_stage") or "cascade" in name:
        raise UserError(f"{folder} is a cascade stage ({name}), which needs the previous stage's segmentation: "
                        "not supported; use a 3d_fullres model folder")
    if len(configuration.get("patch_size") or []) != 3:
        raise UserError(f"{folder} is a 2D model ({name}): only 3D configurations are supported; use a 3d_fullres "
                        "model folder")
    return name, configuration


def _labels(dataset: dict, path: Path) -> list[Label]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path / 'dataset.json'} names no labels")
    if "regions_class_order" in dataset or any(isinstance(value, (list, tuple)) for value in labels.values()):
        raise UserError(f"{path} is a region-based nnU-Net model (overlapping regions, sigmoid outputs): not supported")
    named = sorted(((int(value), str(name)) for name, value in labels.items() if name != "ignore"))
    return [Label(value, name, default_color(index)) for index, (value, name) in enumerate(named)]


def _architecture(configuration: dict, channels: int, classes: int, folder: Path) -> tuple[str, dict]:
    network = configuration.get("architecture")
    if network is None:  # plans written by nnU-Net before 2.3 name the network in the configuration itself
        return _architecture_before_2_3(configuration, channels, classes, folder)
    class_name = str(network.get("network_class_name", "")).split(".")[-1]
    if class_name not in ARCHITECTURE_NAMES:
        raise UserError(f"{folder} uses the network {class_name or 'of no name'}: supported are "
                        f"{', '.join(NETWORKS)}")
    arguments = {key: value for key, value in dict(network.get("arch_kwargs") or {}).items()
                 if key != "deep_supervision"}
    return ARCHITECTURE_NAMES[class_name], {**arguments, "in_channels": channels, "out_channels": classes}


def _architecture_before_2_3(configuration: dict, channels: int, classes: int, folder: Path) -> tuple[str, dict]:
    """The network of plans written before nnU-Net 2.3 (TotalSegmentator's among them), as nnU-Net's own
    plans handler reconstructs it."""
    class_name = str(configuration.get("UNet_class_name", ""))
    if class_name not in ARCHITECTURE_NAMES or "conv_kernel_sizes" not in configuration:
        raise UserError(f"{folder}: its plans name no network this engine builds ({class_name or 'none'})")
    kernels, strides = configuration["conv_kernel_sizes"], configuration["pool_op_kernel_sizes"]
    base, most = int(configuration["UNet_base_num_features"]), int(configuration["unet_max_num_features"])
    stages = len(configuration["n_conv_per_stage_encoder"])
    arguments = {"n_stages": stages, "features_per_stage": [min(base * 2 ** stage, most) for stage in range(stages)],
                 "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": strides,
                 "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"], "conv_bias": True,
                 "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                 "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                 "in_channels": channels, "out_channels": classes}
    stage_key = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    arguments[stage_key] = configuration["n_conv_per_stage_encoder"]
    return ARCHITECTURE_NAMES[class_name], arguments


def _spacing_xyz(plan: dict) -> tuple[float, float, float]:
    """The plans' target spacing (in nnU-Net's transposed axes) as this engine writes spacings: x, y, z."""
    zyx = [0.0, 0.0, 0.0]
    for position, axis in enumerate(plan["transpose_forward"]):
        zyx[axis] = plan["spacing"][position]
    return (zyx[2], zyx[1], zyx[0])


def _fold_checkpoint(folder: Path, fold: str, path: Path, plans: dict, dataset: dict):
    from .checkpoint import Checkpoint, checked_checkpoint

    record = safe_load(path)
    if dataset.get("overwrite_image_reader_writer") == "NibabelIOWithReorient":
        raise UserError(f"{folder} was trained on images turned to RAS by nibabel (NibabelIOWithReorient): not "
                        "supported")

    def make() -> Checkpoint:  # what the JSON records say, read inside the check: a malformed one is one line
        name, configuration = _configuration(folder, plans, record, path)
        channels = len(dataset.get("channel_names") or dataset.get("modality") or {})
        labels = _labels(dataset, folder)
        architecture, arguments = _architecture(configuration, channels, len(labels), folder)
        plan = plan_record(plans, configuration, record.get("inference_allowed_mirroring_axes"))
        preprocessing = Preprocessing(spacing=_spacing_xyz(plan), normalization="none", channels=channels,
                                      nnunet=plan)
        return Checkpoint(architecture, arguments, dict(record["network_weights"]), labels, preprocessing,
                          tuple(configuration["patch_size"]), overlap=0.5,
                          training=_training(folder, fold, name, record, dataset, plans))

    return checked_checkpoint(make, str(path))


def _training(folder: Path, fold: str, configuration: str, record: dict, dataset: dict, plans: dict) -> dict:
    """Where the network came from, as ``info`` shows it and an imported checkpoint keeps it."""
    training = {"from": "nnU-Net v2", "folder": str(folder), "trainer": str(record.get("trainer_name", "")),
                "plans": str(plans.get("plans_name", "")), "configuration": configuration, "fold": fold,
                "epochs": int(record.get("current_epoch", 0) or 0)}
    for key in ("name", "description", "reference", "licence", "license", "release"):
        if isinstance(dataset.get(key), str) and dataset[key]:
            training["dataset " + key] = dataset[key]
    return training
