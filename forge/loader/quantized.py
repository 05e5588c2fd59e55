"""HF quantized checkpoints: config.json's `quantization_config` -> the loaders' quantized matrices
(forge.quant.layouts), under the schema's HF weight names (`...q_proj.weight`).

Formats, as the common tools write them and vLLM / transformers / compressed-tensors read them:
- `fp8` (DeepSeek-V3, Qwen3 FP8 releases; vLLM's fp8 serialization): `X.weight` float8_e4m3fn with
  `X.weight_scale_inv` float32 [ceil(N/bn), ceil(K/bk)] for `weight_block_size: [bn, bk]` (w = codes *
  scale_inv over each block), or a per-tensor `X.weight_scale`. -> Fp8Quantized, group bk (the block's
  scale repeated over its bn rows) or K (one scale per row).
- `compressed-tensors` with float8 weights (`format` float-quantized / naive-quantized; strategy
  tensor, channel or block): `X.weight` e4m3 + `X.weight_scale` ([1], [N, 1] or blocks) -> Fp8Quantized.
  Layers in its `ignore` list (lm_head, routers) are plain float tensors and load as such.
- `awq` (AutoAWQ's GEMM packing, 4 bits, zero points): `X.qweight` int32 [K, N/8] holding columns
  8c + (0, 2, 4, 6, 1, 3, 5, 7) in nibbles 0..7 of word c (AutoAWQ's pack order, undone by vLLM's
  AWQ_REVERSE_ORDER), `X.qzeros` int32 [K/G, N/8] in the same order, `X.scales` fp16 [K/G, N];
  w = (q - z) * s.
- `gptq` (AutoGPTQ / GPTQModel, 4 bits): `X.qweight` int32 [K/8, N] holding inputs 8r .. 8r + 7 in
  nibbles 0..7 of row r, `X.qzeros` int32 [K/G, N/8] holding columns 8c .. 8c + 7 in nibbles 0..7,
  `X.scales` fp16 [K/G, N], `X.g_idx` int32 [K]; w = (q - z) * s, where the stored zero is z - 1 in the
  classic format (vLLM's and AutoGPTQ's dequantization add the 1 back) and z itself with
  `checkpoint_format: gptq_v2`. group_size -1 is one group over all K inputs. Act-order (desc_act)
  checkpoints load when g_idx is the plain k // G order, and are refused otherwise.
AWQ/GPTQ become GroupQuantized exactly: each G-group's (s, -z s) repeated over its G/32 32-groups,
computed in float32 from the fp16 s (q s and z s are exact there, so their sum is (q - z) s exactly).

Static activation scales (`input_scale`) are not read: forge quantizes activations dynamically.
KV-cache scales (`self_attn.k_scale` / `v_scale`, or compressed-tensors' older `k_proj.output_scale` /
`v_proj.output_scale`) are kept as float tensors named `model.layers.{i}.self_attn.k_scale` / `v_scale`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from forge.errors import ModelLoadError
from forge.quant.layouts import GROUP, Carrier, Fp8Quantized, GroupQuantized

SUPPORTED = ("fp8 (e4m3, block or per-tensor scales), compressed-tensors with 8-bit float weights (tensor, channel "
             "or block scales), awq (4-bit, gemm) and gptq (4-bit)")

_KV_SCALE = re.compile(r"(model\.layers\.\d+\.self_attn\.)(?:([kv])_proj\.output_scale|([kv])_scale)$")


def kv_scale_name(name: str) -> str | None:
    """forge's name of a checkpoint's KV-cache scale tensor (None: not one)."""
    m = _KV_SCALE.match(name)
    return f"{m[1]}{m[2] or m[3]}_scale" if m else None


Get = Callable[[str], torch.Tensor]  # reads a tensor of the checkpoint by name
Has = Callable[[str], bool]


class QuantizedCheckpoint:
    """How one quantization format's tensors make up the schema's weights."""

    method = ""
    companions: tuple[str, ...] = ()  # suffixes of tensors read together with their weight

    def target(self, name: str) -> str | None:
        """The HF weight name this checkpoint tensor stands for (None: a companion, read with its weight)."""
        return None if name.endswith(self.companions) else name

    def read(self, name: str, get: Get, has: Has):
        """The weight `name` (a float tensor, or a quantized matrix)."""
        return get(name)


class Fp8Checkpoint(QuantizedCheckpoint):
    companions = (".weight_scale_inv", ".weight_scale", ".input_scale", ".weight_zero_point", ".input_zero_point")

    def __init__(self, method: str, block: tuple[int, int] | None):
        self.method, self.block = method, block

    def read(self, name: str, get: Get, has: Has):
        w = get(name)
        if w.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return w  # a layer left in float (lm_head, the router, norms, embeddings)
        if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
            raise ModelLoadError(f"{name}: {w.dtype} {list(w.shape)} weights are not supported (float8_e4m3fn matrices)")
        base = name.removesuffix("weight")
        scale = next((get(base + s) for s in ("weight_scale_inv", "weight_scale") if has(base + s)), None)
        if scale is None:
            raise ModelLoadError(f"{name} is float8 but the checkpoint has no {base}weight_scale(_inv)")
        return fp8_matrix(name, w, scale, self.block)


def fp8_matrix(name: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> Fp8Quantized:
    """e4m3 codes [N, K] and a checkpoint's scale: per tensor ([] or [1]), per channel ([N, 1]) or per
    [bn, bk] block ([ceil(N/bn), ceil(K/bk)]) -> Fp8Quantized (block scales repeated over their rows)."""
    n, k = codes.shape
    s = scale.float()
    if s.numel() == 1:
        return Fp8Quantized(codes, s.reshape(1, 1).expand(n, 1).contiguous(), k)
    if tuple(s.shape) in ((n, 1), (n,)):
        return Fp8Quantized(codes, s.reshape(n, 1).contiguous(), k)
    if block is not None and tuple(s.shape) == (-(-n // block[0]), -(-k // block[1])):
        bn, bk = block
        if k % bk and s.shape[1] > 1:
            raise ModelLoadError(f"{name}: in_features {k} is not a multiple of the FP8 block width {bk}")
        return Fp8Quantized(codes, s.repeat_interleave(bn, 0)[:n].contiguous(), bk if k % bk == 0 else k)
    raise ModelLoadError(f"{name}: float8 weight {[n, k]} with a scale of shape {list(s.shape)} (expected a scalar, "
                         f"[{n}, 1]{f' or {block} blocks' if block else ''})")


class Int4Checkpoint(QuantizedCheckpoint):
    """AWQ (GEMM) and GPTQ: qweight / qzeros / scales (/ g_idx) per matrix."""

    companions = (".qzeros", ".scales", ".g_idx")

    def __init__(self, method: str, group: int, zero_offset: int = 0):
        self.method, self.group, self.zero_offset = method, group, zero_offset

    def target(self, name: str) -> str | None:
        if name.endswith(".qweight"):
            return name.removesuffix("qweight") + "weight"
        return super().target(name)

    def read(self, name: str, get: Get, has: Has):
        base = name.removesuffix("weight")
        if not has(base + "qweight"):
            return get(name)  # a layer left in float (modules_to_not_convert, lm_head)
        qweight, qzeros, scales = get(base + "qweight"), get(base + "qzeros"), get(base + "scales")
        if self.method == "awq":
            k, n = qweight.shape[0], qweight.shape[1] * 8
            codes = _unpack_columns(qweight, _AWQ_NIBBLE).t()
        else:
            k, n = qweight.shape[0] * 8, qweight.shape[1]
            codes = _unpack_rows(qweight).t()
        group = k if self.group == -1 else self.group
        _check_group(name, k, group)
        zeros = _unpack_columns(qzeros, _AWQ_NIBBLE if self.method == "awq" else _IN_ORDER)
        if tuple(scales.shape) != (k // group, n) or tuple(zeros.shape) != (k // group, n):
            raise ModelLoadError(f"{name}: scales {list(scales.shape)} / qzeros {list(qzeros.shape)} do not fit a "
                                 f"[{n}, {k}] weight in groups of {group}")
        if self.method == "gptq" and has(base + "g_idx"):
            g_idx = get(base + "g_idx")
            if not torch.equal(g_idx.long(), torch.arange(k) // group):
                raise ModelLoadError(f"{name}: GPTQ act-order (desc_act) with a permuted g_idx is not supported "
                                     f"(only g_idx = k // group_size)")
        return groups_of(codes, zeros.float() + self.zero_offset, scales, group)


_IN_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)  # GPTQ: value j of each 8 in nibble j
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ: column j of each 8 in nibble _AWQ_NIBBLE[j]


def _unpack_columns(packed: torch.Tensor, nibble: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C] of eight 4-bit values each -> uint8 [R, 8 C], value j of word c from nibble nibble[j]."""
    shifts = torch.tensor(nibble, dtype=torch.int32) * 4
    return ((packed[:, :, None] >> shifts) & 15).to(torch.uint8).reshape(packed.shape[0], -1)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C], each word holding rows 8r .. 8r + 7 in nibbles 0..7 -> uint8 [8 R, C]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 15).to(torch.uint8).reshape(-1, packed.shape[1])


def _check_group(name: str, k: int, group: int) -> None:
    if group <= 0 or k % group or group % GROUP:
        raise ModelLoadError(f"{name}: group_size {group} over {k} inputs is not supported (a multiple of {GROUP} "
                             f"that divides in_features)")


def groups_of(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> GroupQuantized:
    """4-bit codes [N, K] with per-G-group zeros and fp16 scales [K/G, N] (w = (q - z) s) ->
    GroupQuantized: scale s and offset -z s, each repeated over the G/32 32-groups of its group."""
    s = scales.float().t()
    offset = -(zeros.t() * s)
    r = group // GROUP
    return GroupQuantized(codes.contiguous(), s.repeat_interleave(r, 1).contiguous(),
                          offset.repeat_interleave(r, 1).contiguous(), bits=4)


def checkpoint_format(hf_config: dict) -> QuantizedCheckpoint | None:
    """The reader of config.json's quantization_config (None: a float checkpoint); anything else is a
    one-line ModelLoadError naming what is supported."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise _unsupported(f"fp8 fmt {fmt!r}")
        block = qc.get("weight_block_size")
        return Fp8Checkpoint(method, tuple(block) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise _unsupported(f"{method} with {bits} bits")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm" or not qc.get("zero_point", True):
                raise _unsupported(f"awq version {version!r}{'' if qc.get('zero_point', True) else ' without zero points'}")
            return Int4Checkpoint(method, group)
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2") or qc.get("is_marlin_format"):
            raise _unsupported(f"gptq checkpoint_format {'marlin' if qc.get('is_marlin_format') else fmt!r}")
        return Int4Checkpoint(method, group, zero_offset=0 if fmt == "gptq_v2" else 1)
    raise _unsupported(f"quant_method {method or None!r}")


def _compressed_tensors(qc: dict) -> Fp8Checkpoint:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _unsupported(f"compressed-tensors format {fmt!r}")
    block = None
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise _unsupported(f"compressed-tensors {name} weights of type {w.get('type')!r}, {w.get('num_bits')} bits")
        if w.get("strategy") == "block":
            block = tuple(w.get("block_structure") or (128, 128))
    return Fp8Checkpoint("compressed-tensors", block)


def _unsupported(what: str) -> ModelLoadError:
    return ModelLoadError(f"unsupported quantized checkpoint: {what} (forge reads {SUPPORTED})")


def float_weight(w) -> torch.Tensor:
    """A weight kept float by the schema (norms, biases, MoE routers and experts) from whatever the checkpoint held."""
    return w.dequantize() if isinstance(w, Carrier) else w
