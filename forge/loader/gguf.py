"""GGUF loading: metadata -> ModelConfig (the header read by forge.loader.gguf_header), tensors decoded by
the `gguf` package (float32) or kept in blocks (forge.quant), the tokenizer built alongside them."""

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from forge.config import ModelConfig, RopeScaling
from forge.distributed.sharding import tensor_sharder
from forge.errors import ModelLoadError, UnsupportedModelError
from forge.loader.gguf_header import GGUFHeader
from forge.loader.progress import load_progress
from forge.models.families import family_for_gguf, family_of, window_layer_types
from forge.models.schema import hf_name_of_gguf, missing_weights, spec_of
from forge.quant.gguf import EXACT_TYPES, REQUANTIZED_TYPES, decode_blocks
from forge.quant.layouts import GROUP, GroupQuantized

SUPPORTED_TYPES = {
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
}

def read_metadata(reader: GGUFReader) -> dict:
    """All key/value metadata as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


# llama.cpp's attention scale for Gemma 2/3 GGUFs without {arch}.attention.scale: 1/sqrt(hidden / heads) for
# the 27B models (told apart by their layer count), 1/sqrt(head_dim) otherwise.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def config_from_metadata(meta: dict, tensors: dict | None = None) -> ModelConfig:
    """tensors: name -> float32 tensor of the small ones read with the metadata (LongRoPE's factors)."""
    arch = meta.get("general.architecture")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    num_experts = get("expert_count", 0) or 0
    family = family_for_gguf(arch, num_experts)

    for key in ("attention.head_count", "embedding_length", "feed_forward_length", "block_count"):
        if not isinstance(get(key), int) or get(key) < 1:
            raise ModelLoadError(f"GGUF metadata lacks a positive integer {arch}.{key} (got {get(key)!r})")
    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    num_layers = get("block_count")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    window = get("attention.sliding_window") or None
    layer_types = None
    if window is not None:
        pattern = get("attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == num_layers:  # one bool per layer: windowed or not
            layer_types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
        else:
            layer_types = window_layer_types(family, num_layers, pattern if isinstance(pattern, int) else None)
    query_pre_attn_scalar = None
    if get("attention.scale"):
        query_pre_attn_scalar = float(get("attention.scale")) ** -2
    elif arch in _GEMMA_27B_LAYERS and num_layers == _GEMMA_27B_LAYERS[arch]:
        query_pre_attn_scalar = hidden / num_heads
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", family.rope_theta)),
        rope_scaling=_rope_scaling(get, tensors or {}),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=meta.get("general.name", arch),
        family=family.name,
        sliding_window=window,
        layer_types=layer_types,
        # (llama.cpp's Gemma 3 local layers use base 10000 unless the file says otherwise)
        rope_local_theta=float(get("rope.freq_base_swa", 10000.0)) if family.name == "gemma3" else None,
        query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcap=get("attn_logit_softcapping") or None,
        final_logit_softcap=get("final_logit_softcapping") or None,
        # (llama.cpp renormalizes the picked experts' weights unless {arch}.expert_weights_norm says not)
        num_experts=num_experts,
        num_experts_per_tok=get("expert_used_count", 0) if num_experts else 0,
        moe_intermediate_size=(get("expert_feed_forward_length") or get("feed_forward_length")) if num_experts else 0,
        norm_topk_prob=bool(get("expert_weights_norm", True)) if num_experts else False,
    )


def _rope_scaling(get, tensors: dict) -> RopeScaling | None:
    """Linear scaling from {arch}.rope.scaling.*, LongRoPE from the rope_factors_{short,long} tensors (Phi-3)."""
    if "rope_factors_long.weight" in tensors:
        original = get("rope.scaling.original_context_length") or get("context_length")
        factor = get("context_length", original) / original
        attn_factor = get("rope.scaling.attn_factor")
        if attn_factor is None:
            attn_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling(factor=factor, original_max_position_embeddings=original, rope_type="longrope",
                           short_factor=tuple(tensors["rope_factors_short.weight"].tolist()),
                           long_factor=tuple(tensors["rope_factors_long.weight"].tolist()),
                           attention_factor=float(attn_factor))
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(get("rope.scaling.factor")), rope_type="linear")
    raise UnsupportedModelError(f"unsupported GGUF rope scaling {kind!r} (forge reads linear and LongRoPE)")


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


def load_gguf(path: Path, shard: tuple[int, int] | None = None, keep_quantized: bool = False):
    """keep_quantized: matrices in a block format with a kernel layout (forge.quant.gguf) come back as
    GroupQuantized codes instead of float32 (True: every such format; a set of GGML types: those;
    forge.quant.keeps_gguf_quantized decides)."""
    from forge.loader import LoadedModel
    from forge.tokenizer import Tokenizer

    header = GGUFHeader(path)  # metadata and tensor table, checked against the file's size
    meta = header.metadata
    rope_factors = {t.name: torch.from_numpy(dequantize_tensor(t)) for t in header.tensors
                    if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    config = config_from_metadata(meta, rope_factors)
    with ThreadPoolExecutor(1) as background:
        # The tokenizer is built while the tensors are decoded (the Rust tokenizer and torch release the GIL).
        tokenizer = background.submit(Tokenizer.from_gguf_metadata, meta)
        weights = _load_tensors(header, config, path, shard, keep_quantized)
        tokenizer = tokenizer.result()
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    _check_complete(weights, config, path)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, path=path, shard=shard)


def _load_tensors(header: GGUFHeader, config: ModelConfig, path: Path, shard: tuple[int, int] | None,
                  keep_quantized: bool) -> dict[str, torch.Tensor]:
    cut = tensor_sharder(config, shard)
    weights: dict[str, torch.Tensor] = {}
    schema = family_of(config).schema
    tensors = [(hf_name_of_gguf(t.name, schema), t) for t in header.tensors]
    tensors = [(name, t) for name, t in tensors if name is not None]
    # Decoding is many small memory-bound torch ops: on one thread the default model's take 0.19 s,
    # on two 3.9 s when the 2 cores are busy (each op waits for the second thread to be scheduled).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with load_progress(len(tensors), path) as bar:
            for name, tensor in tensors:
                weights[name] = cut(name, _load_tensor(tensor, name, config, path, keep_quantized))
                bar.update()
    finally:
        torch.set_num_threads(threads)
    return weights


def _load_tensor(tensor, name: str, config: ModelConfig, path: Path, keep_quantized: bool):
    try:
        if keep_quantized and _has_block_layout(tensor) and (keep_quantized is True or
                                                             Q(tensor.tensor_type) in keep_quantized):
            t = decode_blocks(Q(tensor.tensor_type), tensor.data, _shape(tensor))
        else:
            t = torch.from_numpy(dequantize_tensor(tensor))
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {tensor.name!r} of {path}: {e}".split("\n")[0]) from None
    family = family_of(config)
    if family.gguf_permute_qk and name.endswith("q_proj.weight"):
        return unpermute_qk(t, config.num_heads)
    if family.gguf_permute_qk and name.endswith("k_proj.weight"):
        return unpermute_qk(t, config.num_kv_heads)
    if family.norm_offset and spec_of(name, family.schema).kind == "norm":
        return t - family.norm_offset  # llama.cpp stores Gemma's norms as 1 + w; the model adds the 1 back
    return t


def _check_complete(weights: dict, config: ModelConfig, path) -> None:
    missing = missing_weights(weights, config)
    if missing:
        raise ModelLoadError(f"{path} is missing {len(missing)} tensors (first: {missing[0]})")
