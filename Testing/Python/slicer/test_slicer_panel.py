"""What the panel decides (UNet3DSegmenterLib.slicer.panel.PanelState), driven as the Widget drives it, on real MRML.

Each known defect of the panel has its test here: pairs re-paired after a deletion, a model box out
of step with Segment after a closed or loaded scene, the disabled GPU choice coming back, an error
after closing the scene during a segmentation, and a panel that would not build on a broken PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from child_processes import eventually  # noqa: E402
from slicer_harness import phantom_pair, scene_state  # noqa: E402

from UNet3DSegmenterLib.slicer import panel, selftest  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[3]
posix = pytest.mark.skipif(os.name == "nt", reason="process-group checks are written for POSIX")


@pytest.fixture
def state(logic):
    """The panel's state as the Widget sets it up: bound to the parameter node, engine checked."""
    messages = []
    panelState = panel.PanelState(logic, notify=messages.append)
    panelState.messages = messages
    panelState.setParameterNode(logic.getParameterNode())
    panelState.checkEngine()
    return panelState


def _close_scene(slicer_scene, state, logic):
    """File > Close Scene as the Widget sees it: StartClose, the scene cleared, a fresh parameter node."""
    state.sceneStartClose()
    slicer_scene.clear()
    state.setParameterNode(logic.getParameterNode())


def _wait(state, seconds: float = 300) -> None:
    assert eventually(lambda: not state.poll(), seconds), "the background run did not end"


# --- training pairs --------------------------------------------------------------------------------


def test_deleting_a_node_removes_exactly_its_pair(slicer_scene, logic, state):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (5, 6, 7)]
    for volume, segmentation in pairs:
        assert state.addPair(volume, segmentation)
    slicer_scene.scene.RemoveNode(pairs[0][0])  # the first volume
    assert state.pairs() == pairs[1:], "a deletion re-paired the others"
    slicer_scene.scene.RemoveNode(pairs[2][1])  # the last segmentation
    assert state.pairs() == [pairs[1]]
    assert [row[0] for row in state.view().pairs] == [pairs[1][0].GetName()]
    state.cleanPairs()
    node = state.parameters.parameterNode
    roles = [node.GetNthNodeReferenceRole(index) for index in range(node.GetNumberOfNodeReferenceRoles())]
    assert [node.GetNumberOfNodeReferences(role) for role in roles if role.startswith(panel.PAIR_ROLE)] in (
        [0, 2, 0], [2]), "a half pair is left in the parameter node"


def test_remove_pair_removes_the_selected_row_and_needs_one(slicer_scene, logic, state):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (5, 6, 7)]
    for volume, segmentation in pairs:
        state.addPair(volume, segmentation)
    assert not state.view(selectedPairRow=-1).removePair.enabled
    assert state.view(selectedPairRow=1).removePair.enabled
    assert state.removePair(1)
    assert state.pairs() == [pairs[0], pairs[2]]
    assert not state.removePair(5)


def test_a_pair_is_added_once_and_only_whole(slicer_scene, logic, state):
    volume, segmentation, _ = phantom_pair(logic, seed=5)
    assert state.view(volume, segmentation).addPair.enabled
    assert not state.view(volume, None).addPair.enabled
    assert state.addPair(volume, segmentation)
    assert not state.view(volume, segmentation).addPair.enabled
    assert not state.addPair(volume, segmentation) and state.pairs() == [(volume, segmentation)]


def test_pairs_are_saved_with_the_scene_and_come_back_when_it_is_loaded(slicer_scene, logic, state, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (5, 6)]
    for volume, segmentation in pairs:
        state.addPair(volume, segmentation)
    names = [(volume.GetName(), segmentation.GetName()) for volume, segmentation in pairs]
    slicer_scene.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert slicer_scene.scene.Commit()
    _close_scene(slicer_scene, state, logic)
    assert state.pairs() == []
    slicer_scene.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert slicer_scene.scene.Import()
    state.setParameterNode(logic.getParameterNode())
    assert [(volume.GetName(), segmentation.GetName()) for volume, segmentation in state.pairs()] == names


def test_add_the_segmented_volumes_adds_the_modules_results_in_one_click(slicer_scene, logic, state,
                                                                        checkpoint_path):
    first, _ = selftest.addPhantom(seed=5, name="first")
    second, _ = selftest.addPhantom(seed=6, name="second")
    assert not state.view().addSegmented.enabled
    results = [logic.segment(volume, checkpoint_path, device="cpu") for volume in (first, second)]
    phantom_pair(logic, seed=7)  # a segmentation drawn by hand is not one of them
    assert state.view().addSegmented.enabled
    assert state.addSegmentedVolumes() == 2
    assert state.pairs() == [(first, results[0]), (second, results[1])]
    assert not state.view().addSegmented.enabled and state.addSegmentedVolumes() == 0


def test_a_volume_segmented_twice_is_added_once_with_its_last_corrected_segmentation(slicer_scene, logic, state,
                                                                                  checkpoint_path):
    volume, truth = selftest.addPhantom(seed=5, name="twice")
    first = logic.segment(volume, checkpoint_path, device="cpu")
    second = logic.segment(volume, checkpoint_path, device="cpu")
    assert state.segmentedPairsToAdd() == [(volume, second)]
    organ = first.GetSegmentation().GetSegmentIdBySegmentName("organ")  # the user corrects the first result
    slicer.util.updateSegmentBinaryLabelmapFromArray((truth.array == 1).astype("uint8"), first, organ, volume)
    assert state.segmentedPairsToAdd() == [(volume, first)]
    assert state.addSegmentedVolumes() == 1 and state.pairs() == [(volume, first)]
    assert [row[0] for row in state.view().pairs] == ["twice"], "the pairs to train on are listed"
    other, _ = selftest.addPhantom(seed=6, name="chosen by hand")
    chosen = logic.segment(other, checkpoint_path, device="cpu")
    state.addPair(other, chosen)
    logic.segment(other, checkpoint_path, device="cpu")  # a newer result of a volume already paired
    assert state.segmentedPairsToAdd() == [] and not state.view().addSegmented.enabled


# --- the model box ---------------------------------------------------------------------------------


def test_after_closing_the_scene_the_model_box_shows_the_model_segment_uses(slicer_scene, logic, state,
                                                                           checkpoint_path):
    state.addModel(checkpoint_path)  # chosen with "Choose a checkpoint file..."
    _close_scene(slicer_scene, state, logic)
    view = state.view()
    assert state.parameters.checkpointPath == str(checkpoint_path), "the reset parameter node lost the model"
    assert view.models[view.modelIndex].path == str(checkpoint_path)
    assert view.segment.text == "Segment" and not view.segment.enabled  # no input volume in the new scene
    volume, _ = selftest.addPhantom(seed=5)
    state.parameters.inputVolume = volume
    assert state.view().segment.enabled, "Segment stays disabled after the scene was closed"


def test_a_loaded_scene_shows_and_uses_the_model_it_was_saved_with(slicer_scene, logic, state, checkpoint_path,
                                                                  tmp_path):
    saved = tmp_path / "saved.pt"
    saved.write_bytes(Path(checkpoint_path).read_bytes())
    state.addModel(saved)
    slicer_scene.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert slicer_scene.scene.Commit()
    state.addModel(checkpoint_path)  # another model chosen afterwards
    _close_scene(slicer_scene, state, logic)
    slicer_scene.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert slicer_scene.scene.Import()
    state.setParameterNode(logic.getParameterNode())  # the Widget does this at the end of the import
    view = state.view()
    assert state.parameters.checkpointPath == str(saved)
    assert view.models[view.modelIndex].path == str(saved), "the box shows another model than Segment uses"


def test_the_model_box_lists_bundled_opened_and_missing_models_and_opens_files(slicer_scene, logic, state,
                                                                               checkpoint_path, tmp_path):
    bundled = [str(path) for path in logic.availableModels()]
    state.parameters.checkpointPath = str(tmp_path / "gone.pt")  # a scene saved on another computer
    items = state.modelItems()
    assert [item.path for item in items[:len(bundled)]] == bundled
    assert items[-4].text == "gone (file not found)"
    assert [item.text for item in items[-3:]] == [panel.CHOOSE_FILE, panel.CHOOSE_FOLDER, panel.CHOOSE_NNUNET]
    view = state.view()
    assert view.modelIndex == len(items) - 4 and not view.segment.enabled
    assert state.selectModel(len(items) - 3) == "file" and state.selectModel(len(items) - 2) == "folder"
    assert state.selectModel(len(items) - 1) == "nnunet"
    state.addModel(checkpoint_path)
    assert state.view().modelLabels == "organ, lesion"
    if bundled:
        assert not state.selectModel(0) and state.parameters.checkpointPath == bundled[0]


def test_an_nnunet_model_folder_is_one_model_named_from_its_dataset(slicer_scene, logic, state):
    folder = REPOSITORY / "Testing" / "Python" / "engine" / "data" / "nnunet" / \
        "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
    state.addModel(folder)
    view = state.view()
    assert view.models[view.modelIndex].text == "nnunet (nnU-Net 3d_fullres)"
    assert view.modelLabels == "anterior, posterior"  # the segments' names, from its dataset.json


def test_a_folder_of_fold_checkpoints_is_one_model_in_the_box(slicer_scene, logic, state, checkpoint_path, tmp_path):
    from UNet3DSegmenterLib import load_checkpoint, save_checkpoint

    folds = tmp_path / "cross-validation"
    for fold in range(2):
        save_checkpoint(load_checkpoint(checkpoint_path), folds / f"fold_{fold}" / "best.pt")
    from UNet3DSegmenterLib.slicer.selftest import addPhantom

    state.parameters.inputVolume = addPhantom(seed=2)[0]
    state.addModel(folds)
    view = state.view()
    chosen = view.models[view.modelIndex]
    assert (chosen.text, chosen.path) == ("cross-validation", str(folds))
    assert view.modelLabels == "organ, lesion" and view.segment.enabled


# --- the optional OpenVINO runtime ---------------------------------------------------------------


def test_openvino_is_offered_folded_away_where_it_would_help_and_gone_once_installed(slicer_scene, logic, state,
                                                                                     monkeypatch):
    offer = "This processor has no native bfloat16, so PyTorch segments in float32 here. ..."
    monkeypatch.setattr(logic, "openVINOOffer", lambda: offer)
    state.checkEngine()
    view = state.view()
    assert view.installVisible and view.installCollapsed and view.installText == offer
    assert view.openVINO.enabled and view.openVINO.toolTip == offer and not view.installEnabled
    assert "Install" not in view.segment.toolTip  # the engine runs: Segment does not wait for it
    monkeypatch.setattr(logic, "openVINOOffer", lambda: None)  # installed, or not worth it here
    state.checkEngine()
    view = state.view()
    assert not view.installVisible and not view.openVINO.enabled


def test_a_missing_pytorch_comes_before_the_openvino_offer(slicer_scene, logic, state, monkeypatch):
    monkeypatch.setattr(logic, "openVINOOffer", lambda: "faster with OpenVINO")
    monkeypatch.setattr(logic, "missingRequirements", lambda: ["torch>=2.1"])
    monkeypatch.setattr(logic, "engineProblem", lambda: "PyTorch is not installed")
    state.checkEngine()
    view = state.view()
    assert view.installVisible and not view.installCollapsed and view.installEnabled
    assert "faster with OpenVINO" not in view.installText and not view.openVINO.enabled


# --- training runs and their folders ----------------------------------------------------------------


def _save_copy(checkpoint_path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Path(checkpoint_path).read_bytes())
    return path


def test_each_run_gets_a_folder_of_its_own_named_as_asked_or_from_labels_and_time(slicer_scene, logic, state,
                                                                                 checkpoint_path, tmp_path):
    volume, segmentation, _ = phantom_pair(logic, seed=5)
    state.addPair(volume, segmentation)
    state.parameters.trainingOutputFolder = tmp_path
    default = state.newRunFolder()
    assert default.parent == tmp_path and default.name.startswith("organ-lesion 20") and not default.exists()
    assert state.view().runNamePlaceholder == default.name
    _save_copy(checkpoint_path, default / "best.pt")  # a run made it meanwhile
    assert state.newRunFolder() == tmp_path / f"{default.name} 2"
    state.parameters.trainingRunName = "liver/v2: CT"
    assert state.newRunFolder() == tmp_path / "liver_v2_ CT"


def test_the_model_box_names_trained_models_by_their_run_and_lists_the_models_folder(slicer_scene, logic, state,
                                                                                      checkpoint_path, tmp_path):
    state.parameters.trainingOutputFolder = tmp_path
    finished = _save_copy(checkpoint_path, tmp_path / "liver 2026-03-14 0930" / "best.pt")
    stopped = _save_copy(checkpoint_path, tmp_path / "liver 2026-03-15 1010" / "last.pt")
    both = tmp_path / "kidney"
    _save_copy(checkpoint_path, both / "best.pt"), _save_copy(checkpoint_path, both / "last.pt")
    (tmp_path / "not a run").mkdir()
    items = {item.path: item.text for item in state.modelItems()}
    assert items[str(finished)] == "liver 2026-03-14 0930"
    assert items[str(stopped)] == "liver 2026-03-15 1010" + panel.STOPPED_MARK
    assert items[str(both / "best.pt")] == "kidney" and str(both / "last.pt") not in items
    texts = [item.text for item in state.modelItems()]
    assert len(texts) == len(set(texts)), "two models go by the same name"


def _stopped_run(checkpoint_path, folder: Path, epochs: int = 5, logged: int = 1) -> Path:
    """A run folder as a run stopped after ``logged`` of ``epochs`` epochs leaves it (the files Resume reads)."""
    _save_copy(checkpoint_path, folder / "last.pt")
    (folder / "last.state.pt").write_bytes(b"state")
    (folder / "run.json").write_text(json.dumps({"epochs": epochs}))
    (folder / "log.csv").write_text("epoch,train_loss\n" + "".join(f"{epoch},0.5\n" for epoch in range(1, logged + 1)))
    return folder


def test_resume_is_offered_for_a_stopped_run_only(slicer_scene, logic, state, checkpoint_path, tmp_path):
    state.parameters.trainingOutputFolder = tmp_path
    assert not state.view().resume.enabled and state.resumeFolder() is None
    stopped = _stopped_run(checkpoint_path, tmp_path / "stopped")
    finished = _stopped_run(checkpoint_path, tmp_path / "finished", epochs=2, logged=2)
    state.selectModel([item.path for item in state.modelItems()].index(str(finished / "last.pt")))
    assert state.resumeFolder() is None and not state.view().resume.enabled, "a finished run cannot go on"
    early = _stopped_run(checkpoint_path, tmp_path / "stopped early")
    (early / "validation_report.json").write_text("{}")  # the run ended itself (patience), it was not stopped
    state.selectModel([item.path for item in state.modelItems()].index(str(early / "last.pt")))
    assert state.resumeFolder() is None
    state.selectModel([item.path for item in state.modelItems()].index(str(stopped / "last.pt")))
    view = state.view()
    assert state.resumeFolder() == stopped and view.resume.enabled and "stopped" in view.resume.toolTip
    state.addModel(checkpoint_path)
    state.stoppedRun = stopped  # stopped in this panel: Resume still finds it
    assert state.resumeFolder() == stopped


def test_the_default_input_is_a_plain_scalar_volume_never_a_labelmap_or_rgb_volume(slicer_scene, logic, state,
                                                                                  checkpoint_path):
    import numpy as np

    state.addModel(checkpoint_path)
    labelmap = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.uint8), name="labels",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    rgb = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), np.uint8), name="photo",
                                         nodeClassName="vtkMRMLVectorVolumeNode")
    state.chooseDefaultInput()
    assert state.parameters.inputVolume is None and not state.view().segment.enabled
    state.parameters.inputVolume = rgb  # chosen by the user: a one-channel model cannot segment it, and says why
    view = state.view()
    assert not view.segment.enabled and view.segment.toolTip.startswith(
        "photo has 3 channels (an RGB or vector volume), but the model expects 1")
    state.parameters.inputVolume = labelmap  # a scene saved that way: the selector cannot show it
    assert not state.view().segment.enabled
    state.parameters.inputVolume = None
    volume, _ = selftest.addPhantom(seed=5)
    state.chooseDefaultInput()
    assert state.parameters.inputVolume is volume and state.view().segment.enabled
    assert labelmap.IsA("vtkMRMLScalarVolumeNode") and rgb.IsA("vtkMRMLScalarVolumeNode")  # what the old lookup took


def test_a_vector_volume_is_segmented_by_a_model_with_as_many_channels(slicer_scene, logic, state, tmp_path):
    import numpy as np

    from UNet3DSegmenterLib import Checkpoint, Label, Preprocessing, build_model, save_checkpoint

    model = build_model("unet3d", dict(in_channels=3, out_channels=2, depth=2, base_width=2, norm="instance"))
    path = save_checkpoint(Checkpoint.from_model(model, [Label(0, "background"), Label(1, "stain", (1, 0, 0))],
                                                 Preprocessing(spacing=None, channels=3), (8, 8, 8)),
                           tmp_path / "colour.pt")
    rgb = slicer.util.addVolumeFromArray(np.random.default_rng(0).integers(0, 255, (8, 9, 10, 3), np.uint8),
                                         name="photo", nodeClassName="vtkMRMLVectorVolumeNode")
    state.addModel(path)
    state.parameters.inputVolume = rgb
    assert state.view().segment.enabled, state.view().segment.toolTip
    assert logic.segmentNames(logic.segment(rgb, path, device="cpu")) == ["stain"]
    state.parameters.inputVolume = selftest.addPhantom(seed=5)[0]
    assert "has one channel (a scalar volume), but the model expects 3" in state.view().segment.toolTip


# --- devices ---------------------------------------------------------------------------------------


def test_the_gpu_choice_follows_pytorch_after_every_binding(slicer_scene, logic, state):
    gpu = torch.cuda.is_available()
    for _ in range(3):  # entering the module again, or a closed scene, binds the panel anew
        choices = {choice.name: choice.enabled for choice in state.view().devices}
        assert choices == {"auto": True, "cpu": True, "cuda": gpu, "mps": torch.backends.mps.is_available()}
        _close_scene(slicer_scene, state, logic)
    if not gpu:  # a scene saved on a computer with a GPU asks for cuda: here it becomes auto
        state.parameters.device = state.parameters.trainingDevice = "cuda"
        state.setParameterNode(logic.getParameterNode())
        assert (state.parameters.device, state.parameters.trainingDevice) == ("auto", "auto")


# --- install ---------------------------------------------------------------------------------------


def test_during_an_install_install_segment_and_train_wait_and_a_second_install_is_refused(
        slicer_scene, logic, state, checkpoint_path, tmp_path, monkeypatch):
    state.parameters.inputVolume = selftest.addPhantom(seed=3)[0]
    state.addModel(checkpoint_path)
    volume, segmentation, _ = phantom_pair(logic, seed=5)
    state.addPair(volume, segmentation)
    state.parameters.trainingOutputFolder = tmp_path
    assert state.view().segment.enabled and state.view().train.enabled
    monkeypatch.setattr(logic, "missingRequirements", lambda: ["nibabel>=5.0"])
    state.checkEngine()
    assert state.view().installEnabled
    assert state.beginInstall()
    assert not state.beginInstall(), "a click while pip printed started a second install"
    view = state.view()
    assert not view.installEnabled and not view.segment.enabled and not view.train.enabled
    assert view.segment.toolTip == panel.INSTALLING and "Installing" in view.installText
    monkeypatch.setattr(logic, "missingRequirements", lambda: [])
    state.endInstall()
    view = state.view()
    assert view.segment.enabled and view.train.enabled and not view.installVisible


def test_pytorch_is_checked_once_however_often_the_module_is_entered(slicer_scene, logic, monkeypatch):
    calls = []
    check = logic.engineProblem
    monkeypatch.setattr(logic, "engineProblem", lambda: calls.append(1) or check())
    fresh = panel.PanelState(logic)
    for _ in range(3):  # the panel shown, then the module entered twice more
        fresh.setParameterNode(logic.getParameterNode())
        fresh.ensureEngineChecked()
        fresh.view()
    assert len(calls) == 1 and fresh.engineReady


# --- licences --------------------------------------------------------------------------------------


def test_a_share_alike_model_is_used_only_once_its_licence_is_accepted_and_the_answer_is_kept(
        slicer_scene, logic, checkpoint_path, tmp_path):
    model = _save_copy(checkpoint_path, tmp_path / "shared.pt")
    model.with_suffix(".md").write_text("# shared\n\nTrained on data licensed **CC-BY-SA 4.0**.\n", encoding="utf-8")
    questions, answers, settings = [], [False, True], panel._MemorySettings()

    def ask(question):
        questions.append(question)
        return answers.pop(0)

    def panelState():
        fresh = panel.PanelState(logic, confirm=ask, settings=settings)
        fresh.setParameterNode(logic.getParameterNode())
        fresh.checkEngine()
        fresh.parameters.inputVolume = selftest.addPhantom(seed=3)[0]
        fresh.addModel(model)
        return fresh

    first = panelState()
    assert not first.startSegmentation() and first.view().segmentStatus == panel.NOT_ACCEPTED
    assert "CC-BY-SA 4.0" in questions[0] and "shared.md" in questions[0]
    assert first.startSegmentation(), "accepted: the segmentation starts"
    first.cancelSegmentation()
    _wait(first)
    again = panelState()  # Slicer started again, with the same settings
    assert again.startSegmentation() and len(questions) == 2, "the accepted licence was asked again"
    again.cancelSegmentation()
    _wait(again)


def test_the_bundled_model_card_names_its_licence():
    bundled = REPOSITORY / "Resources" / "Models" / "hippocampus.pt"
    assert panel.modelLicence(bundled) == "CC-BY-SA 4.0"
    assert panel.modelLicence(REPOSITORY / "Resources" / "Models" / "no-card.pt") is None


# --- segment options -------------------------------------------------------------------------------


def _model_recording_overlap(checkpoint_path, folder: Path, overlap: float) -> Path:
    import dataclasses

    from UNet3DSegmenterLib import load_checkpoint, save_checkpoint

    return save_checkpoint(dataclasses.replace(load_checkpoint(checkpoint_path), overlap=overlap),
                           folder / f"overlap {overlap}.pt")


def test_the_overlap_follows_the_chosen_model_until_the_user_sets_one(slicer_scene, logic, state, checkpoint_path,
                                                                      tmp_path):
    quarter = _model_recording_overlap(checkpoint_path, tmp_path, 0.25)
    most = _model_recording_overlap(checkpoint_path, tmp_path, 0.75)
    state.addModel(quarter)
    assert state.parameters.overlap == 0.25, "the model's recorded overlap did not reach the panel"
    state.parameters.overlap = 0.6  # the user's own choice
    state.selectModel([item.path for item in state.modelItems()].index(str(quarter)))  # the same model again
    assert state.parameters.overlap == 0.6
    assert state.segmentOptions().overlap == 0.6
    state.addModel(most)
    assert state.parameters.overlap == 0.75


def test_a_scene_that_names_a_model_keeps_its_own_overlap(slicer_scene, logic, state, checkpoint_path, tmp_path):
    quarter = _model_recording_overlap(checkpoint_path, tmp_path, 0.25)
    state.addModel(quarter)
    state.parameters.overlap = 0.4
    state.setParameterNode(logic.getParameterNode())  # the module entered again, or the scene loaded
    state.checkEngine()
    assert state.parameters.overlap == 0.4


def test_the_overlap_waits_for_pytorch_to_read_the_model(slicer_scene, logic, checkpoint_path, tmp_path):
    quarter = _model_recording_overlap(checkpoint_path, tmp_path, 0.25)
    waiting = panel.PanelState(logic)
    waiting.setParameterNode(logic.getParameterNode())
    waiting.addModel(quarter)  # before the engine check, as while the panel opens
    assert waiting.parameters.overlap == 0.5
    waiting.checkEngine()
    assert waiting.parameters.overlap == 0.25


def test_segment_takes_every_option_from_the_parameter_node(slicer_scene, logic, state):
    parameters = state.parameters
    parameters.device, parameters.overlap = "cpu", 0.3
    parameters.testTimeAugmentation, parameters.largestComponent = True, True
    options = state.segmentOptions()
    assert (options.device, options.overlap, options.tta, options.largest_component) == ("cpu", 0.3, True, True)


# --- runs ------------------------------------------------------------------------------------------


@posix
def test_closing_the_scene_during_a_segmentation_cancels_it_quietly(slicer_scene, logic, state, checkpoint_path):
    volume, _ = selftest.addPhantom(seed=3)
    state.parameters.inputVolume = volume
    state.addModel(checkpoint_path)
    assert state.startSegmentation() and state.view().segment.text == "Cancel"
    _close_scene(slicer_scene, state, logic)
    closed = scene_state(slicer_scene.scene)
    _wait(state)
    assert state.messages == [], "an error was shown for a run the user's scene change ended"
    assert scene_state(slicer_scene.scene) == closed, "the result went into the new scene"
    view = state.view()
    assert view.segmentStatus == "Cancelled: the scene was closed." and view.segment.text == "Segment"


@posix
def test_deleting_the_input_volume_during_a_segmentation_cancels_it_quietly(slicer_scene, logic, state,
                                                                            checkpoint_path):
    volume, _ = selftest.addPhantom(seed=3)
    state.parameters.inputVolume = volume
    state.addModel(checkpoint_path)
    assert state.startSegmentation()
    slicer_scene.scene.RemoveNode(volume)
    state.nodeRemoved()  # the Widget's NodeRemovedEvent observer
    after = scene_state(slicer_scene.scene)
    _wait(state)
    assert state.messages == [], "an error dialog for a run the user's deletion ended"
    assert scene_state(slicer_scene.scene) == after
    assert state.view().segmentStatus == "Cancelled: the input volume was deleted."


@posix
def test_a_finished_segmentation_refits_the_views_only_while_the_module_is_shown(slicer_scene, logic,
                                                                                 checkpoint_path):
    shown = []
    quiet = panel.PanelState(logic, showSegmentation=lambda volume, segmentation, fit: shown.append(fit))
    quiet.setParameterNode(logic.getParameterNode())
    quiet.checkEngine()
    quiet.parameters.inputVolume = selftest.addPhantom(seed=3)[0]
    quiet.addModel(checkpoint_path)
    for visible in (True, False):
        quiet.shown = visible  # the Widget's enter() and exit()
        assert quiet.startSegmentation()
        _wait(quiet)
    assert shown == [True, False]


@posix
def test_a_double_click_on_segment_does_not_cancel_the_run_it_started(slicer_scene, logic, state, checkpoint_path):
    state.parameters.inputVolume = selftest.addPhantom(seed=3)[0]
    state.addModel(checkpoint_path)
    assert state.pressSegment() and not state.pressSegment(), "the second click started or stopped something"
    assert state.segmentation.running and state.view().segment.text == "Cancel"
    state.segmentation.started -= panel.DOUBLE_CLICK_SECONDS  # a later click is meant
    state.pressSegment()
    assert state.view().segmentStatus == "Cancelled."
    _wait(state)


def _fine_tuning_setup(logic, state, checkpoint_path, folder, epochs: int):
    volume, segmentation, _ = phantom_pair(logic, seed=5)
    state.addPair(volume, segmentation)
    state.addModel(checkpoint_path)
    parameters = state.parameters
    parameters.trainingOutputFolder, parameters.trainingRunName = folder.parent, folder.name
    parameters.epochs, parameters.trainingDevice = epochs, "cpu"
    parameters.trainingMinutes = 0  # these runs count epochs
    parameters.batchSize = 1
    parameters.startFrom = panel.START_FROM[1]
    return parameters


@posix
def test_fine_tuning_from_the_panel_runs_the_selected_model_and_stop_keeps_its_weights(slicer_scene, logic, state,
                                                                                      checkpoint_path, tmp_path):
    parameters = _fine_tuning_setup(logic, state, checkpoint_path, tmp_path / "tuned", epochs=50)
    view = state.view()
    assert view.train.enabled and view.train.toolTip.startswith("Fine-tune tiny") and not view.architectureEnabled
    assert state.startTraining()
    assert state.view().train.text == "Stop" and parameters.trainingTable is state.training.process.tableNode
    config = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert config["init"] == str(checkpoint_path) and config["architecture"] is None
    assert eventually(lambda: not state.poll() or state.view().trainingStatus.startswith("Epoch"), 300)
    state.stopTraining()  # the Stop button
    assert state.view().train == panel.Button("Stopping...", False, "The run ends its iteration and saves last.pt.")
    _wait(state)
    assert state.messages == [] and state.training.process.returncode == 0
    assert state.view().trainingStatus.startswith(f"Stopped: {tmp_path / 'tuned' / 'last.pt'} holds the weights")
    assert state.view().train.text == "Train" and parameters.checkpointPath == str(checkpoint_path)


@posix
def test_stop_then_resume_from_the_panel_finishes_the_run_in_its_folder(slicer_scene, logic, state, checkpoint_path,
                                                                         tmp_path):
    parameters = _fine_tuning_setup(logic, state, checkpoint_path, tmp_path / "tuned", epochs=1)
    assert state.pressTrain() and not state.pressTrain(), "a double-click's second click stopped the run"
    assert state.view().train.text == "Stop"
    assert eventually(lambda: not state.poll() or state.view().trainingStatus.startswith("Epoch"), 300)
    assert str(tmp_path / "tuned" / "last.pt") not in [item.path for item in state.modelItems()], \
        "the run going on is listed as a stopped one"
    state.training.started -= panel.DOUBLE_CLICK_SECONDS
    state.pressTrain()  # Stop
    _wait(state)
    folder = tmp_path / "tuned"
    last = folder / "last.pt"
    assert state.messages == [] and state.view().trainingStatus == \
        f"Stopped: {last} holds the weights so far; Resume continues the run."
    assert not (folder / "best.pt").exists() and str(last) in [item.path for item in state.modelItems()]
    view = state.view()
    assert view.resume.enabled and view.resume.toolTip == "Continue the stopped run tuned from its last.pt."
    state.addPair(*phantom_pair(logic, seed=6)[:2])  # the pairs may change: a resumed run keeps its own data
    assert state.startResume()
    _wait(state)
    assert state.messages == [] and state.view().trainingStatus == f"Done: {folder / 'best.pt'}"
    assert parameters.checkpointPath == str(folder / "best.pt") and not state.view().resume.enabled
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tuned"], "the resumed run went elsewhere"


def test_fine_tuning_an_ensemble_is_refused_before_anything_is_exported(slicer_scene, logic, state, checkpoint_path,
                                                                       tmp_path):
    from UNet3DSegmenterLib import Ensemble, load_checkpoint, save_checkpoint

    ensemble = save_checkpoint(Ensemble([load_checkpoint(checkpoint_path)] * 2), tmp_path / "ensemble.pt")
    _fine_tuning_setup(logic, state, ensemble, tmp_path / "models" / "tuned", epochs=1)
    assert not state.startTraining()
    assert len(state.messages) == 1 and "is an ensemble of 2 networks, but fine-tuning takes one network" in \
        state.messages[0] and "\n" not in state.messages[0]
    assert not (tmp_path / "models").exists(), "the pairs were exported before the model was checked"


@pytest.mark.slow
@posix
def _exporting_panel(logic, tmp_path, onRefresh):
    watched = panel.PanelState(logic, refresh=lambda: onRefresh(watched))
    watched.messages = []
    watched.notify = watched.messages.append
    watched.setParameterNode(logic.getParameterNode())
    watched.checkEngine()
    for seed in (5, 6, 7):
        watched.addPair(*phantom_pair(logic, seed=seed)[:2])
    parameters = watched.parameters
    parameters.trainingOutputFolder, parameters.trainingRunName = tmp_path, "run"
    parameters.epochs, parameters.batchSize, parameters.trainingDevice = 1, 1, "cpu"
    return watched


@posix
def test_the_export_shows_its_progress_case_by_case_letting_slicer_handle_events(slicer_scene, logic, tmp_path):
    seen = []
    watched = _exporting_panel(logic, tmp_path, lambda state: seen.append(
        (state.view().trainingStatus, state.view().train.text)))
    assert watched.startTraining()
    assert [status for status, _ in seen] == [f"Exporting the training pairs: {done} of 3..." for done in range(4)]
    assert {button for _, button in seen} == {"Stop"}, "Train must stop the export, not start another run"
    watched.stopTraining()
    _wait(watched)


def test_stop_during_the_export_ends_it_quietly_and_leaves_no_run(slicer_scene, logic, tmp_path):
    def clickStopAfterTheFirstCase(state):
        if state.training.status.startswith("Exporting the training pairs: 1"):
            state.training.started -= panel.DOUBLE_CLICK_SECONDS
            state.pressTrain()  # the click Slicer handled between two cases

    watched = _exporting_panel(logic, tmp_path, clickStopAfterTheFirstCase)
    assert not watched.startTraining()
    assert watched.messages == [] and watched.training.process is None
    view = watched.view()
    assert view.trainingStatus == "Stopped during the export; nothing was trained." and view.train.text == "Train"
    assert list(tmp_path.iterdir()) == [], "a stopped export left files behind"


def test_training_twice_from_the_panel_keeps_the_first_model(slicer_scene, logic, state, checkpoint_path, tmp_path):
    _fine_tuning_setup(logic, state, checkpoint_path, tmp_path / "tuned", epochs=1)
    assert state.startTraining()
    _wait(state)
    first = (tmp_path / "tuned" / "best.pt").read_bytes()
    assert state.startTraining()  # the same name again
    _wait(state)
    assert state.messages == [] and (tmp_path / "tuned" / "best.pt").read_bytes() == first
    second = tmp_path / "tuned 2" / "best.pt"
    assert state.parameters.checkpointPath == str(second)
    names = {item.path: item.text for item in state.modelItems()}
    assert (names[str(tmp_path / "tuned" / "best.pt")], names[str(second)]) == ("tuned", "tuned 2")


@pytest.mark.slow
@posix
def test_a_finished_training_run_adds_and_selects_its_model(slicer_scene, logic, state, checkpoint_path, tmp_path):
    parameters = _fine_tuning_setup(logic, state, checkpoint_path, tmp_path / "tuned", epochs=1)
    assert state.startTraining()
    _wait(state)
    assert state.messages == []
    best = tmp_path / "tuned" / "best.pt"
    assert state.view().trainingStatus == f"Done: {best}" and state.view().trainingProgress == 100
    assert parameters.checkpointPath == str(best) and str(best) in [item.path for item in state.modelItems()]


def test_reload_and_exit_wait_for_the_engine_at_most_ten_seconds():
    assert panel.SHUTDOWN_SECONDS == 10  # stopAll keeps to it (test_slicer_process); cleanup and onReload use it


# --- a broken PyTorch -------------------------------------------------------------------------------


def test_a_broken_pytorch_shows_the_install_section_with_the_error(tmp_path):
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(REPOSITORY)!r},
                        {str(REPOSITORY / 'Testing' / 'Python' / 'slicer')!r}]
        from slicer_harness import SlicerHarness
        harness = SlicerHarness()
        module = harness.install()
        from UNet3DSegmenterLib.slicer import panel
        logic = module.UNet3DSegmenterLogic()
        state = panel.PanelState(logic)
        state.setParameterNode(logic.getParameterNode())
        state.checkEngine()
        view = state.view()
        assert view.installVisible and "does not load (OSError: libtorch_cpu.so" in view.installText, view
        assert not view.installEnabled and not view.segment.enabled and not view.train.enabled
        assert [choice.enabled for choice in view.devices] == [True, True, False, False]
        harness.uninstall()
        print("panel built")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "panel built" in result.stdout


# --- sparse annotation and the time budget ---------------------------------------------------------


def test_a_pair_added_with_only_some_slices_annotated_ticked_is_marked_and_shows_it(slicer_scene, logic, state):
    from UNet3DSegmenterLib.slicer.export import isSparselyAnnotated

    (volume, segmentation, _), (dense, denseSegmentation, _) = phantom_pair(logic, seed=5), phantom_pair(logic, seed=6)
    state.parameters.sparsePair = True
    assert state.addPair(volume, segmentation)
    state.parameters.sparsePair = False
    assert state.addPair(dense, denseSegmentation)
    assert isSparselyAnnotated(segmentation) and not isSparselyAnnotated(denseSegmentation)  # saved with the scene
    pairs = state.view().pairs
    assert pairs[0][1].endswith("; only some slices are annotated") and "slices" not in pairs[1][1]
    assert state.setPairSparse(0, False) and not isSparselyAnnotated(segmentation)
    assert not state.setPairSparse(2, True)


def test_the_time_budget_is_the_panels_main_control(logic, state):
    assert state.parameters.trainingMinutes == panel.DEFAULT_TRAINING_MINUTES > 0


@posix
def test_a_run_from_the_panel_trains_for_the_minutes_asked(slicer_scene, logic, state, checkpoint_path, tmp_path):
    parameters = _fine_tuning_setup(logic, state, checkpoint_path, tmp_path / "timed", epochs=1000)
    parameters.trainingMinutes = 0.1
    assert state.startTraining()
    _wait(state)
    record = json.loads((tmp_path / "timed" / "run.json").read_text())
    assert state.messages == [] and state.view().trainingStatus == f"Done: {tmp_path / 'timed' / 'best.pt'}"
    assert record["time_budget"] == 0.1 and 1 <= record["time_plan"]["epochs"] < 1000
