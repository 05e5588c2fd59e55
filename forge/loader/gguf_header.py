"""A fast reader of a GGUF file's header: its metadata and its tensor table, parsed with `struct` from
one memory map; the tensors stay in the file (numpy views of the map, read when used).

The `gguf` package's GGUFReader makes a numpy view for every part of every field (~250,000 for a
49,152-token vocabulary with its merges), which took 1.8 s of a 4.4 s `forge generate` start on 2 idle
cores; this reads the same header in tens of milliseconds. Tensors come back as the package's own
`ReaderTensor`, with the same `data` views, so the rest of the loader uses them unchanged.

Format (little-endian, versions 2 and 3): magic "GGUF", version u32, tensor count u64, metadata count u64;
each metadata entry: key (string), value type u32, value; each tensor: name (string), n_dims u32,
dims u64 x n_dims (fastest first), ggml type u32, offset u64 from the start of the data, which begins at
the first multiple of `general.alignment` (default 32) after the header. A string is a u64 length + UTF-8.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

from forge.errors import ModelLoadError, UnsupportedModelError

# GGUF value types: struct format of the scalar ones (STRING = 8, ARRAY = 9).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Element types whose tensor data gguf gives as typed arrays (the rest as raw bytes per block row).
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Truncated(Exception):
    pass


class GGUFHeader:
    """`metadata` ({key: int | float | bool | str | list}, as GGUFReader's field.contents() gives them),
    `tensors` (ReaderTensor, in file order) and `data_offset` of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {e}") from None
        self._buf = memoryview(self._map)  # (a plain bytes-like view: struct reads it without copies)
        self._pos = 0
        try:
            self._read_header()
        except (_Truncated, struct.error):
            raise ModelLoadError(f"cannot read GGUF file {self.path}: truncated or corrupt header "
                                 f"(it ends at byte {len(self._buf)})") from None
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: a name or string is not UTF-8 "
                                 f"(byte {e.start} of one): corrupt header") from None

    # -- the header --------------------------------------------------------------------------------
    def _read_header(self) -> None:
        if bytes(self._take(4)) != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file (no GGUF magic)")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise UnsupportedModelError(f"cannot read GGUF file {self.path}: GGUF version {version} is not supported "
                                        f"(forge reads versions 2 and 3)")
        n_tensors, n_kv = self._unpack("<QQ")
        if n_tensors > len(self._buf) // 24 or n_kv > len(self._buf) // 12:  # each entry takes at least that
            raise _Truncated
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._value(value_type)
        table = [self._tensor_entry() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1:
            raise ModelLoadError(f"{self.path}: bad general.alignment {alignment!r}")
        self.data_offset = -(-self._pos // alignment) * alignment
        self.tensors = self._build_tensors(table)

    def _tensor_entry(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        if n_dims > 8:
            raise _Truncated
        dims = list(self._unpack(f"<{n_dims}Q"))
        ggml_type, offset = self._unpack("<IQ")
        return name, dims, ggml_type, offset

    def _build_tensors(self, table: list[tuple[str, list[int], int, int]]) -> list[ReaderTensor]:
        tensors, names, end = [], set(), self.data_offset
        for name, dims, ggml_type, offset in table:
            if name in names:
                raise ModelLoadError(f"{self.path} holds two tensors named {name!r}")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(ggml_type)
                block_size, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise UnsupportedModelError(f"tensor {name!r} of {self.path} has unknown GGML type {ggml_type}") from None
            n_elements = math.prod(dims)
            n_bytes = n_elements * type_size // block_size
            start = self.data_offset + offset
            end = max(end, start + n_bytes)
            tensors.append((name, qtype, dims, n_elements, n_bytes, start))
        if len(self._buf) < end:
            raise ModelLoadError(f"{self.path} is truncated: expected {end} bytes, found {len(self._buf)}")
        return [ReaderTensor(name=name, tensor_type=qtype, shape=np.array(dims, dtype=np.uint64), n_elements=n,
                             n_bytes=n_bytes, data_offset=start, data=self._tensor_data(qtype, dims, start, n_bytes),
                             field=None)
                for name, qtype, dims, n, n_bytes, start in tensors]

    def _tensor_data(self, qtype: GGMLQuantizationType, dims: list[int], start: int, n_bytes: int) -> np.ndarray:
        """The tensor's bytes in the map, shaped as GGUFReader shapes them (read-only; nothing is read yet)."""
        shape = tuple(reversed(dims))
        raw = self._map[start : start + n_bytes]
        if qtype in _PLAIN_DTYPES:
            return raw.view(_PLAIN_DTYPES[qtype]).reshape(shape)
        return raw.reshape(quant_shape_to_byte_shape(shape, qtype))

    # -- values --------------------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        start, self._pos = self._pos, self._pos + n
        if self._pos > len(self._buf):
            raise _Truncated
        return self._buf[start : self._pos]

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)
        start, self._pos = self._pos + 8, self._pos + 8 + n
        if self._pos > len(self._buf):
            raise _Truncated
        return str(self._buf[start : self._pos], "utf-8")

    def _value(self, value_type: int) -> Any:
        if value_type in _SCALAR:
            return self._unpack("<" + _SCALAR[value_type])[0]
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if count > len(self._buf) - self._pos:  # every element takes at least a byte
                raise _Truncated
            if item_type in _SCALAR:  # numbers: one unpack for the whole array
                return list(self._unpack(f"<{count}{_SCALAR[item_type]}"))
            if item_type == _STRING:
                return self._strings(count)
            return [self._value(item_type) for _ in range(count)]  # arrays of arrays (rare)
        raise ModelLoadError(f"cannot read GGUF file {self.path}: unknown metadata value type {value_type}")

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: the bulk of the header), in one tight loop."""
        buf, pos, size, out = self._buf, self._pos, len(self._buf), []
        length_at, append = struct.Struct("<Q").unpack_from, out.append
        for _ in range(count):
            (n,) = length_at(buf, pos)
            pos += 8
            if pos + n > size:
                raise _Truncated
            append(str(buf[pos : pos + n], "utf-8"))
            pos += n
        self._pos = pos
        return out
