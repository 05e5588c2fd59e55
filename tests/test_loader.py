"""Loading: GGUF dequantization per type, GGUF <-> HF directory round trip, and bad model files."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from forge import LLM
from forge.errors import ModelLoadError, UnsupportedModelError
from forge.loader import load_model
from forge.loader.gguf import SUPPORTED_TYPES, unpermute_qk
from forge.loader.safetensors import save_hf_dir
from tests.util import forward_logits, random_weights, tiny_config, write_tiny_gguf

ROWS, COLS = 8, 512


def _synthetic_block_bytes(qtype: Q, rng) -> np.ndarray:
    """Random blocks for types gguf cannot quantize (K-quants), with sane float16 scale fields."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, COLS // block_elems, block_bytes), dtype=np.uint8)
    scale = lambda n: np.frombuffer(rng.uniform(0.001, 0.05, n).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)
    n = ROWS * COLS // block_elems
    flat = raw.reshape(n, block_bytes)
    if qtype == Q.Q6_K:  # ... d (f16) is the last 2 bytes
        flat[:, -2:] = scale(n)
    elif qtype in (Q.Q2_K,):  # ... d, dmin at the end
        flat[:, -4:-2], flat[:, -2:] = scale(n), scale(n)
    elif qtype == Q.Q3_K:
        flat[:, -2:] = scale(n)
    else:  # Q4_K, Q5_K: d, dmin first
        flat[:, 0:2], flat[:, 2:4] = scale(n), scale(n)
    return raw.reshape(ROWS, -1)


def _write_gguf(path, tensors: dict, arch: str = "llama", extra_meta: dict | None = None):
    w = GGUFWriter(str(path), arch)
    for k, v in (extra_meta or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32,):
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda q: q.name), ids=lambda q: q.name)
def test_dequantize_each_type_matches_gguf_reference(tmp_path, qtype):
    from gguf import GGUFReader

    from forge.loader.gguf import dequantize_tensor

    rng = np.random.default_rng(int(qtype))
    original = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    try:
        data = original if qtype == Q.F32 else quantize(original, qtype)
        exact_reference = True
    except NotImplementedError:
        data = _synthetic_block_bytes(qtype, rng)
        exact_reference = False
    _write_gguf(tmp_path / "t.gguf", {"t": (data, qtype)})
    tensor = GGUFReader(tmp_path / "t.gguf").tensors[0]
    ours = dequantize_tensor(tensor)
    assert ours.shape == (ROWS, COLS) and ours.dtype == np.float32
    ref = dequantize(data, qtype) if qtype != Q.F32 else original
    np.testing.assert_array_equal(ours, np.asarray(ref, np.float32).reshape(ROWS, COLS))
    assert np.isfinite(ours).all()
    if exact_reference:  # and the values are the original ones within the format's precision
        err = np.abs(ours - original).max() / np.abs(original).max()
        assert err < {Q.F32: 1e-7, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2}.get(qtype, 0.15)


def test_unsupported_quantization_is_named(tmp_path):
    from gguf import GGUFReader

    from forge.loader.gguf import dequantize_tensor

    raw = np.zeros((ROWS, COLS // 256 * 66), dtype=np.uint8)  # IQ2_XXS blocks are 66 bytes / 256 values
    _write_gguf(tmp_path / "iq.gguf", {"t": (raw, Q.IQ2_XXS)})
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        dequantize_tensor(GGUFReader(tmp_path / "iq.gguf").tensors[0])


def test_unsupported_architecture_is_named(tmp_path):
    _write_gguf(tmp_path / "m.gguf", {"t": (np.ones((4, 4), np.float32), Q.F32)}, arch="mamba")
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_model(tmp_path / "m.gguf")


def test_missing_and_truncated_files(tmp_path, default_model_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.gguf")
    truncated = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(truncated)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(empty_dir)


def test_unpermute_inverts_llama_cpp_permutation():
    def permute(w, n_head):  # what llama.cpp's converter does to HF q/k weights
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_qk(permute(w, 4), 4), w)
    assert not torch.equal(permute(w, 4), w)


def test_gguf_and_hf_dir_give_identical_logits(tmp_path, default_loaded):
    """The dequantized default model written as an HF directory loads back to identical logits."""
    hf_dir = tmp_path / "smollm2-hf"
    save_hf_dir(hf_dir, default_loaded.config, default_loaded.weights, default_loaded.tokenizer)
    from_gguf = LLM(str(default_loaded.path), num_kv_blocks=16, quantization="none")  # (auto keeps Q4_1 blocks)
    from_hf = LLM(str(hf_dir), num_kv_blocks=16)
    ids = default_loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert from_hf.get_tokenizer().encode("The quick brown fox jumps over the lazy dog.") == ids
    a = forward_logits(from_gguf.llm_engine.runner, ids)
    b = forward_logits(from_hf.llm_engine.runner, ids)
    assert torch.equal(a, b)


def test_tiny_gguf_with_permuted_qk_matches_hf(tmp_path, default_loaded):
    """A GGUF written the llama.cpp way (permuted Q/K) equals its HF twin."""
    tok = default_loaded.tokenizer
    config = tiny_config(vocab_size=tok.vocab_size)
    weights = random_weights(config, seed=3)
    save_hf_dir(tmp_path / "hf", config, weights, tok)
    write_tiny_gguf(tmp_path / "tiny.gguf", config, weights, default_loaded.path)

    a = LLM(str(tmp_path / "tiny.gguf"), num_kv_blocks=16)
    b = LLM(str(tmp_path / "hf"), num_kv_blocks=16)
    ids = tok.encode("Hello there, tiny model")
    assert torch.equal(forward_logits(a.llm_engine.runner, ids), forward_logits(b.llm_engine.runner, ids))


def test_sharded_load_equals_slicing_the_full_load(default_model_path, default_loaded, tmp_path):
    """load_model(shard=(rank, n)) cuts each tensor as it is read: the same slices as sharding the
    full checkpoint afterwards, from GGUF and from an HF directory. A model that does not split is
    a request error, raised before any tensor is read."""
    from forge.distributed.sharding import plan_shard, shard_weights
    from forge.errors import InvalidRequestError
    from forge.loader.safetensors import save_hf_dir

    config = default_loaded.config  # 9 heads, 3 KV heads, 1536 intermediate, 49152 vocab: splits in 3
    hf_dir = tmp_path / "hf"
    save_hf_dir(hf_dir, config, default_loaded.weights, default_loaded.tokenizer)
    for src, ranks in ((hf_dir, range(3)), (default_model_path, [1])):
        for rank in ranks:
            sharded = load_model(src, shard=(rank, 3))
            assert sharded.shard == (rank, 3)
            expected = shard_weights(default_loaded.weights, config, plan_shard(config, rank, 3))
            assert sharded.weights.keys() == expected.keys()
            for name, t in expected.items():
                assert torch.equal(sharded.weights[name], t), name
    with pytest.raises(InvalidRequestError, match="attention heads"):  # 9 heads do not split in 2
        load_model(hf_dir, shard=(0, 2))
