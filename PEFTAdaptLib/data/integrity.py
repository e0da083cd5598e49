"""Check a NIfTI or MGH file against its own header before it is read, in one streaming pass.

SimpleITK's NIfTI reader pads a truncated file (`.nii` cut short, `.nii.gz` without its end) with zeros and turns
NaN/inf into 0 without a word, so neither can be detected after reading. Here nibabel parses the header only (where
the voxels start, their type and count); the voxel bytes are then streamed, chunk by chunk: their number must
match the header, a gzip stream must reach its end (and its CRC) without far more data than declared, and
floating-point voxels must be finite.
NRRD and MetaImage need none of this: ITK refuses them truncated and keeps their NaN (checked after reading).
"""
from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .limits import check_voxel_count

#: bytes decompressed or read per step: bounded memory whatever the volume size
CHUNK_BYTES = 1 << 24
#: data a gzip stream may hold beyond the voxels (MGH appends a few tags); more is a decompression bomb, not an image
TRAILING_BYTES = 1 << 26


def unreadable(path: Path, what: str, exc: Exception) -> InputError:
    """The one-line error for a file no reader understands, with the reader's last word on why.

    ITK ends some messages with a stale `Reason: <errno text>` (a truncated MetaImage says "No such file or
    directory"), and some with a matrix printed over several lines (a singular direction); the `ITK ERROR` line is
    the true one.
    """
    lines = [line for line in str(exc).strip().splitlines() if line.strip() and not line.startswith("Reason:")]
    reason = next((line for line in reversed(lines) if line.startswith("ITK ERROR:")), lines[-1] if lines else "")
    reason = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", reason) or type(exc).__name__
    return InputError(f"{path}: cannot read {what} (corrupt or not an image): {reason}")


def _layout(path: Path, what: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(offset of the first voxel byte as ITK reads it, shape, voxel dtype) from the header, through nibabel."""
    import nibabel as nib

    try:
        volume = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad header; all mean "unreadable"
        raise unreadable(path, what, exc) from None
    proxy, offset = volume.dataobj, int(volume.dataobj.offset)
    if isinstance(volume, nib.Nifti1Image):  # NIfTI-2 too; a vox_offset inside the header: ITK reads right after it
        offset = max(offset, volume.header.sizeof_hdr)
    return offset, tuple(int(s) for s in proxy.shape), np.dtype(proxy.dtype)


def _compressed(path: Path) -> bool:
    return path.name.lower().endswith((".gz", ".mgz"))


def check_against_header(path: Path, what: str = "image") -> None:
    """Refuse a file larger than the voxel limit, shorter than its header declares, or holding NaN/inf voxels."""
    offset, shape, dtype = _layout(path, what)
    check_voxel_count(shape, f"{path}: {what}")
    expected = math.prod(shape) * dtype.itemsize
    floating, compressed = dtype.kind in "fc", _compressed(path)
    found, finite, pending = 0, True, b""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            stream.read(offset)
            while (compressed or found < expected) and (chunk := stream.read(CHUNK_BYTES)):
                if floating and finite and found < expected:
                    voxels = pending + chunk[: expected - found]
                    whole = len(voxels) - len(voxels) % dtype.itemsize
                    finite = bool(np.isfinite(np.frombuffer(voxels[:whole], dtype)).all())
                    pending = voxels[whole:]
                found += len(chunk)
                if found > expected + TRAILING_BYTES:
                    raise InputError(f"{path}: {what} file holds far more data than its header declares; it is "
                                     "not the image it claims to be")
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{path}: {what} file is truncated or corrupt ({exc}); copy or export it again") from None
    if found < expected:
        dims = "×".join(map(str, shape))
        raise InputError(f"{path}: {what} file is truncated: its header declares {dims} {dtype.name} voxels "
                         f"({expected:,} bytes) but it holds {found:,}; copy or export it again")
    if not finite:
        raise InputError(f"{path}: {what} contains NaN or infinite values; fix or mask them before use")
