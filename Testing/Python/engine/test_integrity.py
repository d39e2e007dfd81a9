"""A file that ends early or whose compressed data are damaged is refused before ITK reads zeros from it."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.integrity import check_whole
from UNet3DSegmenterLib.io import read_volume, write_volume
from UNet3DSegmenterLib.volume import Volume


def noisy_volume() -> Volume:
    array = np.random.default_rng(0).normal(100, 20, (12, 30, 40)).astype(np.float32)
    return Volume(array, (0.7, 0.8, 2.0), (1.0, 2.0, 3.0))


def cut(path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def flip_byte(path, position: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_half_downloaded_real_nifti_is_refused(shared_dataset, tmp_path):
    source = shared_dataset("msd_hippocampus") / "images" / "hippocampus_001.nii.gz"
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    read_volume(path)  # whole: reads
    cut(path, 0.6)
    with pytest.raises(UserError, match=r"hippocampus_001.nii.gz is truncated or corrupt .*download it again"):
        read_volume(path)


@pytest.mark.parametrize("suffix, damage", [
    (suffix, damage) for suffix in (".nii.gz", ".nii", ".mha") for damage in ("cut at 30%", "cut at 99%")
] + [(".nii.gz", "a flipped byte"), (".mha", "a flipped byte")])
def test_truncated_or_damaged_file_is_refused(tmp_path, suffix, damage):
    path = write_volume(noisy_volume(), tmp_path / f"case{suffix}")
    if damage.startswith("cut"):
        cut(path, float(damage.split()[-1].rstrip("%")) / 100)
    else:
        flip_byte(path, 0.5)
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_volume(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd"])
def test_truncated_nrrd_is_refused_in_one_line(tmp_path, suffix):
    path = write_volume(noisy_volume(), tmp_path / f"case{suffix}")
    cut(path, 0.5)
    with pytest.raises(UserError, match="truncated or corrupt") as error:
        read_volume(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_whole_files_pass(tmp_path, suffix):
    volume = noisy_volume()
    path = write_volume(volume, tmp_path / f"case{suffix}")
    check_whole(path)
    np.testing.assert_array_equal(read_volume(path).array, volume.array)


def test_uncompressed_nifti_named_nii_gz_is_read(tmp_path):
    """Some tools write plain NIfTI under a .nii.gz name; ITK reads it, and so do we."""
    volume = noisy_volume()
    plain = write_volume(volume, tmp_path / "case.nii")
    named = tmp_path / "plain.nii.gz"
    named.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(read_volume(named).array, volume.array)


def test_gzip_stream_of_a_truncated_nifti_is_refused(tmp_path):
    """A whole gzip stream around a NIfTI that was already cut: the header promises more than it holds."""
    data = write_volume(noisy_volume(), tmp_path / "case.nii").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(UserError, match=r"bytes of image data where the header needs"):
        read_volume(tmp_path / "cut.nii.gz")


def test_gzip_file_of_several_members_is_whole(tmp_path):
    """Concatenated gzip members (as parallel compressors write them) are one valid file."""
    volume = noisy_volume()
    data = write_volume(volume, tmp_path / "case.nii").read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "members.nii.gz").array, volume.array)


def nrrd_header(sizes: str, encoding: str = "raw", extra: str = "", kind: str = "float") -> bytes:
    return (f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n{extra}"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\n\n").encode()


@pytest.mark.parametrize("encoding, data", [("raw", b"\0" * 4000), ("gzip", gzip.compress(b"\0" * 4_000_000))])
def test_small_nrrd_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, encoding, data):
    """800^3 floats are 2 GB: ITK would set them aside before noticing that the file holds a few KB."""
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(nrrd_header("800 800 800", encoding) + data)
    with pytest.raises(UserError, match=r"bomb.nrrd is truncated or corrupt .* where the header needs 2048000000"):
        read_volume(path)


def test_header_declaring_more_than_this_machines_memory_is_refused_before_inflating(tmp_path):
    import math
    import os

    from UNet3DSegmenterLib.integrity import MAX_VOXELS

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    edge = math.ceil((2 * memory / 8) ** (1 / 3))
    if edge**3 > MAX_VOXELS:
        pytest.skip(f"this machine's {memory / 1e9:.0f} GB hold more than any scan needs")
    path = tmp_path / "large.nrrd"
    path.write_bytes(nrrd_header(f"{edge} {edge} {edge}", "gzip", kind="double") + gzip.compress(b"\0" * 100_000))
    with pytest.raises(UserError, match="more than this machine's .* GB of memory"):
        read_volume(path)


@pytest.mark.parametrize("sizes", ["0 10 10", "-5 10 10", "100000000 100000000 100000000"])
def test_nrrd_with_absurd_sizes_is_refused(tmp_path, sizes):
    path = tmp_path / "odd.nrrd"
    path.write_bytes(nrrd_header(sizes) + b"\0" * 4000)
    with pytest.raises(UserError, match="which no scan has"):
        read_volume(path)


@pytest.mark.parametrize("name", ["/dev/zero", "../outside.raw", "LIST"])
def test_header_naming_a_data_file_outside_its_folder_is_refused(tmp_path, name):
    (tmp_path / "outside.raw").write_bytes(b"\0" * 64000)
    (tmp_path / "in").mkdir()
    mha = tmp_path / "in" / "detached.mha"
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 40 10\nElementType = MET_FLOAT\n"
                   f"ElementDataFile = {name}\n")
    nrrd = tmp_path / "in" / "detached.nrrd"
    nrrd.write_bytes(nrrd_header("40 40 10", extra=f"data file: {name}\n"))
    for path in (mha, nrrd):
        with pytest.raises(UserError, match="not a file beside it"):
            read_volume(path)


def test_header_naming_a_data_file_beside_it_is_read(tmp_path):
    array = np.arange(4000, dtype=np.float32).reshape(10, 20, 20)
    (tmp_path / "data.raw").write_bytes(array.tobytes())
    (tmp_path / "detached.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 20 20 10\n"
                                           "ElementType = MET_FLOAT\nElementDataFile = data.raw\n")
    np.testing.assert_array_equal(read_volume(tmp_path / "detached.mha").array, array)


def test_compressed_mha_that_inflates_beyond_memory_is_read_in_bounded_pieces(tmp_path):
    """The check itself must not inflate a small file all at once."""
    import tracemalloc
    import zlib

    path = tmp_path / "zeros.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 200 200 200\nElementType = MET_FLOAT\n"
                     b"CompressedData = True\nElementDataFile = LOCAL\n" + zlib.compress(b"\0" * 200 ** 3 * 4)[:-20])
    tracemalloc.start()
    with pytest.raises(UserError, match="truncated or corrupt"):
        check_whole(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20
