"""Is a volume file whole, and does it hold only what it says? Checks made before ITK reads a file.

ITK reads a NIfTI file that ends early (a half-downloaded ``.nii.gz``, an interrupted copy) and a
``.nii.gz`` or compressed ``.mha`` whose data are damaged, and fills what is missing with zeros, so
a model would segment an empty image and report success. :func:`check_whole` compares the data
a file holds with what its header promises, and checks the compressed stream's end marker and
checksum, before the file is read.

The header also decides how much memory ITK sets aside: a 4 KB NRRD file that declares 800^3 floats
would cost gigabytes before anything noticed that the data are not there. NRRD headers are read here
and held to the same rule as NIfTI and MHA (the data must be in the file), with sizes in sane bounds.
A MetaImage or NRRD header may name a separate data file; one outside the header's own folder
(``/dev/zero``, ``../elsewhere``) is refused, as it is not part of what the user gave.

The same checks serve the writers: :func:`shortfall` says what a file just written lacks, since
ITK's NIfTI writer reports a full disk only on stderr.
"""

from __future__ import annotations

import bz2
import math
import os
import zlib
from pathlib import Path
from typing import IO

import nibabel

from .errors import UserError

_CHUNK = 1 << 22
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_HEADER_BYTES = 348
MAX_VOXELS = 1 << 34
"""More voxels than any scanner makes (16 G: 2048^3 is 8.6 G), so a header asking for more is damaged."""
MAX_SIZE = 1 << 20
"""The most voxels along one axis that a header may declare."""

# MetaImage element types and their sizes in bytes.
_META_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


class _Short(Exception):
    """The data a file holds fall short of its header (or are damaged); the argument says how."""


def check_whole(path: str | os.PathLike) -> None:
    """Raise :class:`UserError` when ``path`` (.nii, .nii.gz, .mha, .nrrd) is truncated, its compressed data are
    damaged, its header declares an absurd size, or it names a data file outside its own folder; other files,
    and files whose header is unreadable (ITK then explains), pass."""
    path = Path(path)
    try:
        _check(path)
    except _Short as short:
        raise _truncated(path, str(short)) from None


def shortfall(path: str | os.PathLike) -> str | None:
    """What a volume file lacks, in words ('N bytes of image data where the header needs M'), or None when
    it is whole (or of a format not checked here)."""
    try:
        _check(Path(path))
    except _Short as short:
        return str(short)
    return None


def _check(path: Path) -> None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith(".mha"):
        _check_metaimage(path)
    elif name.endswith(".nrrd"):
        _check_nrrd(path)


def _truncated(path: Path, detail: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({detail}): copy or download it again")


def _check_nifti(path: Path) -> None:
    with open(path, "rb") as file:
        compressed = file.read(2) == _GZIP_MAGIC
    try:
        header: nibabel.Nifti1Header = nibabel.load(path).header  # type: ignore[assignment]
        shape = [int(size) for size in header.get_data_shape()]
        expected = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    except Exception:  # an unreadable header: cut inside it, or no NIfTI (then ITK's reader says what is wrong)
        if compressed:
            _gzip_size(path)  # a damaged or cut stream says so
            return
        with open(path, "rb") as file:
            start = file.read(_NIFTI_HEADER_BYTES)
        if len(start) < _NIFTI_HEADER_BYTES and start[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
            raise _Short(f"{len(start)} bytes, less than a NIfTI header") from None
        return
    _check_memory(path, expected)
    size = _gzip_size(path) if compressed else path.stat().st_size
    if size < expected:
        raise _Short(f"{size} bytes of image data where the header needs {expected}")


def _gzip_size(path: Path, offset: int = 0) -> int:
    """The decompressed size of the gzip members from ``offset`` on; zlib checks each one's end marker and
    CRC on the way.

    Decompressed in bounded pieces (a few MB at a time, however well the data compress).
    """
    size, decompressor = 0, zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as file:
            file.seek(offset)
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
        raise _Short(f"damaged compressed data: {error}") from None
    if not decompressor.eof:
        raise _Short("the compressed data end early")
    return size


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as file:
        header = _metaimage_header(file)
        if header is None:
            return  # unreadable: ITK explains
        try:
            sizes = [int(size) for size in header["DimSize"].split()]
            channels = int(header.get("ElementNumberOfChannels", "1"))
            item = _META_TYPES[header["ElementType"]]
        except (KeyError, ValueError):
            return
        expected = _expected_bytes(sizes, channels * item)
        _check_memory(path, expected)
        compressed = header.get("CompressedData", "False").lower() == "true"
        if header.get("ElementDataFile") == "LOCAL":
            size = _zlib_size(file) if compressed else os.fstat(file.fileno()).st_size - file.tell()
        else:
            data = _data_file(path, header.get("ElementDataFile", ""), "ElementDataFile")
            with open(data, "rb") as detached:
                size = _zlib_size(detached) if compressed else os.fstat(detached.fileno()).st_size
    if size < expected:
        raise _Short(f"{size} bytes of image data where the header needs {expected}")


def _check_memory(path: Path, expected: int) -> None:
    """Refuse, before inflating anything, data that could not be held in this machine's memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a system that does not say
        return
    if expected > memory:
        raise UserError(f"{path} declares {expected / 1e9:.3g} GB of image data, more than this machine's "
                        f"{memory / 1e9:.3g} GB of memory: it cannot be read here (or its header is damaged)")


def _expected_bytes(sizes: list[int], item_bytes: int) -> int:
    """The bytes of data a header declares; absurd sizes (negative, huge) count as damage."""
    voxels = math.prod(sizes) if sizes else 0
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_SIZE or voxels > MAX_VOXELS:
        raise _Short(f"its header declares a size of {' x '.join(map(str, sizes)) or 'nothing'} voxels, "
                     f"which no scan has (at most {MAX_SIZE} along an axis, {MAX_VOXELS} in all)")
    return voxels * item_bytes


def _data_file(header_path: Path, name: str, field: str) -> Path:
    """The separate data file a header names, which must be a file in the header's own folder (or below)."""
    folder = header_path.resolve().parent
    data = (folder / name).resolve()
    if not name or name.split()[0].upper() == "LIST" or "%" in name or not data.is_relative_to(folder) \
            or not data.is_file():
        raise UserError(f"{header_path}: its header's {field} names {name!r}, which is not a file beside it: "
                        "a volume's data must be in the file itself or in a file in the same folder")
    return data


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


def _zlib_size(file: IO[bytes]) -> int:
    """The decompressed size of a zlib stream from the file's position, in bounded pieces."""
    decompressor, size = zlib.decompressobj(), 0
    try:
        data = file.read(_CHUNK)
        while data and not decompressor.eof:
            size += len(decompressor.decompress(data, _CHUNK))
            data = decompressor.unconsumed_tail or file.read(_CHUNK)
    except zlib.error as error:
        raise _Short(f"damaged compressed data: {error}") from None
    if not decompressor.eof:
        raise _Short("the compressed data end early")
    return size


# NRRD element types (every spelling the format allows) by size in bytes.
_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_TYPE_BYTES = {name: size for size, names in _NRRD_TYPES.items() for name in names}


def _check_nrrd(path: Path) -> None:
    header, data_offset = _nrrd_header(path)
    if header is None:
        return  # not a NRRD header: ITK explains
    try:
        sizes = [int(size) for size in header["sizes"].split()]
        item = _NRRD_TYPE_BYTES[header["type"].lower()]
    except (KeyError, ValueError):
        return
    expected = _expected_bytes(sizes, item)
    _check_memory(path, expected)
    detached = header.get("data file") or header.get("datafile")
    data, offset = (_data_file(path, detached, "data file"), 0) if detached else (path, data_offset)
    encoding = header.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        size = _gzip_size(data, offset)
    elif encoding in ("bzip2", "bz2"):
        size = _bzip2_size(data, offset)
    elif encoding == "raw":
        size = data.stat().st_size - offset
    else:  # text or hex: at least one character per byte, so the file bounds what ITK sets aside
        size, expected = data.stat().st_size - offset, expected // item
    if size < expected:
        raise _Short(f"{size} bytes of image data where the header needs {expected}")


def _nrrd_header(path: Path) -> tuple[dict[str, str] | None, int]:
    """The header's fields (lower-case names) and where the data start, or None for a file that is no NRRD."""
    fields: dict[str, str] = {}
    with open(path, "rb") as file:
        if not file.read(4) == b"NRRD":
            return None, 0
        file.readline(4096)
        for _ in range(1000):
            line = file.readline(1 << 16).decode("latin-1").rstrip("\r\n")
            if not line:
                return fields, file.tell()
            name, separator, value = line.partition(": ")
            if separator and not line.startswith("#") and ":=" not in name:
                fields[name.strip().lower()] = value.strip()
    return None, 0


def _bzip2_size(path: Path, offset: int) -> int:
    decompressor, size = bz2.BZ2Decompressor(), 0
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            data = file.read(_CHUNK)
            while not decompressor.eof:
                size += len(decompressor.decompress(data, _CHUNK))
                if decompressor.needs_input:
                    data = file.read(_CHUNK)
                    if not data:
                        break
                else:
                    data = b""
    except (OSError, ValueError) as error:
        raise _Short(f"damaged compressed data: {error}") from None
    if not decompressor.eof:
        raise _Short("the compressed data end early")
    return size
