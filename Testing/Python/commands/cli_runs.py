"""Running the real command line in a child process, and holding a refusal to the one-line promise."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args) -> subprocess.CompletedProcess:
    """``python -m UNet3DSegmenterLib ARGS`` (paths may be Path objects), output captured."""
    return subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one ``error:`` line of a run that was refused with exit status 2, holding every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]
