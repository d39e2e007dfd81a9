"""What a killed write leaves is cleared by the next write of the same outputs, and nothing else is."""

from __future__ import annotations

import re

from UNet3DSegmenterLib.atomic import atomic_path, remove_stale_partials


def test_only_the_leftovers_of_the_named_outputs_are_removed(tmp_path):
    with atomic_path(tmp_path / "seg.nii.gz", ".nii.gz") as temporary:
        assert re.fullmatch(r"\.seg\.nii\.gz\.[0-9a-f]{8}\.partial\.nii\.gz", temporary.name)
        temporary.write_bytes(b"keep")
    (tmp_path / ".seg.nii.gz.0123abcd.partial.nii.gz").write_bytes(b"half")  # what a killed write left
    (tmp_path / ".seg.nii.gz.partial-abc123xy").mkdir()  # a killed DICOM series' staging folder
    kept = [tmp_path / ".other.nii.gz.0123abcd.partial.nii.gz", tmp_path / ".notes", tmp_path / "seg.nii.gz"]
    for path in kept[:2]:
        path.write_bytes(b"keep")
    (tmp_path / ".seg.nii.gz.89abcdef.partial").symlink_to(tmp_path / ".notes")

    remove_stale_partials([tmp_path / "seg.nii.gz", tmp_path / "missing" / "x.nii.gz"])

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [path.name for path in kept] + [".seg.nii.gz.89abcdef.partial"])
    assert all(path.read_bytes() == b"keep" for path in kept)
