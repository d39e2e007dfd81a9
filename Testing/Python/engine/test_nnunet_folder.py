"""nnU-Net v2 model folders run in this engine and give nnU-Net's own results, without nnU-Net installed.

The fixture (data/nnunet/, made by bench/nnunet_fixture.py with nnU-Net 2.8.1) holds two tiny
3d_fullres result folders trained by nnU-Net on two channels of hippocampus MRI (z-score and CT
normalisation), with transposed axes and an anisotropic target spacing, and nnU-Net's own
predictions (nnUNetPredictor) of two cases that no fold trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Ensemble, load_checkpoint, save_checkpoint
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.inference.fast import prepare_for_inference
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.nnunet_folder import load_nnunet_folder, safe_load
from UNet3DSegmenterLib.preprocess import Preprocessing

FIXTURE = Path(__file__).parent / "data" / "nnunet"
PLAIN = FIXTURE / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
RESENC = FIXTURE / "nnUNetTrainerTiny__nnUNetResEncPlans__3d_fullres"
CASES = ("hippocampus_017", "hippocampus_019")
# nnU-Net's runs stored in the fixture: folder, folds, mirroring
RUNS = {"plain_fold0_mirrored": (PLAIN, [0], True), "plain_fold0": (PLAIN, [0], False),
        "plain_folds01": (PLAIN, None, False), "resenc_fold0_mirrored": (RESENC, None, True)}


def _two_channel_case(shared_dataset, case: str):
    """The case as nnU-Net saw it: the MRI as channel 0 ("MRI") and again as channel 1 ("CT")."""
    volume = read_volume(shared_dataset("msd_hippocampus") / "images" / f"{case}.nii.gz")
    return volume.with_array(np.stack([volume.array, volume.array]))


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_nnunet_folder_reproduces_nnunets_own_predictions(run, shared_dataset):
    folder, folds, mirroring = RUNS[run]
    predictor = Predictor(load_nnunet_folder(folder, folds=folds), device="cpu", precision="fp32", tta=mirroring)
    for case in CASES:
        ours = predictor.predict(_two_channel_case(shared_dataset, case)).labelmap
        reference = read_volume(FIXTURE / "predictions" / run / f"{case}.nii.gz")
        assert ours.same_grid(reference)
        assert set(np.unique(reference.array)) == {0, 1, 2}
        assert (ours.array == reference.array).mean() >= 0.999, (run, case)


@pytest.mark.slow
def test_nnunet_folder_in_bf16_stays_close_to_nnunet(shared_dataset):
    """bf16 rounds the activations: the tiny fixture model's logits are near ties, so the bar is lower
    here than for trained models (bench/nnunet_agreement.py measures those)."""
    predictor = Predictor(load_nnunet_folder(RESENC), device="cpu", precision="bf16", tta=True)
    ours = predictor.predict(_two_channel_case(shared_dataset, CASES[0])).labelmap
    reference = read_volume(FIXTURE / "predictions" / "resenc_fold0_mirrored" / f"{CASES[0]}.nii.gz")
    assert (ours.array == reference.array).mean() >= 0.99


def test_folds_default_to_every_trained_fold():
    model = load_checkpoint(PLAIN)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert [member.training["fold"] for member in model.members] == ["0", "1"]
    single = load_nnunet_folder(PLAIN, folds=[1])
    assert isinstance(single, Checkpoint) and single.training["fold"] == "1"


def test_folder_records_labels_channels_and_plans():
    model = load_nnunet_folder(RESENC)
    assert isinstance(model, Checkpoint)
    assert [(label.value, label.name) for label in model.labels] == [(0, "background"), (1, "anterior"),
                                                                     (2, "posterior")]
    assert model.architecture == "nnunet_resenc" and model.in_channels == 2
    assert model.patch_size == (8, 40, 32)
    plan = model.preprocessing.nnunet
    assert [record["scheme"] for record in plan["normalization"]] == ["ZScoreNormalization", "CTNormalization"]
    assert plan["mirror_axes"] == [1, 2] and plan["transpose_forward"] == [2, 0, 1]
    assert model.training["dataset licence"] == "CC-BY-SA 4.0"
    assert "CT (clip" in model.describe() and "fold" in model.describe()


def test_missing_fold_or_checkpoint_name_is_one_clear_error():
    with pytest.raises(UserError, match="fold 3 .* has no checkpoint_final.pth"):
        load_nnunet_folder(PLAIN, folds=[3])
    with pytest.raises(UserError, match="no fold_\\*/checkpoint_best.pth"):
        load_nnunet_folder(PLAIN, checkpoint_name="checkpoint_best.pth")


def test_nnunet_checkpoints_need_the_allow_list_and_load_with_it():
    """nnU-Net's training log holds numpy scalars: plain weights_only loading refuses them; the allow-list
    admits exactly those."""
    checkpoint = PLAIN / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(Exception, match="numpy"):
        torch.load(checkpoint, map_location="cpu", weights_only=True)
    record = safe_load(checkpoint)
    assert isinstance(record["_best_ema"], np.floating) and record["inference_allowed_mirroring_axes"] == (1, 2)


class _NotPlain:
    """Anything beyond plain values: unpickling it would run this module's code."""


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_a_checkpoint_holding_objects_is_refused_and_nothing_runs(tmp_path):
    folder = _copy(RESENC, tmp_path)
    record = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    record["trainer"] = _NotPlain()
    torch.save(record, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(UserError, match="refused to load .*checkpoint_final.pth.*nothing in it was run"):
        load_checkpoint(folder)


def _edit_plans(folder: Path, edit) -> None:
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans["configurations"]["3d_fullres"])
    (folder / "plans.json").write_text(json.dumps(plans))


def test_2d_and_cascade_configurations_are_refused_in_one_line(tmp_path):
    folder = _copy(RESENC, tmp_path)
    _edit_plans(folder, lambda configuration: configuration.update(patch_size=[40, 32]))
    with pytest.raises(UserError, match="2D model"):
        load_checkpoint(folder)
    _edit_plans(folder, lambda configuration: configuration.update(patch_size=[8, 40, 32], previous_stage="3d_lowres"))
    with pytest.raises(UserError, match="cascade"):
        load_checkpoint(folder)


def test_plans_written_before_nnunet_2_3_give_the_same_network(tmp_path):
    """Older plans (TotalSegmentator's models were planned so) name the network by keys of the configuration."""
    folder = _copy(PLAIN, tmp_path)

    def old_style(configuration: dict) -> None:
        arguments = configuration.pop("architecture")["arch_kwargs"]
        configuration.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
                             n_conv_per_stage_encoder=arguments["n_conv_per_stage"],
                             n_conv_per_stage_decoder=arguments["n_conv_per_stage_decoder"],
                             conv_kernel_sizes=arguments["kernel_sizes"], pool_op_kernel_sizes=arguments["strides"],
                             num_pool_per_axis=[1, 2, 2])

    _edit_plans(folder, old_style)
    old, new = load_nnunet_folder(folder, folds=[0]), load_nnunet_folder(PLAIN, folds=[0])
    assert isinstance(old, Checkpoint) and isinstance(new, Checkpoint)
    assert old.architecture_args == new.architecture_args


def test_region_based_labels_are_refused(tmp_path):
    folder = _copy(RESENC, tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole": [1, 2], "posterior": 2}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(UserError, match="region-based"):
        load_checkpoint(folder)


@pytest.mark.parametrize("labels", [{"background": 0, "anterior": "one"}, ["background", "anterior"]],
                         ids=["value-not-a-number", "not-a-table"])
def test_malformed_dataset_labels_are_one_line(tmp_path, labels):
    folder = _copy(RESENC, tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = labels
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(UserError, match="checkpoint_final.pth|dataset.json"):
        load_checkpoint(folder)


def test_a_network_larger_than_any_plan_is_refused_before_it_is_built(tmp_path):
    folder = _copy(RESENC, tmp_path)
    _edit_plans(folder, lambda configuration: configuration["architecture"]["arch_kwargs"].update(
        features_per_stage=[4, 8, 1_000_000]))
    with pytest.raises(UserError, match="features_per_stage entry is 1000000"):
        load_checkpoint(folder)


def test_nnunet_and_own_models_with_other_preprocessing_do_not_average(tmp_path):
    nnunet = load_nnunet_folder(PLAIN, folds=[0])
    assert isinstance(nnunet, Checkpoint)
    own = Checkpoint.from_model(build_model("unet3d", dict(in_channels=2, out_channels=3, depth=2, base_width=4)),
                                nnunet.labels, Preprocessing(channels=2), (16, 16, 16))
    save_checkpoint(own, tmp_path / "own.pt")
    with pytest.raises(UserError, match="cannot join an ensemble.*preprocessing"):
        load_checkpoint([PLAIN, tmp_path / "own.pt"])


@pytest.mark.parametrize("folder", [PLAIN, RESENC], ids=["plain", "resenc"])
def test_fast_path_computes_the_same_network(folder):
    """The rewrite (instance norm and leaky ReLU in place, channels-last) keeps nnU-Net's networks' function."""
    model = load_nnunet_folder(folder, folds=[0])
    assert isinstance(model, Checkpoint)
    network = model.build_model()
    batch = torch.randn(2, 2, *model.patch_size)
    with torch.inference_mode():
        expected = network(batch)
        fast = prepare_for_inference(network, torch.device("cpu"), torch.float32)(
            batch.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)


def test_nnunet_models_run_one_window_at_a_time_unless_asked():
    """As nnU-Net runs them: two of its windows at a time compiled a network of twice the memory on the CPU."""
    own = Checkpoint.from_model(build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=2)),
                                load_nnunet_folder(PLAIN, folds=[0]).labels[:2], Preprocessing(), (16, 16, 16))
    assert Predictor(PLAIN, device="cpu").batch_size == 1
    assert Predictor(PLAIN, device="cpu", batch_size=3).batch_size == 3
    assert Predictor(own, device="cpu").batch_size == 2
