"""GGUF loading with the `gguf` package: metadata -> ModelConfig, tensors dequantized to float32."""

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize

from forge.config import ModelConfig
from forge.distributed.sharding import tensor_sharder
from forge.errors import ModelLoadError, UnsupportedModelError
from forge.quant.gguf import EXACT_TYPES, REQUANTIZED_TYPES, decode_blocks
from forge.quant.layouts import GROUP, GroupQuantized

SUPPORTED_TYPES = {
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
}
SUPPORTED_ARCHS = {"llama"}

# llama.cpp tensor names -> HF names ("blk.N." prefix becomes "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return None


def read_metadata(reader: GGUFReader) -> dict:
    """All key/value metadata as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def config_from_metadata(meta: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r} (forge runs: {', '.join(sorted(SUPPORTED_ARCHS))})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    for key in ("attention.head_count", "embedding_length", "feed_forward_length", "block_count"):
        if not isinstance(get(key), int) or get(key) < 1:
            raise ModelLoadError(f"GGUF metadata lacks a positive integer {arch}.{key} (got {get(key)!r})")
    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=meta.get("general.name", arch),
    )


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs) back to HF's half-split layout."""
    if isinstance(weight, GroupQuantized):  # a row permutation: the same for codes, scales and offsets
        return GroupQuantized(unpermute_qk(weight.codes, num_heads), unpermute_qk(weight.scale, num_heads),
                              unpermute_qk(weight.offset, num_heads), weight.bits)
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the fastest dim first


def _has_block_layout(tensor) -> bool:
    qtype = Q(tensor.tensor_type)
    return (qtype in EXACT_TYPES or qtype in REQUANTIZED_TYPES) and len(tensor.shape) == 2 and \
        _shape(tensor)[1] % GROUP == 0


def dequantize_tensor(tensor) -> np.ndarray:
    qtype = Q(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"tensor {tensor.name!r} uses unsupported GGUF quantization {qtype.name}")
    shape = _shape(tensor)
    array = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32).reshape(shape)
    # F32 tensors come back as read-only views of the memory-mapped file: copy them out.
    return array if array.flags.writeable else array.copy()


def check_not_truncated(path, file_size: int, data_offset: int, table: list[tuple[str, int, list[int], int]]) -> None:
    """Compare the file's size with the end of its last tensor, from the tensor table
    [(name, ggml type, dims, offset from data_offset)], before any tensor is read."""
    expected = data_offset
    for name, ggml_type, dims, offset in table:
        try:
            block_size, type_size = GGML_QUANT_SIZES[Q(ggml_type)]
        except (ValueError, KeyError):
            raise UnsupportedModelError(f"tensor {name!r} of {path} has unknown GGML type {ggml_type}") from None
        expected = max(expected, data_offset + offset + math.prod(dims) * type_size // block_size)
    if file_size < expected:
        raise ModelLoadError(f"{path} is truncated: expected {expected} bytes, found {file_size}")


class _TableCheckedReader(GGUFReader):
    """GGUFReader that checks the file against its tensor table before it maps any tensor (the
    reader itself fails on a short file with a numpy reshape error)."""

    def __init__(self, path):
        self.path = path
        super().__init__(path)

    def _build_tensors(self, start_offs, fields) -> None:
        table = []
        for field in fields:  # parts: name length, name, n_dims, dims, type, offset
            _, name, _, dims, ggml_type, offset = field.parts
            table.append((bytes(name).decode("utf-8", "replace"), int(ggml_type[0]), [int(d) for d in dims],
                          int(offset[0])))
        check_not_truncated(self.path, len(self.data), int(start_offs), table)
        super()._build_tensors(start_offs, fields)


def load_gguf(path: Path, shard: tuple[int, int] | None = None, keep_quantized: bool = False):
    """keep_quantized: matrices in a block format with a CPU kernel layout (forge.quant.gguf) come
    back as GroupQuantized codes instead of float32 (quantization="auto" on the CPU)."""
    from forge.loader import LoadedModel
    from forge.tokenizer import Tokenizer

    try:
        reader = _TableCheckedReader(path)
    except (ModelLoadError, UnsupportedModelError):
        raise
    except Exception as e:  # the gguf package raises ValueError/IndexError/... on a bad file
        # (the metadata and tensor table are parsed: a short file fails here before the size check)
        raise ModelLoadError(f"cannot read GGUF file {path}: truncated or corrupt header "
                             f"({type(e).__name__}: {e})".split("\n")[0]) from None
    meta = read_metadata(reader)
    config = config_from_metadata(meta)
    cut = tensor_sharder(config, shard)
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        try:
            if keep_quantized and _has_block_layout(tensor):
                t = decode_blocks(Q(tensor.tensor_type), tensor.data, _shape(tensor))
            else:
                t = torch.from_numpy(dequantize_tensor(tensor))
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {tensor.name!r} of {path}: {e}".split("\n")[0]) from None
        if name.endswith("q_proj.weight"):
            t = unpermute_qk(t, config.num_heads)
        elif name.endswith("k_proj.weight"):
            t = unpermute_qk(t, config.num_kv_heads)
        weights[name] = cut(name, t)
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    _check_complete(weights, config, path)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, path=path, shard=shard)


def _check_complete(weights: dict, config: ModelConfig, path) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        required += [f"model.layers.{i}.{n}" for n in _LAYER_NAMES.values()]
    missing = [n for n in required if n not in weights]
    if missing:
        raise ModelLoadError(f"{path} is missing {len(missing)} tensors (first: {missing[0]})")
