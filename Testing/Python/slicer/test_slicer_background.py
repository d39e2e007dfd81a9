"""The background path: real child processes (the engine's command line), progress, cancel and errors."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib.phantom import make_phantom  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group checks are written for POSIX")




def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _eventually(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _scene_state(scene):
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


class Recorder:
    def __init__(self):
        self.progress, self.finished, self.errors, self.cancelled = [], [], [], 0

    def onProgress(self, *args):
        self.progress.append(args)

    def onFinished(self, *args):
        self.finished.append(args)

    def onError(self, message):
        self.errors.append(message)

    def onCancelled(self):
        self.cancelled += 1


# --- segmentInBackground ------------------------------------------------------------------------


def test_background_segmentation_streams_progress_and_equals_the_synchronous_one(slicer_scene, logic, checkpoint_path):
    node, _ = slicer_scene.module.UNet3DSegmenterTest().addPhantom(seed=3)
    recorder = Recorder()
    process = logic.segmentInBackground(node, checkpoint_path, device="cpu", overlap=0.5,
                                        onProgress=recorder.onProgress, onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert process.running
    assert process.wait(timeout=120), recorder.errors
    assert recorder.errors == [] and len(recorder.finished) == 1
    assert recorder.progress and recorder.progress[-1][0] == recorder.progress[-1][1]
    assert [done for done, _ in recorder.progress] == sorted(done for done, _ in recorder.progress)
    segmentation = recorder.finished[0][0]
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node
    assert not process.temporaryFolder.exists()

    synchronous = logic.segment(node, checkpoint_path, device="cpu", overlap=0.5)
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node),
                                  logic.labelmapFromSegmentation(synchronous, node))


def test_cancel_ends_the_child_and_adds_nothing_to_the_scene(slicer_scene, logic, checkpoint_path):
    image, _ = make_phantom(shape=(64, 96, 96), spacing=(1.0, 1.0, 1.0), seed=4, classes=2)
    node = logic.addVolumeNode(image, "large")
    before = _scene_state(slicer_scene.scene)
    recorder = Recorder()
    process = None

    def cancelOnFirstProgress(done, total):
        recorder.onProgress(done, total)
        process.cancel()

    process = logic.segmentInBackground(node, checkpoint_path, device="cpu", overlap=0.75,
                                        onProgress=cancelOnFirstProgress, onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert not process.wait(timeout=120)
    assert process.cancelled and not process.running
    assert len(recorder.progress) == 1, "no progress is reported once cancelled"
    assert recorder.progress[0][0] < recorder.progress[0][1], "the child finished before it could be cancelled"
    assert process.returncode == -signal.SIGTERM
    assert recorder.finished == [] and recorder.errors == []
    assert not _alive(process.pid)
    assert _scene_state(slicer_scene.scene) == before
    assert not process.temporaryFolder.exists()


def test_engine_failure_in_the_child_is_one_readable_message(slicer_scene, logic, checkpoint_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make the child fail")
    node, _ = slicer_scene.module.UNet3DSegmenterTest().addPhantom(seed=3)
    before = _scene_state(slicer_scene.scene)
    recorder = Recorder()
    process = logic.segmentInBackground(node, checkpoint_path, device="cuda", onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert not process.wait(timeout=120)
    assert recorder.finished == [] and len(recorder.errors) == 1
    message = recorder.errors[0]
    assert "cuda" in message and "\n" not in message and not message.startswith("error:")
    assert process.returncode == 2
    assert _scene_state(slicer_scene.scene) == before
    assert not process.temporaryFolder.exists()


def test_background_segmentation_refuses_bad_inputs_before_starting(slicer_scene, logic, checkpoint_path, tmp_path):
    node, _ = slicer_scene.module.UNet3DSegmenterTest().addPhantom(seed=3)
    before = _scene_state(slicer_scene.scene)
    (tmp_path / "broken.pt").write_bytes(b"nothing")
    for volume, checkpoint, options in [(None, checkpoint_path, {}), (node, tmp_path / "broken.pt", {}),
                                        (node, checkpoint_path, {"overlap": 1.0}),
                                        (node, checkpoint_path, {"device": "tpu"})]:
        with pytest.raises(ValueError):
            logic.segmentInBackground(volume, checkpoint, **options)
    assert _scene_state(slicer_scene.scene) == before


# --- EngineProcess --------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_cancel_ends_the_childs_own_children_too(slicer_harness):
    code = ("import json, subprocess, sys, time\n"
            "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(json.dumps({'event': 'started', 'grandchild': grandchild.pid}), flush=True)\n"
            "time.sleep(120)\n")
    recorder = Recorder()
    process = slicer_harness.module.EngineProcess(_python(code), onProgress=recorder.onProgress,
                                                  onCancelled=recorder.onCancelled).start()
    assert _eventually(lambda: not process.poll() or recorder.progress)
    grandchild = recorder.progress[0][0]["grandchild"]
    assert _alive(process.pid) and _alive(grandchild)
    process.cancel()
    assert not process.wait(timeout=30)
    assert recorder.cancelled == 1
    assert _eventually(lambda: not _alive(grandchild)), "the grandchild survived the cancel"
    assert not _alive(process.pid)


def test_a_child_that_ignores_the_stop_request_is_killed_after_the_grace_period(slicer_harness):
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('{\"event\": \"ready\"}', flush=True)\n"
            "time.sleep(120)\n")
    recorder = Recorder()
    process = slicer_harness.module.EngineProcess(_python(code), onProgress=recorder.onProgress,
                                                  cancelGraceSeconds=0.5).start()
    assert _eventually(lambda: not process.poll() or recorder.progress)
    process.cancel()
    assert process.running, "cancel returns at once; the child is still stopping"
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the child was not killed after it ignored the stop request"
    assert not _alive(process.pid)


@pytest.mark.parametrize("code, expected", [
    ("import sys\nprint('loading', file=sys.stderr)\nprint('error: input.nii.gz is 2D: a 3D volume is needed', "
     "file=sys.stderr)\nsys.exit(2)", "input.nii.gz is 2D: a 3D volume is needed"),
    ("raise RuntimeError('the network ran out of memory')", "RuntimeError: the network ran out of memory"),
    ("import sys\nsys.exit(3)", "the engine stopped with exit status 3 and no message"),
])
def test_a_failing_child_reports_one_line(slicer_harness, code, expected):
    recorder = Recorder()
    process = slicer_harness.module.EngineProcess(_python(code), onFinished=recorder.onFinished,
                                                  onError=recorder.onError).start()
    assert not process.wait(timeout=30)
    assert recorder.errors == [expected] and recorder.finished == []
    assert process.errorMessage == expected


def test_json_lines_become_events_and_other_output_is_only_logged(slicer_harness, caplog):
    code = ("import json\n"
            "print('plain text')\n"
            "print(json.dumps({'event': 'progress', 'done': 1, 'total': 2}))\n"
            "print('{not json')\n"
            "print(json.dumps({'event': 'progress', 'done': 2, 'total': 2}))\n")
    recorder = Recorder()
    process = slicer_harness.module.EngineProcess(_python(code), onProgress=recorder.onProgress,
                                                  onFinished=recorder.onFinished, onError=recorder.onError).start()
    with caplog.at_level("INFO"):
        assert process.wait(timeout=30)
    assert [event for (event,) in recorder.progress] == [
        {"event": "progress", "done": 1, "total": 2}, {"event": "progress", "done": 2, "total": 2}]
    assert recorder.finished == [()] and recorder.errors == []
    assert "plain text" in caplog.text and "{not json" in caplog.text


def test_a_program_that_cannot_start_is_a_value_error(slicer_harness, tmp_path):
    with pytest.raises(ValueError, match="cannot start"):
        slicer_harness.module.EngineProcess([str(tmp_path / "no-such-python")]).start()
