"""The engine process runner (UNet3DSegmenterLib.slicer.process) on real child processes, without Slicer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from child_processes import Recorder, alive, eventually, python, write_launcher

from UNet3DSegmenterLib.slicer.process import EngineProcess, childEnvironment, engineCommand, stopAll

REPOSITORY = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group checks are written for POSIX")


def _trainer_like(stop_file) -> str:
    """A child that works until the stop file appears (or a SIGTERM comes), then 'saves' and exits 0, as the trainer."""
    return textwrap.dedent(f"""
        import json, os, signal, time
        stop = {str(stop_file)!r}
        asked = []
        signal.signal(signal.SIGTERM, lambda number, frame: asked.append("signal"))
        print(json.dumps({{"event": "started", "pid": os.getpid()}}), flush=True)
        while not asked and not os.path.exists(stop):
            time.sleep(0.02)
        time.sleep(0.5)  # the iteration ends, last.pt is written
        print(json.dumps({{"event": "saved", "how": asked[0] if asked else "file"}}), flush=True)
        """)


# --- stopping -------------------------------------------------------------------------------------


def test_stop_file_lets_the_child_save_even_behind_a_launcher_that_passes_no_signal(tmp_path):
    """Slicer starts the engine through PythonSlicer: a signal would end the launcher at once and the
    group kill that follows would end the interpreter before it saved. The stop file reaches it."""
    launcher, stop = write_launcher(tmp_path), tmp_path / "run" / "STOP"
    stop.parent.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_trainer_like(stop))
    recorder = Recorder()
    process = EngineProcess([launcher, script], stopFile=stop, cancelGraceSeconds=60, **recorder.callbacks()).start()
    assert eventually(lambda: not process.poll() or recorder.progress)
    interpreter = recorder.progress[0]["pid"]
    assert interpreter != process.pid, "the launcher runs the interpreter as its child"
    process.cancel()
    assert not process.wait(timeout=60)
    assert recorder.progress[-1] == {"event": "saved", "how": "file"}, "the child was killed before it saved"
    assert process.returncode == 0 and recorder.cancelled == 1 and recorder.errors == []
    assert not stop.exists(), "a stop file left behind would stop the next run in that folder"
    assert not alive(interpreter)


def test_a_child_that_ignores_the_stop_file_is_killed_with_its_group_after_the_grace_period(tmp_path):
    launcher = write_launcher(tmp_path)
    code = "import json, os, time\nprint(json.dumps({'pid': os.getpid()}), flush=True)\ntime.sleep(120)\n"
    recorder = Recorder()
    process = EngineProcess([launcher, "-c", code], stopFile=tmp_path / "STOP", cancelGraceSeconds=0.5,
                            **recorder.callbacks()).start()
    assert eventually(lambda: not process.poll() or recorder.progress)
    interpreter = recorder.progress[0]["pid"]
    process.cancel()
    assert (tmp_path / "STOP").exists() and process.running, "cancel returns at once; the child is still stopping"
    process.wait()
    assert process.returncode == -signal.SIGKILL and recorder.cancelled == 1
    assert not alive(interpreter), "the launcher's child survived the kill"


def test_stop_all_returns_within_its_limit_killing_what_does_not_stop(tmp_path):
    stop = tmp_path / "STOP"
    script = tmp_path / "child.py"
    script.write_text(_trainer_like(stop))
    stubborn, saved = Recorder(), Recorder()
    processes = [
        EngineProcess(python("import json, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                             "print(json.dumps({'event': 'started'}), flush=True)\ntime.sleep(120)\n"),
                      **stubborn.callbacks()).start(),
        EngineProcess([sys.executable, script], stopFile=stop, cancelGraceSeconds=60, **saved.callbacks()).start()]
    for process, recorder in zip(processes, (stubborn, saved)):
        assert eventually(lambda process=process, recorder=recorder: not process.poll() or recorder.progress)
    stopAll(processes + [None], seconds=3)
    assert not any(process.running for process in processes)
    assert not any(alive(process.pid) for process in processes)
    assert processes[0].returncode == -signal.SIGKILL and stubborn.cancelled == 1
    assert saved.progress[-1] == {"event": "saved", "how": "file"} and processes[1].returncode == 0


# --- cancel, errors, events -----------------------------------------------------------------------


def test_cancel_ends_the_childs_own_children_too():
    code = ("import json, subprocess, sys, time\n"
            "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(json.dumps({'event': 'started', 'grandchild': grandchild.pid}), flush=True)\n"
            "time.sleep(120)\n")
    recorder = Recorder()
    process = EngineProcess(python(code), **recorder.callbacks()).start()
    assert eventually(lambda: not process.poll() or recorder.progress)
    grandchild = recorder.progress[0]["grandchild"]
    assert alive(process.pid) and alive(grandchild)
    process.cancel()
    assert not process.wait(timeout=30)
    assert recorder.cancelled == 1
    assert eventually(lambda: not alive(grandchild)), "the grandchild survived the cancel"
    assert not alive(process.pid)


def test_a_child_that_ignores_the_terminate_signal_is_killed_after_the_grace_period():
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('{\"event\": \"ready\"}', flush=True)\n"
            "time.sleep(120)\n")
    recorder = Recorder()
    process = EngineProcess(python(code), cancelGraceSeconds=0.5, **recorder.callbacks()).start()
    assert eventually(lambda: not process.poll() or recorder.progress)
    process.cancel()
    assert process.running, "cancel returns at once; the child is still stopping"
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the child was not killed after it ignored the stop request"
    assert not alive(process.pid)


@pytest.mark.parametrize("code, expected", [
    ("import sys\nprint('loading', file=sys.stderr)\nprint('error: input.nii.gz is 2D: a 3D volume is needed', "
     "file=sys.stderr)\nsys.exit(2)", "input.nii.gz is 2D: a 3D volume is needed"),
    ("raise RuntimeError('the network ran out of memory')", "RuntimeError: the network ran out of memory"),
    ("import sys\nsys.exit(3)", "the engine stopped with exit status 3 and no message"),
])
def test_a_failing_child_reports_one_line(code, expected):
    recorder = Recorder()
    process = EngineProcess(python(code), **recorder.callbacks()).start()
    assert not process.wait(timeout=30)
    assert recorder.errors == [expected] and recorder.finished == []
    assert process.errorMessage == expected


def test_json_lines_become_events_and_other_output_is_logged_for_debugging_only(caplog):
    code = ("import json\n"
            "print('plain text')\n"
            "print(json.dumps({'event': 'progress', 'done': 1, 'total': 2}))\n"
            "print('{not json')\n"
            "print(json.dumps({'event': 'progress', 'done': 2, 'total': 2}))\n")
    recorder = Recorder()
    process = EngineProcess(python(code), **recorder.callbacks()).start()
    with caplog.at_level("DEBUG"):
        assert process.wait(timeout=30)
    assert recorder.progress == [json.loads('{"event": "progress", "done": 1, "total": 2}'),
                                 {"event": "progress", "done": 2, "total": 2}]
    assert recorder.finished == [()] and recorder.errors == []
    assert "plain text" in caplog.text and "{not json" in caplog.text
    assert all(record.levelname == "DEBUG" for record in caplog.records if "engine:" in record.getMessage()), \
        "every line the engine prints would fill Slicer's log at INFO"


def test_a_non_ascii_path_in_the_childs_error_arrives_as_written(monkeypatch):
    """Windows runs a child's pipes in the system code page unless told otherwise: here latin-1 stands in for it."""
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")
    monkeypatch.delenv("PYTHONUTF8", raising=False)
    code = "import sys\nprint('error: C:/Données/Ünal/ct é.nii.gz is 2D', file=sys.stderr)\nsys.exit(2)"
    recorder = Recorder()
    process = EngineProcess(python(code), environment=childEnvironment(REPOSITORY), **recorder.callbacks()).start()
    assert not process.wait(timeout=30)
    assert recorder.errors == ["C:/Données/Ünal/ct é.nii.gz is 2D"]


def test_the_windows_kill_opens_no_console_window():
    """taskkill is a console program: without CREATE_NO_WINDOW each cancel flashes a console (checked in the code,
    as this machine is not Windows)."""
    import ast

    from UNet3DSegmenterLib.slicer import process

    tree = ast.parse(Path(process.__file__).read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and "taskkill" in ast.unparse(node)
             and ast.unparse(node.func) == "subprocess.run"]
    assert calls and all("CREATE_NO_WINDOW" in ast.unparse(keyword.value) for call in calls
                         for keyword in call.keywords if keyword.arg == "creationflags")
    assert all(any(keyword.arg == "creationflags" for keyword in call.keywords) for call in calls)
    assert process.CREATE_NO_WINDOW == 0x08000000


def test_a_program_that_cannot_start_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot start"):
        EngineProcess([str(tmp_path / "no-such-python")]).start()


def test_the_child_runs_this_modules_engine_even_when_the_launcher_puts_another_first(tmp_path):
    """PythonSlicer puts Slicer's site-packages before the PYTHONPATH it inherits: a pip-installed copy of
    the engine there would win over the module's own for `-m UNet3DSegmenterLib`."""
    decoy = tmp_path / "site-packages" / "UNet3DSegmenterLib"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("import sys\nprint('an installed copy of the engine')\nsys.exit(3)\n")
    launcher = write_launcher(tmp_path, slicerPaths=[tmp_path / "site-packages"])
    environment = childEnvironment(REPOSITORY)
    naive = subprocess.run([launcher, "-m", "UNet3DSegmenterLib", "info", "--help"], env=environment, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert naive.returncode == 3, "the stand-in puts Slicer's paths first, as the real launcher does"
    engine = subprocess.run(engineCommand(launcher, "info", "--help"), env=environment, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert engine.returncode == 0, engine.stderr
    assert "describe a checkpoint" in engine.stdout and "installed copy" not in engine.stdout
