"""nnU-Net's preprocessing and export, step by step, against this engine's on synthetic images.

For each case (a zero border to crop, holes in it, both normalisations with and without the mask,
transposed axes, isotropic and anisotropic grids, up and down in size), nnU-Net's DefaultPreprocessor
and this engine's ``nnunet_preprocess.prepare`` prepare the same image, and nnU-Net's
``convert_predicted_logits_to_segmentation_with_correct_shape`` and ``nnunet_preprocess.labels_back`` put
the same random logits back. Prints the largest difference of the prepared images and the fraction
of equal labels. In the bench environment (nnU-Net installed); seconds of CPU:

    .venv-bench/bin/python bench/nnunet_steps.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib import nnunet_preprocess  # noqa: E402
from UNet3DSegmenterLib.volume import Volume  # noqa: E402

PLANS = {
    "dataset_name": "Synthetic", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
    "label_manager": "LabelManager", "experiment_planner_used": "ExperimentPlanner",
    "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [1, 1, 1],
    "foreground_intensity_properties_per_channel": {
        "0": {"mean": 50.0, "std": 20.0, "percentile_00_5": 5.0, "percentile_99_5": 120.0},
        "1": {"mean": 10.0, "std": 4.0, "percentile_00_5": 1.0, "percentile_99_5": 30.0}},
}
CASES = {  # name: (spacing x y z of the image, plans spacing in transposed axes, transpose, schemes, masks)
    "iso_down": ((1.0, 1.0, 1.0), [1.5, 1.5, 1.5], [0, 1, 2], ["ZScoreNormalization", "CTNormalization"],
                 [False, False]),
    "iso_up_masked": ((1.2, 1.1, 1.3), [0.8, 0.9, 1.0], [2, 0, 1], ["ZScoreNormalization", "ZScoreNormalization"],
                      [True, False]),
    "aniso_image": ((0.7, 0.7, 5.0), [4.0, 0.9, 0.9], [0, 1, 2], ["CTNormalization", "NoNormalization"],
                    [False, False]),
    "aniso_target": ((1.0, 1.0, 1.0), [1.0, 1.0, 3.5], [1, 2, 0], ["RescaleTo01Normalization", "ZScoreNormalization"],
                     [False, True]),
}


def image(spacing) -> Volume:
    rng = np.random.default_rng(0)
    array = np.zeros((2, 24, 30, 28), np.float32)
    array[:, 3:21, 4:27, 2:25] = rng.gamma(3.0, 15.0, size=(2, 18, 23, 23))
    array[:, 10:12, 12:14, 10:12] = 0  # a hole inside the non-zero region
    return Volume(array, spacing=spacing, origin=(3.0, -2.0, 7.0))


def compare(name: str) -> dict:
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spacing, target, transpose, schemes, masks = CASES[name]
    backward = [int(axis) for axis in np.argsort(transpose)]
    configuration = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                     "patch_size": [16, 16, 16], "median_image_size_in_voxels": [20, 20, 20], "spacing": target,
                     "normalization_schemes": schemes, "use_mask_for_norm": masks,
                     "resampling_fn_data": "resample_data_or_seg_to_shape",
                     "resampling_fn_seg": "resample_data_or_seg_to_shape",
                     "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                     "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                     "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                     "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                            "force_separate_z": None},
                     "architecture": {}, "batch_dice": False}
    plans = {**copy.deepcopy(PLANS), "transpose_forward": transpose, "transpose_backward": backward,
             "configurations": {"3d_fullres": configuration}}
    dataset = {"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "one": 1, "two": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    manager = PlansManager(plans)
    volume = image(spacing)
    properties = {"spacing": list(spacing)[::-1]}
    theirs, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        volume.array.copy(), None, properties, manager, manager.get_configuration("3d_fullres"), dataset)
    plan = nnunet_preprocess.plan_record(plans, configuration, (0, 1, 2))
    ours = nnunet_preprocess.prepare(volume, plan)
    logits = np.random.default_rng(1).normal(size=(3, *ours.array.shape[1:])).astype(np.float16)
    their_labels = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits), manager, manager.get_configuration("3d_fullres"), manager.get_label_manager(dataset),
        properties)
    our_labels, _ = nnunet_preprocess.labels_back(logits.astype(np.float32), ours, plan, [0, 1, 2], False)
    return {"shape": list(ours.array.shape[1:]), "same_shape": list(theirs.shape[1:]) == list(ours.array.shape[1:]),
            "image_max_difference": float(np.abs(theirs - ours.array).max()),
            "labels_equal": float((their_labels == our_labels).mean())}


if __name__ == "__main__":
    print(json.dumps({name: compare(name) for name in CASES}, indent=1))
