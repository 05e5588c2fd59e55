"""Quantized weight layouts for CUDA: 4-bit codes and float8 e4m3, computed by forge's kernels.

Both are plain objects like the CPU layouts (forge.quant.layouts): `shape`, `nbytes`, `dequantize()`
(the float weight the kernels compute with, the tests' reference), `matmul(x)` and `rows(ids)`.

- Int4CudaWeight: w = s * q + o, q in [0, 16), one float16 (s, o) per `group` (32 or 128) inputs. GGUF
  Q4_0 / Q4_1 blocks repack into it without loss (their scales are float16; Q4_0's offset is -8 s),
  Q4_K's float32 sub-block products are rounded to float16 (<= 2^-11 relative), AWQ / GPTQ groups of
  128 keep their float16 scale and take o = -z * s rounded to float16. `--quantization int4` quantizes
  float weights per 128 inputs (min / max). 0.5 + 4 / group bytes per weight.
- Fp8CudaWeight: e4m3 codes with a float32 scale per output row (`--quantization fp8`: amax / 448) or per
  128 x 128 block (FP8 checkpoints), 1 byte per weight.

matmul: up to `max_kernel_m` rows of x run forge's kernel (forge/kernels/quant_gemm.cu: dequantized in
registers, tensor-core MMAs, graph-capturable); larger steps (prefill) take cuBLAS's path: int4 is
dequantized to the compute dtype for the GEMM, per-row fp8 runs torch._scaled_mm with x quantized per
row (W8A8, dynamic scales), block-scaled fp8 is dequantized.
FORGE_QUANT_KERNEL=pipe (read at import; default off until measured) sends steps of up to PIPE_MAX_M tokens
to forge/kernels/quant_gemm_pipe.cu instead (the same layouts; weights streamed through a cp.async ring).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from forge.kernels import quant_gemm, quant_gemm_pipe
from forge.kernels.quant_gemm import ROW_ALIGN

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_CHUNK = 128  # inputs of a row per 64-byte chunk of the int4 layout (padded K is a multiple)
FP8_CHUNK = 64
SCALE_STEPS = 8  # candidate per-row fp8 scales per octave (Fp8CudaWeight.quantize)
INT4_MAX_KERNEL_M = 64  # larger steps dequantize + cuBLAS (benchmarks/quant_gemm.py measures the crossover)
FP8_MAX_KERNEL_M = 16  # larger steps run torch._scaled_mm
QUANT_KERNEL_ENV = "FORGE_QUANT_KERNEL"
PIPE_MAX_M = {0: 128, 1: 64}  # int4 / fp8: steps of up to this many tokens take quant_gemm_pipe when it is on


def parse_quant_kernel(value: str | None) -> str:
    """FORGE_QUANT_KERNEL's value: "pipe" (quant_gemm_pipe.cu) or "default" (quant_gemm.cu; also unset / empty)."""
    text = (value or "").strip().lower() or "default"
    if text not in ("default", "pipe"):
        raise ValueError(f"{QUANT_KERNEL_ENV}={value!r}: use pipe or default")
    return text


QUANT_KERNEL = parse_quant_kernel(os.environ.get(QUANT_KERNEL_ENV))


def small_step_gemm(x: torch.Tensor, layout):
    """forge's own kernel for x @ W.T where the step is small enough for one (quant_gemm_pipe.gemm up to
    PIPE_MAX_M tokens when FORGE_QUANT_KERNEL=pipe, else quant_gemm.gemm up to the layout's max_kernel_m);
    None above, where the layout's cuBLAS path runs."""
    m = x.numel() // x.shape[-1]
    if QUANT_KERNEL == "pipe" and m <= PIPE_MAX_M[layout.code]:
        return quant_gemm_pipe.gemm
    if m <= layout.max_kernel_m:
        return quant_gemm.gemm
    return None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _int4_permutation(padded_k: int, device) -> torch.Tensor:
    """position in the layout's row -> input index: chunk, lane c, word m, value v (pair order)."""
    pos = torch.arange(padded_k, device=device)
    chunk, rest = pos // INT4_CHUNK, pos % INT4_CHUNK
    c, rest = rest // 32, rest % 32  # lane c's 32 values
    m, v = rest // 8, rest % 8  # word m, value v of the word: k-tile j = 2m + v // 4, i = v % 4
    return chunk * INT4_CHUNK + 16 * (2 * m + v // 4) + 4 * c + v % 4


def _pack_nibbles(ordered: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in layout order (8 per word) -> int32 words: value pair p in bits 4p and 16 + 4p."""
    v = ordered.view(ordered.shape[0], -1, 8).to(torch.int32)
    word = torch.zeros(v.shape[:2], dtype=torch.int32, device=v.device)
    for p in range(4):
        word |= (v[..., 2 * p] << (4 * p)) | (v[..., 2 * p + 1] << (16 + 4 * p))
    return word


def _unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([[4 * p, 16 + 4 * p] for p in range(4)], device=words.device).view(8)
    return ((words[..., None] >> shifts) & 15).reshape(words.shape[0], -1).to(torch.uint8)


class Int4CudaWeight:
    code = 0

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], group: int):
        self.codes = codes  # int32 [N_pad, K_pad / 8]: 8 codes a word, in the kernel's order (quant_gemm.cu)
        self.scales = scales  # float16 [N_pad, K_pad / group, 2]: (s, o)
        self.shape = shape
        self.group = group
        self.padded_k = codes.shape[1] * 8
        self.row_bytes = codes.shape[1] * 4
        self.groups_per_row = scales.shape[1]
        self.max_kernel_m = INT4_MAX_KERNEL_M
        self.dtype = torch.bfloat16  # the compute dtype (rows() and the prefill path's dequantized weight)

    @classmethod
    def from_groups(cls, g, device) -> "Int4CudaWeight":
        """From a forge.quant.GroupQuantized of 4-bit codes (groups of 32): groups of 128 when every four
        neighbouring groups share a scale and offset (AWQ / GPTQ, quantize_int4), else of 32."""
        if g.bits != 4:
            raise ValueError(f"Int4CudaWeight holds 4-bit codes, not {g.bits}-bit")
        n, k = g.shape
        scale, offset = g.scale.to(device), g.offset.to(device)
        group = 32
        if k % 128 == 0:
            s4, o4 = scale.view(n, -1, 4), offset.view(n, -1, 4)
            if torch.equal(s4, s4[..., :1].expand_as(s4)) and torch.equal(o4, o4[..., :1].expand_as(o4)):
                group, scale, offset = 128, s4[..., 0].contiguous(), o4[..., 0].contiguous()
        return cls.pack(g.codes.to(device), scale, offset, group)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group: int = 128) -> "Int4CudaWeight":
        """Round-to-nearest 4-bit codes per `group` inputs, min / max range (K a multiple of `group`)."""
        n, k = weight.shape
        w = weight.float().view(n, k // group, group)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).half().float()  # the stored (float16) values quantize the codes
        offset = lo.half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = ((w - offset[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(n, k)
        return cls.pack(codes, scale, offset, group)

    @classmethod
    def pack(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> "Int4CudaWeight":
        """codes uint8 [N, K], scale / offset float32 [N, K / group] -> the kernel layout (rows padded
        to ROW_ALIGN, inputs to INT4_CHUNK, with zero codes and zero scales)."""
        n, k = codes.shape
        rows, padded_k = -(-n // ROW_ALIGN) * ROW_ALIGN, -(-k // INT4_CHUNK) * INT4_CHUNK
        full = codes.new_zeros(rows, padded_k)
        full[:n, :k] = codes
        words = _pack_nibbles(full[:, _int4_permutation(padded_k, codes.device)])
        so = torch.zeros(rows, padded_k // group, 2, dtype=torch.float16, device=codes.device)
        so[:n, : k // group, 0] = scale.half()
        so[:n, : k // group, 1] = offset.half()
        return cls(words.contiguous(), so, (n, k), group)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * 4 + self.scales.numel() * 2

    def _decode(self, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Rows of words / scales -> float32 weights [rows, K] (torch; the reference)."""
        ordered = _unpack_nibbles(words)
        codes = torch.empty_like(ordered)
        codes[:, _int4_permutation(self.padded_k, words.device)] = ordered
        q = codes.float().view(codes.shape[0], -1, self.group)
        so = scales.float()
        return (q * so[..., 0:1] + so[..., 1:2]).view(codes.shape[0], -1)[:, : self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        return self._decode(self.codes[: self.shape[0]], self.scales[: self.shape[0]])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        gemm = small_step_gemm(x, self)
        return gemm(x, self) if gemm is not None else F.linear(x, quant_gemm.int4_dequantize(self, x.dtype))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """An embedding gather: only the rows `ids` are dequantized, in the compute dtype."""
        flat = ids.reshape(-1)
        return quant_gemm.int4_dequantize(self, self.dtype, flat).view(*ids.shape, self.shape[1])


class Fp8CudaWeight:
    code = 1

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], group: int):
        self.codes = codes  # float8_e4m3fn [N_pad, K]
        self.scales = scales  # float32 [N_pad] (group 0: per row) or [N_pad, K / 128]
        self.shape = shape
        self.group = group  # 0: one scale per output row; 128: per 128 inputs of a row
        self.padded_k = codes.shape[1]
        self.row_bytes = codes.shape[1]
        self.groups_per_row = 1 if group == 0 else scales.shape[1]
        self.max_kernel_m = FP8_MAX_KERNEL_M
        self.dtype = torch.bfloat16  # the compute dtype (rows())
        self._row_scale = scales[: shape[0]].view(1, -1) if group == 0 else None  # [1, N] for _scaled_mm

    @staticmethod
    def supports(shape: tuple[int, int]) -> bool:
        return shape[1] % FP8_CHUNK == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Fp8CudaWeight":
        """Per output row: codes = w / s rounded to e4m3, s = the scale of least squared error among
        amax / 448 * 2^(j / SCALE_STEPS), j < SCALE_STEPS. Where a row's values fall between e4m3's
        steps depends on s; one octave of candidates covers every placement, and none clips (clipping
        the largest weights cost far more than it saved: mean KL on the default model 3.6e-2 at
        0.9 amax vs 1.6e-2). The search took that KL (weight-only) to 1.15e-2."""
        w = weight.float()
        base = (w.abs().amax(-1) / FP8_MAX).clamp_(min=1e-12)
        best_scale, best_err = base, None
        for j in range(SCALE_STEPS):
            scale = base * 2.0 ** (j / SCALE_STEPS)
            err = ((w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).float() * scale[:, None] - w).square_().sum(-1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
        codes = (w / best_scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return cls.from_codes(codes, best_scale, 0)

    @classmethod
    def from_quantized(cls, q, device) -> "Fp8CudaWeight":
        """From a forge.quant.Fp8Quantized (a checkpoint's codes and per-row or per-block scales)."""
        n, k = q.shape
        if q.group == k:
            return cls.from_codes(q.codes.to(device), q.scale.to(device).view(n), 0)
        if q.group != 128:
            raise ValueError(f"fp8 scales per {q.group} inputs: forge's kernel takes per-row or per-128")
        return cls.from_codes(q.codes.to(device), q.scale.to(device).float(), 128)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, group: int) -> "Fp8CudaWeight":
        n = codes.shape[0]
        rows = -(-n // ROW_ALIGN) * ROW_ALIGN
        return cls(_pad_rows(codes, rows), _pad_rows(scale.float(), rows), tuple(codes.shape), group)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4

    def _decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        w = codes.float()
        if self.group == 0:
            return w * scales[:, None]
        return (w.view(w.shape[0], -1, 128) * scales[..., None]).view(w.shape)

    def dequantize(self) -> torch.Tensor:
        n = self.shape[0]
        return self._decode(self.codes[:n], self.scales[:n])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        gemm = small_step_gemm(x, self)
        if gemm is not None:
            return gemm(x, self)
        if self.group != 0:
            return F.linear(x, self.dequantize().to(x.dtype))
        return scaled_mm_rowwise(x, self.codes[: self.shape[0]], self._row_scale)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self._decode(self.codes[flat], self.scales[flat]).to(self.dtype).view(*ids.shape, self.shape[1])


def scaled_mm_rowwise(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """x @ (codes * row_scale.T).T (row_scale [1, N]) as an FP8 GEMM: x quantized per row (amax / 448, dynamic;
    one kernel, quant_gemm.fp8_quantize_rows), torch's row-wise-scaled FP8 GEMM, output in x's dtype."""
    lead = x.shape[:-1]
    xq, x_scale = quant_gemm.fp8_quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(xq, codes.t(), scale_a=x_scale, scale_b=row_scale, out_dtype=x.dtype)
    return out.view(*lead, codes.shape[0])

