"""What the engine's command line and its parent agree on is declared in one module (protocol.py): the stop file,
the error line, the exit codes and the progress events; the rest of the package only uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import UNet3DSegmenterLib
from UNet3DSegmenterLib import protocol

PACKAGE = Path(UNet3DSegmenterLib.__file__).resolve().parent
OTHERS = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "protocol.py")


def _strings(tree: ast.AST) -> list[str]:
    """Every literal string, the literal parts of f-strings included."""
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


@pytest.mark.parametrize("path", OTHERS, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_other_module_spells_the_stop_file_the_error_prefix_or_an_exit_code(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    strings = _strings(tree)
    assert protocol.STOP_FILE not in strings, "the stop file's name: use protocol.stop_file()"
    assert not [text for text in strings if text.startswith(protocol.ERROR_PREFIX.strip())], \
        "an error line: use protocol.error_line() / protocol.error_message()"
    exits = [target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for target in node.targets
             if isinstance(target, ast.Name) and target.id.startswith("EXIT_")]
    assert not exits, f"exit codes are protocol's: {exits}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "training").glob("*.py")), ids=lambda path: path.name)
def test_the_trainer_emits_declared_events_without_casting_plain_dicts(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    casts = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "cast" and node.args and "Event" in ast.unparse(node.args[0])]
    assert not casts, f"{path.name}: {[ast.unparse(node) for node in casts]}"


def test_an_error_line_reads_back_as_its_message():
    line = protocol.error_line("input not found: /tmp/ümlaut.nii.gz: check the path")
    assert protocol.error_message(line + "\n") == "input not found: /tmp/ümlaut.nii.gz: check the path"
    assert protocol.error_message("Traceback (most recent call last):") is None


def test_a_withdrawn_stop_request_is_gone_and_withdrawing_none_is_fine(tmp_path):
    protocol.stop_file(tmp_path).touch()
    protocol.withdraw_stop_request(tmp_path)
    assert not protocol.stop_file(tmp_path).exists()
    protocol.withdraw_stop_request(tmp_path)


def test_the_protocol_needs_only_the_standard_library():
    import sys

    tree = ast.parse((PACKAGE / "protocol.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert all(name in sys.stdlib_module_names for name in imported - {"__future__"}), imported
