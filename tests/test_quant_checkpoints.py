"""HF quantized checkpoints (forge.loader.quantized): FP8 (quant_method fp8, block and per-tensor;
compressed-tensors float8, channel), AWQ and GPTQ 4-bit, loaded into forge's quantized matrices.

compressed-tensors, AutoAWQ and AutoGPTQ/GPTQModel are not installed here, so the tests pack the
tensors by hand from random float weights, per the conventions those tools write and vLLM reads:
AWQ's pack order (0, 2, 4, 6, 1, 3, 5, 7) over columns (AutoAWQ `pack`, vLLM AWQ_REVERSE_ORDER), GPTQ's
8 inputs per int32 row and its zeros stored minus one (AutoGPTQ `pack`, vLLM's `zeros + 1`; gptq_v2
stores them as they are), FP8 block scales [ceil(N/128), ceil(K/128)] as weight_scale_inv (DeepSeek-V3).
Every loaded matrix must dequantize to exactly the weights packed; the models generate the same
greedy tokens as float checkpoints holding those dequantized weights; sharded loads cut codes and
scales like the float weights.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge import LLM, SamplingParams
from forge.errors import InvalidRequestError, ModelLoadError
from forge.loader import load_model
from forge.loader.quantized import fp8_matrix
from forge.loader.safetensors import save_hf_dir
from forge.quant.layouts import Fp8Quantized, GroupQuantized
from tests.util import random_weights, tiny_config

# Wide enough for 128-groups and 128-blocks on both TP=2 ranks: q_size 256 (o_proj's inputs: 128 a rank),
# kv_size 128, intermediate 512.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with those bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_columns(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """uint [R, C] 4-bit values -> int32 [R, C / 8]: nibble i of word c holds column 8c + order[i]."""
    q = q.long().view(q.shape[0], -1, 8)[:, :, list(order)]
    return _int32(sum(q[:, :, i] << (4 * i) for i in range(8)))


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> int32 [R / 8, C]: nibble i of word (r, c) holds row 8r + i."""
    q = q.long().view(-1, 8, q.shape[1])
    return _int32(sum(q[:, i] << (4 * i) for i in range(8)))


def int4_quantize(w: torch.Tensor, group: int, g: torch.Generator, sym: bool = False, min_zero: int = 0):
    """Random-ish 4-bit (q, z, s) for w [N, K] per `group` inputs: fp16 scales from each group's range,
    zeros in [min_zero, 15] (8 if sym). Returns codes [N, K], zeros and fp16 scales [K/G, N], and the
    exact dequantized weight (q - z) s in float32."""
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-3).half()
    if sym:
        z = torch.full_like(lo, 8)
    else:
        z = torch.round(-lo / s.float()).clamp(min_zero, 15)
    q = torch.round(wg / s.float()[..., None] + z[..., None]).clamp(0, 15)
    q = q.view(n, k).to(torch.uint8)
    deq = (q.view(n, k // group, group).float() - z[..., None]) * s.float()[..., None]
    return q, z.t().contiguous(), s.t().contiguous(), deq.view(n, k)


def fp8_quantize(w: torch.Tensor, block: int | None):
    """e4m3 codes and a float32 scale: per [block, block] block (the [ceil(N/b), ceil(K/b)] scale of a
    DeepSeek-style checkpoint) or, block None, one per tensor; with the exact dequantized weight."""
    n, k = w.shape
    if block is None:
        scale = (w.abs().amax() / 448).reshape(())
        full = scale.expand(n, k)
    else:
        nb, kb = -(-n // block), -(-k // block)
        padded = torch.zeros(nb * block, kb * block)
        padded[:n, :k] = w
        scale = padded.view(nb, block, kb, block).abs().amax((1, 3)) / 448
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, scale, codes.float() * full


def write_checkpoint(root: Path, name: str, tokenizer, fmt: str, family: str = "llama", seed: int = 0,
                     **shape) -> tuple[Path, Path, dict]:
    """A quantized HF directory `name` under root in format `fmt` and a float one (`name`-float) holding
    the weights it dequantizes to; returns both and {hf weight name: exact dequantized weight}."""
    config = tiny_config(vocab_size=tokenizer.vocab_size, family=family, **(SHAPE | shape))
    weights = random_weights(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tensors, exact, qc = {}, {}, {}
    for key, w in weights.items():
        base = key.removesuffix("weight")
        if not (key.endswith(".weight") and base.rstrip(".").endswith(PROJ)):
            tensors[key] = w
            continue
        if fmt in ("awq", "gptq", "gptq_v2", "gptq_sym"):
            group = 128
            q, z, s, deq = int4_quantize(w, group, g, sym=fmt == "gptq_sym", min_zero=1 if fmt == "gptq" else 0)
            if fmt == "awq":
                tensors |= {base + "qweight": pack_columns(q.t(), AWQ_ORDER), base + "qzeros": pack_columns(z, AWQ_ORDER)}
            else:
                stored = z - (0 if fmt == "gptq_v2" else 1)  # the classic format stores zero - 1
                tensors |= {base + "qweight": pack_rows(q.t()), base + "qzeros": pack_columns(stored),
                            base + "g_idx": (torch.arange(w.shape[1]) // group).int()}
            tensors[base + "scales"] = s
        else:
            block = 128 if fmt == "fp8-block" else None
            codes, scale, deq = fp8_quantize(w, block)
            tensors[base + "weight"] = codes
            if fmt == "fp8-block":
                tensors[base + "weight_scale_inv"] = scale
            elif fmt == "ct-channel":  # compressed-tensors: a bfloat16 scale per output channel
                scale = (w.abs().amax(1, keepdim=True) / 448).bfloat16()
                tensors[base + "weight"] = codes = (w / scale.float()).to(torch.float8_e4m3fn)
                tensors[base + "weight_scale"], deq = scale, codes.float() * scale.float()
            else:
                tensors[base + "weight_scale"] = scale
            tensors[base + "input_scale"] = torch.tensor([0.5])  # static activation scales: ignored
        exact[key] = deq
    for layer in range(config.num_layers):  # FP8 KV-cache scales, passed through
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.25 + layer)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.5 + layer)
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    elif fmt.startswith("gptq"):
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": fmt == "gptq_sym"}
        if fmt == "gptq_v2":
            qc["checkpoint_format"] = "gptq_v2"
    elif fmt == "fp8-block":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    elif fmt == "fp8-tensor":
        qc = {"quant_method": "fp8", "activation_scheme": "static"}
    else:
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    quantized, reference = root / name, root / f"{name}-float"
    save_hf_dir(reference, config, weights | exact, tokenizer)
    save_hf_dir(quantized, config, weights, tokenizer)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(quantized / "model.safetensors"),
              metadata={"format": "pt"})
    set_quantization_config(quantized, qc)
    return quantized, reference, exact


def set_quantization_config(path: Path, qc: dict) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))


FORMATS = ("awq", "gptq", "gptq_v2", "gptq_sym", "fp8-block", "fp8-tensor", "ct-channel")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_loaded):
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: write_checkpoint(root, fmt, default_loaded.tokenizer, fmt, family="qwen2" if fmt == "gptq" else "llama")
            for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_matrices_dequantize_to_the_packed_weights(checkpoints, fmt):
    path, _, exact = checkpoints[fmt]
    loaded = load_model(path)
    kind = GroupQuantized if fmt.startswith(("awq", "gptq")) else Fp8Quantized
    assert loaded.quantization == {"awq": "awq", "gpt": "gptq", "fp8": "fp8", "ct-": "compressed-tensors"}[fmt[:3]]
    for name, deq in exact.items():
        w = loaded.weights[name]
        assert isinstance(w, kind), name
        assert torch.equal(w.dequantize(), deq), name
        if kind is GroupQuantized:
            assert w.bits == 4 and w.codes.dtype == torch.uint8 and w.scale.shape == (w.shape[0], w.shape[1] // 32)
    if fmt == "fp8-block":
        w = loaded.weights["model.layers.0.mlp.down_proj.weight"]
        assert w.group == 128 and w.scale.shape == (256, 512 // 128)
    elif kind is Fp8Quantized:
        assert all(loaded.weights[name].group == loaded.weights[name].shape[1] for name in exact)
    # the rest stays float; KV-cache scales pass through under forge's names
    assert loaded.weights["lm_head.weight"].dtype == torch.float32
    assert loaded.weights["model.layers.1.self_attn.k_scale"].item() == 1.25
    assert loaded.weights["model.layers.0.self_attn.v_scale"].item() == 0.5
    if fmt == "gptq":  # (qwen2: q/k/v biases, float)
        assert loaded.weights["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8-block", "ct-channel"])
def test_generation_matches_the_dequantized_float_model(checkpoints, fmt):
    """AWQ/GPTQ run on the CPU's int kernels (their activations quantized per 32 inputs), FP8 dequantized:
    the same greedy tokens as the float model of the exact dequantized weights."""
    path, reference, _ = checkpoints[fmt]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(100 + 37 * i, 130 + 37 * i))} for i in range(3)]

    def tokens(p):
        outs = LLM(str(p), num_kv_blocks=32, max_model_len=128).generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    assert tokens(path) == tokens(reference)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8-block", "fp8-tensor", "ct-channel"])
def test_sharded_load_cuts_codes_and_scales(checkpoints, fmt):
    """load_model(shard=(r, 2)): q/k/v and gate/up cut by rows, o_proj and down_proj by inputs (on
    group / block boundaries); the ranks' pieces put back together are the full load's."""
    path, _, _ = checkpoints[fmt]
    full = load_model(path).weights
    ranks = [load_model(path, shard=(r, 2)).weights for r in range(2)]
    p = "model.layers.1."
    for name, dim in [("self_attn.q_proj.weight", 0), ("self_attn.k_proj.weight", 0), ("self_attn.o_proj.weight", 1),
                      ("mlp.gate_proj.weight", 0), ("mlp.down_proj.weight", 1)]:
        parts = [r[p + name] for r in ranks]
        assert all(type(x) is type(full[p + name]) for x in parts)
        assert torch.equal(torch.cat([x.dequantize() for x in parts], dim), full[p + name].dequantize()), name
        n, k = full[p + name].shape
        assert parts[0].shape == ((n // 2, k) if dim == 0 else (n, k // 2))
        if dim == 1 and isinstance(full[p + name], GroupQuantized):
            assert torch.equal(parts[1].scale, full[p + name].scale[:, k // 64:])
        if dim == 1 and fmt == "fp8-block":  # one block of 128 inputs per rank's o_proj
            assert parts[1].group == 128 and torch.equal(parts[1].scale, full[p + name].scale[:, k // 256:])
        if dim == 1 and fmt in ("fp8-tensor", "ct-channel"):  # one scale per row: unchanged by the cut
            assert parts[1].group == k // 2 and torch.equal(parts[1].scale, full[p + name].scale)
    assert ranks[1][p + "self_attn.k_scale"].item() == full[p + "self_attn.k_scale"].item()


def test_tp2_generation_equals_tp1(checkpoints):
    """Through LLM(tensor_parallel_size=2): the AWQ model's shards on two ranks over gloo."""
    path, _, _ = checkpoints["awq"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(200, 230))}]

    def tokens(**kw):
        llm = LLM(str(path), num_kv_blocks=32, max_model_len=128, **kw)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.llm_engine.shutdown()

    assert tokens(tensor_parallel_size=2) == tokens()


def test_fp8_block_scales_of_uneven_shapes():
    """N and K not multiples of the block: each row gets its block's scale; K within one block is one
    scale per row; K over several blocks but not a multiple of one is refused."""
    w = torch.randn(200, 256)
    codes, scale, deq = fp8_quantize(w, 128)
    m = fp8_matrix("w", codes, scale, (128, 128))
    assert scale.shape == (2, 2) and m.group == 128 and torch.equal(m.dequantize(), deq)
    codes, scale, deq = fp8_quantize(torch.randn(300, 96), 128)
    m = fp8_matrix("w", codes, scale, (128, 128))
    assert m.group == 96 and m.scale.shape == (300, 1) and torch.equal(m.dequantize(), deq)
    codes, scale, _ = fp8_quantize(torch.randn(64, 192), 128)
    with pytest.raises(ModelLoadError, match="not a multiple of the FP8 block width 128"):
        fp8_matrix("w", codes, scale, (128, 128))


def test_unaligned_row_parallel_cut_is_a_one_line_error(tmp_path, default_loaded):
    """FP8 blocks of 128 inputs, o_proj of 384 inputs cut in two: 192 a rank, inside the second block."""
    path, _, _ = write_checkpoint(tmp_path, "narrow", default_loaded.tokenizer, "fp8-block", num_heads=6,
                                  num_layers=1)
    with pytest.raises(InvalidRequestError) as e:
        load_model(path, shard=(0, 2))
    assert "tensor_parallel_size 2" in str(e.value) and "o_proj.weight [256, 384]" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"bits": 8}, "awq with 8 bits"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ({"version": "gemv"}, "awq version 'gemv'"),
    ({"group_size": 48}, "group_size 48"),
])
def test_unsupported_configs_are_one_line_errors(checkpoints, tmp_path, change, message):
    path = _copy(checkpoints["awq"][0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    set_quantization_config(path, cfg | change)
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(path)
    assert "\n" not in str(e.value) and ("forge reads" in str(e.value) or "group_size" in message)


def test_gptq_act_order_needs_the_plain_group_order(checkpoints, tmp_path):
    """desc_act with g_idx = k // G loads (the same weights); a permuted g_idx is refused."""
    path = _copy(checkpoints["gptq"][0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    set_quantization_config(path, cfg | {"desc_act": True})
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(load_model(path).weights[name].dequantize(), checkpoints["gptq"][2][name])
    tensors = load_file(path / "model.safetensors")
    g_idx = tensors["model.layers.0.mlp.up_proj.g_idx"]
    tensors["model.layers.0.mlp.up_proj.g_idx"] = g_idx[torch.randperm(len(g_idx), generator=torch.Generator().manual_seed(0))]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="act-order .* permuted g_idx") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst / src.name))


def test_moe_checkpoint_experts_and_router_load_as_float(tmp_path, default_loaded):
    """A Qwen3-MoE FP8 checkpoint (one tensor per expert): attention matrices stay Fp8Quantized, each
    expert is dequantized into the stacked float experts and the router to float (the schema keeps both float)."""
    config = tiny_config(vocab_size=default_loaded.tokenizer.vocab_size, family="qwen3_moe", num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32)
    save_hf_dir(tmp_path, config, random_weights(config), default_loaded.tokenizer)
    tensors, exact = load_file(tmp_path / "model.safetensors"), {}
    for key in [k for k in tensors if k.endswith(("_proj.weight", "mlp.gate.weight"))]:
        codes, scale, exact[key] = fp8_quantize(tensors[key], None)
        tensors |= {key: codes, key.removesuffix("weight") + "weight_scale": scale}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    set_quantization_config(tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    weights = load_model(tmp_path).weights
    assert torch.equal(weights["model.layers.1.self_attn.o_proj.weight"].dequantize(),
                       exact["model.layers.1.self_attn.o_proj.weight"])
    up = weights["model.layers.0.mlp.experts.up_proj.weight"]
    assert up.dtype == torch.float32 and up.shape == (4, 32, config.hidden_size)
    assert torch.equal(up[2], exact["model.layers.0.mlp.experts.2.up_proj.weight"])
    assert torch.equal(weights["model.layers.1.mlp.gate.weight"], exact["model.layers.1.mlp.gate.weight"])
