"""The engine's command line run as a child process, read without blocking Slicer (standard library only).

:class:`EngineProcess` starts the child, turns each JSON line it prints into an event, and ends in
exactly one of three callbacks: finished, error (one readable line) or cancelled. Callbacks run only
inside :meth:`EngineProcess.poll`, in the caller's thread: the panel polls from a timer, scripts
and tests call :meth:`EngineProcess.wait`.

Stopping is portable and graceful where it matters. In Slicer the engine starts through the
``PythonSlicer`` launcher, which runs the real interpreter as its own child: a signal to the launcher
ends the launcher alone, at once. So a process given a ``stopFile`` is stopped by creating that file
(``unet3d-segmenter train`` finishes its iteration, saves and exits 0), and only killed, with its
whole process group, when it has not ended ``cancelGraceSeconds`` later. Without a stop file
(segmentation: nothing to save) cancel asks the process group to terminate, and kills it after the
grace period. :func:`stopAll` stops several processes within one time limit (Reload, exit).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pathlib
import queue
import signal
import subprocess
import threading
import time
from typing import Any

from ..protocol import EXIT_OK, error_message

log = logging.getLogger("UNet3DSegmenter")

# Windows process creation flags (the subprocess module defines them on Windows only).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


class EngineProcess:
    """A child process running the engine's command line, read line by line without blocking.

    Each JSON object the child prints on stdout goes to ``onProgress(event)`` (until it ends, also
    after a stop was asked for: a stopping trainer still reports how it ends); other lines are
    logged. When the child has ended, exactly one of ``onFinished()``, ``onError(message)`` (the
    child's ``error: ...`` line, or the last line of its traceback) or ``onCancelled()`` is called.

    Example::

        process = EngineProcess([sys.executable, "-m", "UNet3DSegmenterLib", "info", "model.pt"]).start()
        process.wait()
    """

    PIPE_GRACE_SECONDS = 2.0

    def __init__(self, arguments, onProgress=None, onFinished=None, onError=None, onCancelled=None,
                 environment=None, workingDirectory=None, stopFile=None, cancelGraceSeconds: float = 5.0) -> None:
        self.arguments = [str(argument) for argument in arguments]
        self.onProgress, self.onFinished, self.onError, self.onCancelled = onProgress, onFinished, onError, onCancelled
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.stopFile = pathlib.Path(stopFile) if stopFile is not None else None
        self.cancelGraceSeconds = cancelGraceSeconds
        self.returncode: int | None = None
        self.errorMessage: str | None = None
        self.cancelled = False
        # What the caller keeps with the run: a segmentation's temporary folder, a training run's job and curves.
        self.temporaryFolder: pathlib.Path | None = None
        self.job: Any = None
        self.tableNode: Any = None
        self.chartNode: Any = None
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._openStreams = 0
        self._stderrTail: collections.deque[str] = collections.deque(maxlen=200)
        self._exitedAt: float | None = None
        self._killAt: float | None = None
        self._done = False

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    @property
    def _child(self) -> subprocess.Popen[str]:
        assert self._process is not None, "the process has not been started"
        return self._process

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the callbacks for the end have been called."""
        return self._process is not None and not self._done

    def start(self) -> EngineProcess:
        """Start the child; ValueError with one line when the program cannot start."""
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True  # its own process group, so that a kill reaches its children
        try:
            child = subprocess.Popen(
                self.arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=self.environment,
                cwd=self.workingDirectory, **options)
        except OSError as error:
            raise ValueError(f"cannot start {self.arguments[0]}: {error.strerror or error}") from None
        self._process = child
        for stream, name in ((child.stdout, "stdout"), (child.stderr, "stderr")):
            self._openStreams += 1
            threading.Thread(target=self._read, args=(stream, name), daemon=True).start()
        return self

    def poll(self) -> bool:
        """Handle what the child printed since the last call; False once it has ended and been reported."""
        if self._done or self._process is None:
            return False
        self._dispatch()
        if self._process.poll() is None:
            if self._killAt is not None and time.monotonic() > self._killAt:
                self._signalGroup(kill=True)
            return True
        if self._exitedAt is None:
            self._exitedAt = time.monotonic()
            if self.cancelled:
                self._signalGroup(kill=True)  # whatever the child left running
        # After the exit, wait a little for the pipes to close (a grandchild may still hold them).
        if self._openStreams > 0 and time.monotonic() - self._exitedAt < self.PIPE_GRACE_SECONDS:
            return True
        self._dispatch()
        self._finish()
        return False

    def wait(self, timeout: float | None = None, interval: float = 0.05, cancel=None) -> bool:
        """Poll until the child has ended; True when it succeeded. ``cancel()`` True or the timeout cancels it.

        Success means exit status 0, not cancelled, and no ``errorMessage`` (which a finished callback
        may set when what the child wrote cannot be used).
        """
        started = time.monotonic()
        while self.poll():
            if not self.cancelled and ((cancel is not None and cancel()) or
                                       (timeout is not None and time.monotonic() - started > timeout)):
                self.cancel()
            time.sleep(interval)
        return self.returncode == 0 and not self.cancelled and self.errorMessage is None

    def cancel(self) -> None:
        """Ask the child to stop and return at once (see the module docstring for how)."""
        if not self.running or self.cancelled:
            return
        self.cancelled = True
        self._killAt = time.monotonic() + self.cancelGraceSeconds
        if self.stopFile is not None:
            with contextlib.suppress(OSError):  # a folder that vanished: the kill after the grace period remains
                self.stopFile.parent.mkdir(parents=True, exist_ok=True)
                self.stopFile.touch()
        else:
            self._signalGroup(kill=os.name == "nt")

    def kill(self) -> None:
        """End the child and its process group at once and report it cancelled."""
        if not self.running:
            return
        self.cancelled = True
        self._signalGroup(kill=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._child.wait(timeout=self.PIPE_GRACE_SECONDS)
        self._exitedAt = self._exitedAt or time.monotonic() - self.PIPE_GRACE_SECONDS
        self.poll()

    # --- reading the child ---------------------------------------------------------------------

    def _read(self, stream, name: str) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        finally:
            self._lines.put((name, None))

    def _signalGroup(self, kill: bool) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._child.pid)], capture_output=True, check=False,
                           creationflags=CREATE_NO_WINDOW)  # no console window flashes on every cancel
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # start_new_session made the child the leader of a group that its own children join
            os.killpg(self._child.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def _dispatch(self) -> None:
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._openStreams -= 1
            elif name == "stdout":
                self._handleOutput(line)
            else:
                self._stderrTail.append(line)
                if line.strip():
                    log.debug("engine: %s", line)  # an error reaches the user through onError, in one line

    def _handleOutput(self, line: str) -> None:
        event = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
        if not isinstance(event, dict):
            if line.strip():
                log.debug("engine: %s", line)
            return
        if self.onProgress is not None:
            self.onProgress(event)

    def _finish(self) -> None:
        self._done = True
        self.returncode = self._child.poll()
        if self.stopFile is not None:
            with contextlib.suppress(OSError):
                self.stopFile.unlink()  # honoured or not, it must not stop the next run in this folder
        if self.cancelled:
            if self.onCancelled is not None:
                self.onCancelled()
        elif self.returncode == EXIT_OK:
            if self.onFinished is not None:
                self.onFinished()
        else:
            self.errorMessage = self._errorMessage()
            if self.onError is not None:
                self.onError(self.errorMessage)

    def _errorMessage(self) -> str:
        lines = [line.strip() for line in self._stderrTail if line.strip()]
        for line in reversed(lines):
            message = error_message(line)
            if message is not None:
                return message
        if lines:
            return lines[-1]
        code = self.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the engine was stopped by signal {signal.Signals(-code).name}"
        return f"the engine stopped with exit status {code} and no message"


ENGINE_FOLDER_VARIABLE = "UNET3D_SEGMENTER_ENGINE_FOLDER"
# Slicer's PythonSlicer launcher puts Slicer's own paths, site-packages included, before the PYTHONPATH it
# inherits, so `-m UNet3DSegmenterLib` could run a pip-installed copy of the engine; this puts the module's
# folder first on sys.path inside the child, whatever the launcher did, then runs the engine's command line.
_ENGINE_BOOTSTRAP = ("import os, runpy, sys; sys.path.insert(0, os.environ['" + ENGINE_FOLDER_VARIABLE + "']); "
                     "runpy.run_module('UNet3DSegmenterLib', run_name='__main__', alter_sys=True)")


def engineCommand(python, *arguments) -> list:
    """The command line that runs ``unet3d-segmenter ARGUMENTS`` with the engine of the folder that
    :func:`childEnvironment` names (run it with that environment)."""
    return [python, "-c", _ENGINE_BOOTSTRAP, *arguments]


def childEnvironment(moduleFolder) -> dict:
    """The environment for an engine child process: ``moduleFolder`` (which holds UNet3DSegmenterLib) named
    for :func:`engineCommand` and first on PYTHONPATH, so that the child runs this module's engine, and
    unbuffered UTF-8 output, so that progress arrives as it happens and as written."""
    environment = dict(os.environ)
    paths = [str(moduleFolder)] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment[ENGINE_FOLDER_VARIABLE] = str(moduleFolder)
    environment["PYTHONUNBUFFERED"] = "1"
    # UTF-8 for the child's files and pipes whatever the system's code page, as the parent decodes them, so that a
    # non-ASCII path in an error line arrives as written.
    environment["PYTHONUTF8"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def stopAll(processes, seconds: float = 10.0, interval: float = 0.05) -> None:
    """Stop every running process in ``processes`` and return within about ``seconds``.

    Each is asked to stop as :meth:`EngineProcess.cancel` does; whatever still runs when the time
    is up is killed. Reload and application exit use it, so that they never wait longer.
    """
    running = [process for process in processes if process is not None and process.running]
    for process in running:
        process.cancel()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any([process.poll() for process in running]):  # poll each, every time
        time.sleep(interval)
    for process in running:
        process.kill()
