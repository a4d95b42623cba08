"""The IDX file format of MNIST and Fashion-MNIST: read with full validation, and write.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the raw values.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IdxError", "parse_idx", "read_idx", "write_idx"]

_UBYTE = 0x08


class IdxError(ValueError):
    """The bytes are not a well-formed IDX file (truncated, wrong magic, wrong size)."""


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a uint8 array, checking the header against the length."""
    if len(data) < 4:
        raise IdxError(f"{source}: {len(data)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _UBYTE or not 1 <= ndim <= 4:
        raise IdxError(f"{source}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{source}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = header_len + int(np.prod(shape))
    if len(data) != expected:
        raise IdxError(
            f"{source}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes"
            + (" (truncated)" if len(data) < expected else "")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read a raw or gzipped IDX file."""
    return parse_idx(read_bytes(path), source=str(path))


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip-compressed (by magic, not by name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxError(f"{path}: corrupt gzip stream ({exc})") from exc
    return raw


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 array as IDX (the tests use it to make small fake datasets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
