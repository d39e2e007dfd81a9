"""Is a volume file whole? Checks for the files that ITK reads without complaint when they are not.

ITK reads a NIfTI file that ends early (a half-downloaded ``.nii.gz``, an interrupted copy) and a
``.nii.gz`` or compressed ``.mha`` whose data are damaged, and fills what is missing with zeros, so
a model would segment an empty image and report success. :func:`check_whole` compares the data
a file holds with what its header promises, and checks the compressed stream's end marker and
checksum, before the file is read. NRRD files need no check: ITK refuses them itself.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import IO

import nibabel
import numpy as np

from .errors import UserError

_CHUNK = 1 << 22
_GZIP_MAGIC = b"\x1f\x8b"

# MetaImage element types and their sizes in bytes.
_META_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


def check_whole(path: str | os.PathLike) -> None:
    """Raise :class:`UserError` when ``path`` (.nii, .nii.gz or .mha) is truncated or its compressed data are
    damaged; other files, and files whose header is unreadable (ITK then explains), pass."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith(".mha"):
        _check_metaimage(path)


def _truncated(path: Path, detail: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({detail}): copy or download it again")


def _check_nifti(path: Path) -> None:
    try:
        header: nibabel.Nifti1Header = nibabel.load(path).header  # type: ignore[assignment]
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception:  # an unreadable header: ITK's reader says what is wrong
        return
    with open(path, "rb") as file:
        compressed = file.read(2) == _GZIP_MAGIC
    size = _gzip_size(path) if compressed else path.stat().st_size
    if size < expected:
        raise _truncated(path, f"{size} bytes of image data where the header needs {expected}")


def _gzip_size(path: Path) -> int:
    """The decompressed size of the gzip members; zlib checks each one's end marker and CRC on the way.

    Decompressed in bounded pieces (a few MB at a time, however well the data compress).
    """
    size, decompressor = 0, zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as file:
            data = file.read(_CHUNK)
            while data:
                size += len(decompressor.decompress(data, _CHUNK))
                if not decompressor.eof:
                    data = decompressor.unconsumed_tail or file.read(_CHUNK)
                    continue
                rest = decompressor.unused_data or file.read(_CHUNK)
                if not rest.startswith(_GZIP_MAGIC):  # the end, or padding after the last member
                    return size
                decompressor, data = zlib.decompressobj(wbits=31), rest
            size += len(decompressor.flush())
    except zlib.error as error:
        raise _truncated(path, f"damaged compressed data: {error}") from None
    if not decompressor.eof:
        raise _truncated(path, "the compressed data end early")
    return size


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as file:
        header = _metaimage_header(file)
        if header is None or header.get("ElementDataFile") != "LOCAL":
            return  # unreadable or detached data: ITK explains
        try:
            voxels = int(np.prod([int(size) for size in header["DimSize"].split()]))
            expected = voxels * int(header.get("ElementNumberOfChannels", "1")) * _META_TYPES[header["ElementType"]]
        except (KeyError, ValueError):
            return
        if header.get("CompressedData", "False").lower() == "true":
            size = _zlib_size(file, path)
        else:
            size = os.fstat(file.fileno()).st_size - file.tell()
    if size < expected:
        raise _truncated(path, f"{size} bytes of image data where the header needs {expected}")


def _metaimage_header(file: IO[bytes]) -> dict[str, str] | None:
    """The ``key = value`` lines up to ``ElementDataFile`` (the last header line); the file is left at the data."""
    header: dict[str, str] = {}
    for _ in range(100):
        line = file.readline(4096)
        key, separator, value = line.decode("latin-1").partition("=")
        if not separator:
            return None
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return header
    return None


def _zlib_size(file: IO[bytes], path: Path) -> int:
    decompressor, size = zlib.decompressobj(), 0
    try:
        while chunk := file.read(_CHUNK):
            size += len(decompressor.decompress(chunk))
            if decompressor.eof:
                break
    except zlib.error as error:
        raise _truncated(path, f"damaged compressed data: {error}") from None
    if not decompressor.eof:
        raise _truncated(path, "the compressed data end early")
    return size
