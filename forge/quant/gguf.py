"""GGUF quantized blocks -> GroupQuantized (codes + one float32 scale and offset per 32 weights).

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K are codes with one scale and offset per 32 weights, so
they decode without loss: `GroupQuantized.dequantize()` equals the gguf package's dequantization
bit for bit (tests/test_quant_cpu.py). Q4_0, Q4_1 and Q8_0 (the common ones: 16 nibble bytes or 32
int8 codes after the float16 fields) are unpacked here in torch, fast; the codes of the others are
read by the gguf package itself, from a copy of the blocks whose scale fields are set to 1 and
offset fields to 0, so their bit layouts are not written twice. Scales come from the float16 fields.

Q6_K, Q3_K and Q2_K have a scale per 16 weights, which no 32-group kernel layout holds: they are
requantized to 8-bit codes per 32 weights from their exact float values (near-exact: each weight
moves by at most 1/510 of its group's range, well under the source format's own step).
"""

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K, dequantize

from forge.quant.layouts import GROUP, GroupQuantized, quantize_groups

EXACT_TYPES = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K}
REQUANTIZED_TYPES = {Q.Q6_K, Q.Q3_K, Q.Q2_K}

_F16_ONE = np.frombuffer(np.float16(1).tobytes(), np.uint8)
# Q4_K/Q5_K packed 6-bit (scale, min) of the 8 sub-blocks: every scale 1, every min 0.
_K_UNIT_SCALES = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _codes(qtype: Q, blocks: np.ndarray, unit: dict[int, np.ndarray], shift: int) -> np.ndarray:
    """The integer codes of `blocks` ([n, type_size] uint8): dequantize a copy whose scale fields
    (byte offset -> value) make the gguf package return the codes themselves, minus `shift`."""
    b = blocks.copy()
    for at, value in unit.items():
        b[:, at : at + len(value)] = value
    return (dequantize(b, qtype).reshape(len(b), -1) + shift).astype(np.uint8)


def _decode_simple(qtype: Q, blocks: torch.Tensor, n: int, k: int) -> GroupQuantized:
    """Q4_0 / Q4_1: float16 d (and m), then 16 bytes holding code j in the low nibble of byte j and
    code j + 16 in its high nibble. Q8_0: float16 d, then 32 int8 codes (stored + 128 as uint8)."""
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()[:, 0]
    if qtype == Q.Q8_0:
        codes, scale, offset, bits = blocks[:, 2:] ^ 0x80, d, -128 * d, 8
    else:
        start = 2 if qtype == Q.Q4_0 else 4
        qs = blocks[:, start:]
        codes, bits = torch.cat([qs & 15, qs >> 4], 1), 4
        if qtype == Q.Q4_0:
            scale, offset = d, -8 * d
        else:
            scale, offset = d, blocks[:, 2:4].contiguous().view(torch.float16).float()[:, 0]
    return GroupQuantized(codes=codes.reshape(n, k).contiguous(), scale=scale.reshape(n, k // GROUP),
                          offset=offset.reshape(n, k // GROUP), bits=bits)


def decode_blocks(qtype: Q, data: np.ndarray, shape: tuple[int, int]) -> GroupQuantized:
    """data: the tensor's raw bytes [N, bytes per row] -> GroupQuantized of `shape` (N, K)."""
    n, k = shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in REQUANTIZED_TYPES:
        return quantize_groups(torch.from_numpy(np.asarray(dequantize(data, qtype), np.float32).reshape(n, k)), 8)
    blocks = np.ascontiguousarray(data).reshape(-1, type_size)
    zero = np.zeros(2, np.uint8)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        return _decode_simple(qtype, torch.from_numpy(np.array(blocks)), n, k)  # (a writable copy of the mapped file)
    if qtype == Q.Q5_0:
        d = _f16(blocks, 0)
        codes, scale, offset, bits = _codes(qtype, blocks, {0: _F16_ONE}, 16), d, -16 * d, 5
    elif qtype == Q.Q5_1:
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        codes, scale, offset, bits = _codes(qtype, blocks, {0: _F16_ONE, 2: zero}, 0), d, m, 5
    elif qtype in (Q.Q4_K, Q.Q5_K):
        # 256-weight super-blocks of 8 sub-blocks: weight = (d * sc_j) * q - dmin * m_j
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        codes = _codes(qtype, blocks, {0: _F16_ONE, 2: zero, 4: _K_UNIT_SCALES}, 0)
        scale = d[:, None] * sc.astype(np.float32)
        offset = -(dmin[:, None] * mins.astype(np.float32))
        bits = 4 if qtype == Q.Q4_K else 5
    else:
        raise ValueError(f"no 32-group layout for GGUF type {qtype.name}")
    groups = k // GROUP
    return GroupQuantized(
        codes=torch.from_numpy(codes.reshape(n, k)),
        scale=torch.from_numpy(np.ascontiguousarray(scale, np.float32).reshape(n, groups)),
        offset=torch.from_numpy(np.ascontiguousarray(offset, np.float32).reshape(n, groups)),
        bits=bits,
    )
