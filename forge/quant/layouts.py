"""Quantized weight layouts for the CPU: what a weight holds in memory, and its exact float value.

Every layout is a plain object with `shape` ([out_features, in_features]), `nbytes`, `dequantize()`
(the float weight the kernel computes with: the reference every kernel is tested against),
`matmul(x)` (x @ weight.T) and `rows(ids)` (an embedding gather that dequantizes only those rows).
The model calls `ops.linear` / `ops.embedding` and never sees which layout it got.

Layouts, all driven by torch's CPU kernels:
- Int4Weight: 4-bit codes in torch's `_convert_weight_to_int4pack_for_cpu` layout, one bfloat16
  (scale, zero) pair per 32 inputs, w = (q - 8) * scale + zero (tinygemm's form). `planes=2` holds
  codes of up to 8 bits as two 4-bit planes over a doubled input (q = 16 hi + lo, x repeated twice),
  so Q8_0 / Q5_x codes stay exact at 4-bit kernel speed.
- Int8Weight: int8 codes with one scale per output row (`_weight_int8pack_mm`).

Both kernels take bfloat16 activations (their float32 paths are scalar and ~50x slower here), so a
layout is exact in its codes and near-exact in its scales: a GGUF block's float16 scale is rounded
to bfloat16 (relative error <= 2^-9), see GroupQuantized.
"""

from dataclasses import dataclass

import torch

from forge.native import threads as native_threads

GROUP = 32  # inputs per (scale, zero) pair: GGUF's block / sub-block size, and a size the int4 kernel takes
_PACK_ROWS = 64  # the int4 CPU layout interleaves rows in blocks of 64 (see Int4Weight._codes_of_rows)


@dataclass
class GroupQuantized:
    """A weight as codes with one float32 (scale, offset) per 32 inputs: w = scale * q + offset.

    The exact, unpacked form a GGUF block decodes to (forge.quant.gguf) and that float weights are
    quantized to; `pack()` turns it into a kernel layout."""

    codes: torch.Tensor  # uint8 [N, K], values in [0, 2^bits)
    scale: torch.Tensor  # float32 [N, K / 32]
    offset: torch.Tensor  # float32 [N, K / 32]
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.view(n, k // GROUP, GROUP).float()
        # Same two roundings as the gguf package's `d * q + m` (no fused multiply-add).
        return (q * self.scale[..., None] + self.offset[..., None]).view(n, k)

    def map_rows(self, fn) -> "GroupQuantized":
        """The same rows operation (a slice, a padding, a permutation) on codes, scales and offsets."""
        return GroupQuantized(fn(self.codes), fn(self.scale), fn(self.offset), self.bits)

    def narrow_inputs(self, start: int, count: int) -> "GroupQuantized":
        """Inputs start .. start + count (a row-parallel shard): on 32-input group boundaries."""
        _check_aligned(start, count, GROUP)
        g0, gn = start // GROUP, count // GROUP
        return GroupQuantized(self.codes[:, start : start + count].contiguous(),
                              self.scale[:, g0 : g0 + gn].contiguous(), self.offset[:, g0 : g0 + gn].contiguous(),
                              self.bits)


@dataclass
class Fp8Quantized:
    """A weight as float8 e4m3 codes with float32 scales: w = codes * scale[n, k // group].

    group = in_features: one scale per output channel (compressed-tensors' channel strategy, and
    `--quantization fp8`); 128: a checkpoint's [128, 128] blocks, each block's scale repeated over its
    128 rows. The loaders' form of an FP8 checkpoint's weight; on CUDA it becomes a kernel layout
    (forge.quant.cuda), on the CPU it is dequantized."""

    codes: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N, K / group]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // self.group, self.group) * self.scale[..., None]
        return w.view(n, k)

    def map_rows(self, fn) -> "Fp8Quantized":
        """The same rows operation on codes and scales."""
        return Fp8Quantized(fn(self.codes), fn(self.scale), self.group)

    def narrow_inputs(self, start: int, count: int) -> "Fp8Quantized":
        """Inputs start .. start + count (a row-parallel shard). One scale per row (group = in_features)
        covers any cut, and the slice keeps it; block scales need the cut on `group` boundaries."""
        codes = self.codes[:, start : start + count].contiguous()
        if self.group == self.codes.shape[1]:
            return Fp8Quantized(codes, self.scale.clone(), count)
        _check_aligned(start, count, self.group)
        g0, gn = start // self.group, count // self.group
        return Fp8Quantized(codes, self.scale[:, g0 : g0 + gn].contiguous(), self.group)


def _check_aligned(start: int, count: int, group: int) -> None:
    if start % group or count % group:
        raise ValueError(f"inputs {start}..{start + count} do not fall on groups of {group}")


def cat_groups(parts: list[GroupQuantized]) -> GroupQuantized:
    """Stack weights along the output dimension (fused q/k/v, gate/up)."""
    return GroupQuantized(
        codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
        offset=torch.cat([p.offset for p in parts]), bits=max(p.bits for p in parts),
    )


def cat_fp8(parts: list[Fp8Quantized]) -> Fp8Quantized:
    """Stack FP8 weights along the output dimension (fused q/k/v, gate/up): one scale group for all
    (per-channel parts of equal width, or block parts of equal block). Parts whose groups differ
    (per-channel q next to block-scaled k) are a ValueError: dequantize them instead."""
    groups = {p.group for p in parts}
    if len(groups) != 1:
        raise ValueError(f"cannot stack FP8 weights with scale groups {sorted(groups)}")
    return Fp8Quantized(codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
                        group=parts[0].group)


def cat_rows(parts: list):
    """Stack loader-level weights of one kind along the output dimension (tensors, GroupQuantized or Fp8Quantized)."""
    if all(isinstance(p, GroupQuantized) for p in parts):
        return cat_groups(parts)
    if all(isinstance(p, Fp8Quantized) for p in parts):
        return cat_fp8(parts)
    return torch.cat(parts)


Carrier = GroupQuantized | Fp8Quantized  # the loaders' quantized forms of a matrix


class Int4Weight:
    """4-bit codes for `aten._weight_int4pack_mm_for_cpu`, groups of 32 inputs.

    Bytes per weight: 0.5 per plane + 4 bytes of bfloat16 (scale, zero) per 32 inputs per plane:
    0.625 for 4-bit codes (the same as GGUF Q4_1), 1.25 for two planes.
    """

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, shape: tuple[int, int], planes: int):
        self.packed = packed  # uint8 [N_pad, planes * K / 2], torch's CPU int4pack layout
        self.scales_zeros = scales_zeros  # bfloat16 [planes * K / 32, N_pad, 2]
        self.shape = shape  # (N, K): the logical weight; N_pad = N rounded up to 64
        self.planes = planes

    @classmethod
    def from_groups(cls, g: GroupQuantized) -> "Int4Weight":
        n, k = g.shape
        if g.bits > 8:
            raise ValueError(f"Int4Weight holds codes of at most 8 bits, got {g.bits}")
        pad = -n % _PACK_ROWS  # zero rows: the packed layout is regular, and padded outputs are sliced off
        codes, scale, offset = g.codes, g.scale, g.offset
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, k)])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            offset = torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
        if g.bits <= 4:
            planes = 1
            # (q - 8) * s + z == s * q + o  with  z = o + 8 s
            plane_sz = [(scale, offset + 8 * scale)]
        else:
            # q = 16 hi + lo:  s q + o == [(hi - 8) 16 s + (o + 128 s)] + [(lo - 8) s + 8 s]
            planes = 2
            plane_sz = [(16 * scale, offset + 128 * scale), (scale, 8 * scale)]

        def pack_rows(c: torch.Tensor) -> torch.Tensor:
            c = torch.cat([c >> 4, c & 15], 1) if planes == 2 else c
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)

        # In slices of 64-row blocks (the layout's unit): the int32 copy the converter takes stays small.
        step = _PACK_ROWS * 64
        packed = torch.cat([pack_rows(codes[i : i + step]) for i in range(0, n + pad, step)])
        s = torch.cat([p[0] for p in plane_sz], 1)  # [N_pad, planes * K / 32]
        z = torch.cat([p[1] for p in plane_sz], 1)
        scales_zeros = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()
        return cls(packed, scales_zeros, (n, k), planes)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] bfloat16 (the kernel accumulates in float32)."""
        lead, (n, k) = x.shape[:-1], self.shape
        x = x.reshape(-1, k)
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if self.planes == 2:
            x = torch.cat([x, x], 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        if y.shape[1] != n:
            y = y[:, :n]
        return y.view(*lead, n)

    def _codes_of_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The 4-bit codes of rows `ids`, [len(ids), planes * K] uint8. In torch's CPU int4pack layout
        rows come in blocks of 64: byte (block, k, r % 32) holds row r's code k in its low nibble for
        r % 64 < 32, in its high nibble otherwise. (tests/test_quant_cpu.py checks this against the
        kernel's own results, so a change of layout in torch fails loudly.)"""
        kp = self.packed.shape[1] * 2
        byte = self.packed.view(-1, kp, 32).transpose(1, 2)[ids // _PACK_ROWS, ids % 32]  # [T, kp]
        return (byte >> (((ids % _PACK_ROWS) >= 32).to(torch.uint8) * 4)[:, None]) & 15

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` of the weight, [len(ids), K] float32."""
        ids = ids.long()
        t, k = len(ids), self.shape[1]
        q = self._codes_of_rows(ids).view(t, self.planes * k // GROUP, GROUP).float()
        sz = self.scales_zeros.index_select(1, ids).float().transpose(0, 1)  # [T, planes * K / 32, 2]
        w = (q - 8) * sz[..., :1] + sz[..., 1:]
        w = w.view(t, self.planes, k)
        return w.sum(1) if self.planes == 2 else w[:, 0]

    def row_dots(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x[i] . row ids[i, j] in float32, [n, k] for ids [n, k] and x [n, K]: the lm_head's
        refinement (CpuOps.logits), without materializing the rows:
        sum_g (s_g sum_j (q_j - 8) x_j + z_g sum_j x_j) over the groups g of every plane."""
        n, k = ids.shape
        flat = ids.flatten().long()
        q = self._codes_of_rows(flat).view(n, k, -1, GROUP).float()  # [n, k, planes * G, 32]
        xg = x.float().view(n, 1, -1, GROUP).repeat(1, 1, self.planes, 1)  # [n, 1, planes * G, 32]
        qx = (q * xg).sum(-1)  # [n, k, planes * G]
        xsum = xg.sum(-1)
        sz = self.scales_zeros.index_select(1, flat).float().transpose(0, 1).view(n, k, -1, 2)
        return (sz[..., 0] * (qx - 8 * xsum) + sz[..., 1] * xsum).sum(-1)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]))


class Int8Weight:
    """int8 codes with one bfloat16 scale per output row, for `aten._weight_int8pack_mm`: w = s * q.
    1 byte per weight."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes = codes  # int8 [N, K]
        self.scales = scales  # bfloat16 [N]
        self.shape = tuple(codes.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        """Symmetric round-to-nearest per row: each weight moves by at most half a step, the row's
        bfloat16 scale / 2 (~ max|row| / 254). The scale is rounded up to bfloat16, so no code clips."""
        w = weight.float()
        exact = w.abs().amax(1) / 127
        scale = exact.to(torch.bfloat16)
        low = scale.float() < exact
        scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
        s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        codes = torch.round(w / s).clamp_(-127, 127).to(torch.int8)
        return cls(codes.contiguous(), scale)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead, (n, k) = x.shape[:-1], self.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16), self.codes, self.scales)
        return y.view(*lead, n)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.scales[ids].float()[:, None]

    def row_dots(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x[i] . row ids[i, j] in float32, [n, k] (see Int4Weight.row_dots)."""
        dots = torch.matmul(self.codes[ids].float(), x.float()[:, :, None])[..., 0]
        return dots * self.scales[ids].float()

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float()[:, None]


class Q32Weight:
    """forge's own AVX-512 VNNI layout (forge/native/q32_gemm.cpp, loaded by forge.native):
    4-bit codes (GGUF Q4_0/Q4_1/Q4_K, int4) or 8-bit codes (Q8_0, Q5_x, the requantized K-quants),
    one float16 (scale, offset) per 32 inputs, w = scale * q + offset, interleaved 16 rows at a
    time (the .cpp's comment draws the bytes). The kernel quantizes activations per 32 inputs to int8.

    Exact for GGUF Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (their scales are float16 already); Q4_K/Q5_K
    scales (a float16 times a 6-bit integer) round to float16, relative error <= 2^-11.
    Bytes per weight: 0.625 (4-bit, the same as GGUF Q4_1) or 1.125 (8-bit: Q8_0's 1.0625 + offsets).
    """

    def __init__(self, data: torch.Tensor, shape: tuple[int, int], bits: int, lib):
        self.data = data  # uint8 [N_pad / 16, K / 32, group block bytes]; N_pad = N rounded up to 16
        self.shape = shape  # (N, K)
        self.bits = bits
        self._lib = lib
        self._n_pad = data.shape[0] * Q32_TILE

    @classmethod
    def from_groups(cls, g: GroupQuantized, lib) -> "Q32Weight | None":
        """None when a scale or offset does not fit float16 (the caller keeps torch's layout)."""
        if g.bits > 8:
            raise ValueError(f"Q32Weight holds codes of at most 8 bits, got {g.bits}")
        scale, offset = g.scale.to(torch.float16), g.offset.to(torch.float16)
        if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
            return None
        bits = 4 if g.bits <= 4 else 8
        return cls(pack_q32(g.codes, scale, offset, bits), g.shape, bits, lib)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> float32 [..., N]."""
        lead, (n, k) = x.shape[:-1], self.shape
        x = x.reshape(-1, k)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(x.shape[0], self._n_pad)
        self._lib.fq_linear(x.data_ptr(), x.shape[0], k, self.data.data_ptr(), self.bits, self._n_pad, y.data_ptr(),
                            native_threads.threads())
        if self._n_pad != n:
            y = y[:, :n]
        return y.view(*lead, n)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` of the weight, [len(ids), K] float32."""
        ids = ids.reshape(-1).long().contiguous()
        n, k = self.shape
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise IndexError(f"row ids must be in [0, {n})")
        out = torch.empty(ids.numel(), k)
        self._lib.fq_dequantize_rows(self.data.data_ptr(), self.bits, self._n_pad, k, ids.data_ptr(), ids.numel(),
                                     out.data_ptr())
        return out

    def row_dots(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x[i] . row ids[i, j] in float32, [n, k] (see Int4Weight.row_dots)."""
        n, k = ids.shape
        w = self.rows(ids.flatten()).view(n, k, -1)
        return torch.bmm(w, x.float().view(n, -1, 1))[..., 0]

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]))


Q32_TILE = 16  # rows interleaved per tile (one int32 lane each in the kernel)


def pack_q32(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] and float16 scale/offset [N, K / 32] -> q32_gemm.cpp's bytes, [N_pad / 16, K / 32, block]:
    per tile of 16 rows and group of 32 inputs, 8 steps of 64 bytes (step j: codes 4j .. 4j + 3 of
    each row in turn; 4-bit codes put step j + 4 in the high nibble of step j), then the 16 rows'
    scales and their 16 offsets."""
    n, k = codes.shape
    pad = -n % Q32_TILE
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, k)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        offset = torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
    tiles, groups = (n + pad) // Q32_TILE, k // GROUP
    steps = codes.view(tiles, Q32_TILE, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, groups, 8, 64)
    if bits == 4:
        steps = steps[:, :, :4] | (steps[:, :, 4:] << 4)
    per_tile = lambda t: t.view(tiles, Q32_TILE, groups).transpose(1, 2).contiguous().view(torch.uint8)  # noqa: E731
    return torch.cat([steps.reshape(tiles, groups, -1), per_tile(scale), per_tile(offset)], -1).contiguous()


QuantizedWeight = Int4Weight | Int8Weight | Q32Weight


def quantize_groups(weight: torch.Tensor, bits: int) -> GroupQuantized:
    """Asymmetric round-to-nearest per 32 inputs (min/max, like GGUF Q4_1): each weight moves by at
    most half a step, (max - min) / (2 (2^bits - 1)) of its group."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"group quantization needs in_features divisible by {GROUP}, got {k}")
    w = weight.float().view(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round((w - lo[..., None]) * inv[..., None]).clamp_(0, levels).to(torch.uint8).view(n, k)
    return GroupQuantized(codes=codes, scale=scale, offset=lo, bits=bits)
