"""GGUF loading: metadata -> ModelConfig (the header read by forge.loader.gguf_header), tensors decoded by
the `gguf` package (float32) or kept in blocks (forge.quant), the tokenizer built alongside them."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from forge.config import ModelConfig
from forge.distributed.sharding import tensor_sharder
from forge.errors import ModelLoadError, UnsupportedModelError
from forge.loader.gguf_header import GGUFHeader
from forge.loader.progress import load_progress
from forge.models.schema import hf_name_of_gguf, missing_weights
from forge.quant.gguf import EXACT_TYPES, REQUANTIZED_TYPES, decode_blocks
from forge.quant.layouts import GROUP, GroupQuantized

SUPPORTED_TYPES = {
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
}
SUPPORTED_ARCHS = {"llama"}

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


def load_gguf(path: Path, shard: tuple[int, int] | None = None, keep_quantized: bool = False):
    """keep_quantized: matrices in a block format with a CPU kernel layout (forge.quant.gguf) come
    back as GroupQuantized codes instead of float32 (quantization="auto" on the CPU)."""
    from forge.loader import LoadedModel
    from forge.tokenizer import Tokenizer

    header = GGUFHeader(path)  # metadata and tensor table, checked against the file's size
    meta = header.metadata
    config = config_from_metadata(meta)
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
    tensors = [(hf_name_of_gguf(t.name), t) for t in header.tensors if hf_name_of_gguf(t.name) is not None]
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
        if keep_quantized and _has_block_layout(tensor):
            t = decode_blocks(Q(tensor.tensor_type), tensor.data, _shape(tensor))
        else:
            t = torch.from_numpy(dequantize_tensor(tensor))
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {tensor.name!r} of {path}: {e}".split("\n")[0]) from None
    if name.endswith("q_proj.weight"):
        return unpermute_qk(t, config.num_heads)
    if name.endswith("k_proj.weight"):
        return unpermute_qk(t, config.num_kv_heads)
    return t


def _check_complete(weights: dict, config: ModelConfig, path) -> None:
    missing = missing_weights(weights, config)
    if missing:
        raise ModelLoadError(f"{path} is missing {len(missing)} tensors (first: {missing[0]})")
