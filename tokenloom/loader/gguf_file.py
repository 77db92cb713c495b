"""A fast reader for the GGUF container: metadata, tensor directory, and memory-mapped tensor data.

`gguf.GGUFReader` wraps every array element in its own numpy view, which takes ~10 s for a vocabulary
of 262k tokens; this reader parses the same layout sequentially (arrays of numbers in one
`np.frombuffer`) and is ~50x faster. Quantized types and their block sizes come from the `gguf`
package; the bytes of a quantized tensor are exposed as `uint8 [..., row bytes]`, the shape
`gguf.quants.dequantize` takes.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_TYPED = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
          gguf.GGMLQuantizationType.F64: np.float64}


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (truncated or corrupt)."""


@dataclass(slots=True)
class GGUFTensor:
    """One tensor's directory entry and its data (a view into the mapped file)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    n_bytes: int
    data_offset: int  # absolute, in bytes
    data: np.ndarray  # a view into the copy-on-write mapping: writes never reach the file


class _Cursor:
    """Sequential little-endian reads over a buffer, failing with a position on a short read."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.size:
            raise GGUFFormatError(f"needs {n} bytes at offset {self.pos}, but the file has {self.size}")
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: one tight loop, as vocabularies hold hundreds of thousands."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        if pos > size or len(out) < count:
            raise GGUFFormatError(f"a list of {count} strings runs past the end of the file ({size} bytes)")
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item == _STRING:
                return self.strings(count)
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFFormatError(f"unknown metadata value type {kind} at offset {self.pos}")
        return self.scalar(_SCALARS[kind])


class GGUFContents(NamedTuple):
    """A parsed GGUF file."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    metadata_sha256: str  # of the header and metadata bytes: what anything derived from the metadata depends on


def read_gguf_file(path: Path) -> GGUFContents:
    """The metadata and tensors of a GGUF file; the tensor data stays memory-mapped."""
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, the file never changes
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as header:
        metadata, digest, directory, end = _read_header(_Cursor(header))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-end // alignment) * alignment
    return GGUFContents(metadata, [_tensor(mapped, data_start, *entry) for entry in directory], digest)


def _read_header(cur: _Cursor) -> tuple[dict[str, Any], str, list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, sha256 of the bytes up to its end, tensor directory, where the directory ends)."""
    if cur.take(4) != b"GGUF":
        raise GGUFFormatError("bad magic")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    digest = hashlib.sha256(cur.buf[:cur.pos]).hexdigest()
    directory = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        directory.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
    return metadata, digest, directory, cur.pos


def _tensor(mapped: np.memmap, data_start: int, name: str, shape: tuple[int, ...], raw_type: int,
            offset: int) -> GGUFTensor:
    try:
        qtype = gguf.GGMLQuantizationType(raw_type)
    except ValueError as exc:
        raise GGUFFormatError(f"tensor {name!r} has unknown type {raw_type}") from exc
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(shape, dtype=np.int64)) * type_size // block
    start = data_start + offset
    if start + n_bytes > len(mapped):
        raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
    raw = mapped[start:start + n_bytes]
    if qtype in _TYPED:
        data = raw.view(_TYPED[qtype]).reshape(shape)
    else:
        data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
    return GGUFTensor(name, qtype, shape, n_bytes, start, data)
