"""A model family's weights, written once: HF and GGUF names, shapes, how they fuse into the model's
matrices and how they split over tensor-parallel ranks. The loaders, the dummy load format, TP
sharding and the tests all read it; the quant layer (forge.quant) decides how a matrix is stored.

Shard rules (Megatron-style):
* "column": rows (output features) split; `split` says in what units: query heads, KV heads (or
  the one KV head a rank's query heads use when there are fewer KV heads than ranks), MLP width, or
  expert width (every rank holds every expert, cut along its width);
* "row": columns (input features) split the same way, one all-reduce after the matmul;
* "vocab": rows split by vocabulary, padded with zero rows to a multiple of the world size;
* "replicated": every rank holds all of it (norms, rope_freqs).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from forge.config import ModelConfig

SHARD_RULES = ("column", "row", "vocab", "replicated")


@dataclass(frozen=True)
class WeightSpec:
    hf_name: str  # with "{layer}" for per-layer tensors
    gguf_name: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    shard: str  # one of SHARD_RULES
    # "heads" | "kv_heads" | "intermediate" | "experts" (each expert's width): the units a column/row shard
    # is cut in; "qkv" / "gate_up": a checkpoint's fused matrix, cut part by part (q by heads, k and v by KV
    # heads; gate and up by width)
    split: str | None = None
    # the model attribute it becomes; specs sharing one are stacked along dim 0 (fusion), or for
    # "experts" along dim 1 (each expert's gate rows, then its up rows)
    model_field: str = ""
    # how it is stored and initialised: "matrix" | "embedding" | "norm" | "bias" | "router" (an MoE
    # router, kept float) | "experts" (one [E, out, in] tensor for all experts, kept float; checkpoints
    # hold one tensor per expert, named with the expert's index after "experts.": see ExpertStacker)
    kind: str = "matrix"
    required: bool = True  # lm_head is absent when tied, rope_freqs is only in some GGUFs

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf(self, layer: int | None = None) -> str:
        return self.hf_name.format(layer=layer)

    def gguf(self, layer: int | None = None) -> str:
        return self.gguf_name.format(layer=layer)


def _hidden(c):
    return (c.hidden_size,)


def _head(c):
    return (c.head_dim,)


def _layer(hf: str, gguf: str, shape, shard: str, split: str | None = None, **kw) -> WeightSpec:
    """A per-layer tensor: HF name under model.layers.{layer}., GGUF name under blk.{layer}."""
    return WeightSpec(f"model.layers.{{layer}}.{hf}", f"blk.{{layer}}.{gguf}", shape, shard, split, **kw)


# Model attributes (LayerWeights fields): input_norm (before attention), mlp_norm (before the MLP),
# attn_out_norm / mlp_out_norm (after them: Gemma's sandwich norms), q_norm / k_norm (per head).
TOP = (
    WeightSpec("model.embed_tokens.weight", "token_embd.weight", lambda c: (c.vocab_size, c.hidden_size),
               "vocab", model_field="embed_tokens", kind="embedding"),
    WeightSpec("model.norm.weight", "output_norm.weight", _hidden, "replicated", model_field="norm", kind="norm"),
)
LM_HEAD = WeightSpec("lm_head.weight", "output.weight", lambda c: (c.vocab_size, c.hidden_size), "vocab",
                     model_field="lm_head", kind="embedding", required=False)  # (absent: tied to the embeddings)
ROPE_FREQS = WeightSpec("rope_freqs.weight", "rope_freqs.weight", lambda c: (c.head_dim // 2,), "replicated",
                        model_field="rope_freqs", kind="norm", required=False)  # (some Llama-3 GGUFs: RoPE divisors)
INPUT_NORM = _layer("input_layernorm.weight", "attn_norm.weight", _hidden, "replicated", model_field="input_norm",
                    kind="norm")
MLP_NORM = _layer("post_attention_layernorm.weight", "ffn_norm.weight", _hidden, "replicated", model_field="mlp_norm",
                  kind="norm")
QKV = (
    _layer("self_attn.q_proj.weight", "attn_q.weight", lambda c: (c.q_size, c.hidden_size), "column", "heads",
           model_field="qkv_proj"),
    _layer("self_attn.k_proj.weight", "attn_k.weight", lambda c: (c.kv_size, c.hidden_size), "column", "kv_heads",
           model_field="qkv_proj"),
    _layer("self_attn.v_proj.weight", "attn_v.weight", lambda c: (c.kv_size, c.hidden_size), "column", "kv_heads",
           model_field="qkv_proj"),
)
O_PROJ = _layer("self_attn.o_proj.weight", "attn_output.weight", lambda c: (c.hidden_size, c.q_size), "row", "heads",
                model_field="o_proj")
GATE_UP = (
    _layer("mlp.gate_proj.weight", "ffn_gate.weight", lambda c: (c.intermediate_size, c.hidden_size), "column",
           "intermediate", model_field="gate_up_proj"),
    _layer("mlp.up_proj.weight", "ffn_up.weight", lambda c: (c.intermediate_size, c.hidden_size), "column",
           "intermediate", model_field="gate_up_proj"),
)
DOWN = _layer("mlp.down_proj.weight", "ffn_down.weight", lambda c: (c.hidden_size, c.intermediate_size), "row",
              "intermediate", model_field="down_proj")
QKV_BIAS = (  # Qwen2
    _layer("self_attn.q_proj.bias", "attn_q.bias", lambda c: (c.q_size,), "column", "heads", model_field="qkv_bias",
           kind="bias"),
    _layer("self_attn.k_proj.bias", "attn_k.bias", lambda c: (c.kv_size,), "column", "kv_heads",
           model_field="qkv_bias", kind="bias"),
    _layer("self_attn.v_proj.bias", "attn_v.bias", lambda c: (c.kv_size,), "column", "kv_heads",
           model_field="qkv_bias", kind="bias"),
)
QK_NORM = (  # Qwen3, Gemma 3: RMSNorm over each head's q and k
    _layer("self_attn.q_norm.weight", "attn_q_norm.weight", _head, "replicated", model_field="q_norm", kind="norm"),
    _layer("self_attn.k_norm.weight", "attn_k_norm.weight", _head, "replicated", model_field="k_norm", kind="norm"),
)
SANDWICH_NORMS = (  # Gemma 2/3: HF's post_attention_layernorm is after attention, the MLP's input norm is pre_feedforward
    _layer("post_attention_layernorm.weight", "post_attention_norm.weight", _hidden, "replicated",
           model_field="attn_out_norm", kind="norm"),
    _layer("pre_feedforward_layernorm.weight", "ffn_norm.weight", _hidden, "replicated", model_field="mlp_norm",
           kind="norm"),
    _layer("post_feedforward_layernorm.weight", "post_ffw_norm.weight", _hidden, "replicated",
           model_field="mlp_out_norm", kind="norm"),
)
FUSED_QKV = _layer("self_attn.qkv_proj.weight", "attn_qkv.weight", lambda c: (c.q_size + 2 * c.kv_size, c.hidden_size),
                   "column", "qkv", model_field="qkv_proj")  # Phi-3
FUSED_GATE_UP = _layer("mlp.gate_up_proj.weight", "ffn_up.weight",  # Phi-3 (llama.cpp keeps it fused as ffn_up)
                       lambda c: (2 * c.intermediate_size, c.hidden_size), "column", "gate_up", model_field="gate_up_proj")


def moe_specs(block: str, gate: str, up: str, down: str) -> tuple[WeightSpec, ...]:
    """A mixture-of-experts MLP under `block` (HF's module name) with its expert matrices' names: the
    router [E, hidden] and the experts stacked [E, width, hidden] (gate, up) and [E, hidden, width]
    (down); llama.cpp stores them stacked as ffn_{gate,up,down}_exps."""
    def experts(c):
        return (c.num_experts, c.moe_intermediate_size, c.hidden_size)

    return (
        _layer(f"{block}.gate.weight", "ffn_gate_inp.weight", lambda c: (c.num_experts, c.hidden_size), "replicated",
               model_field="router", kind="router"),
        _layer(f"{block}.experts.{gate}.weight", "ffn_gate_exps.weight", experts, "column", "experts",
               model_field="experts_gate_up", kind="experts"),
        _layer(f"{block}.experts.{up}.weight", "ffn_up_exps.weight", experts, "column", "experts",
               model_field="experts_gate_up", kind="experts"),
        _layer(f"{block}.experts.{down}.weight", "ffn_down_exps.weight",
               lambda c: (c.num_experts, c.hidden_size, c.moe_intermediate_size), "row", "experts",
               model_field="experts_down", kind="experts"),
    )


# (per-layer order: the order tests/util.random_weights draws them in)
LLAMA_SCHEMA: tuple[WeightSpec, ...] = TOP + (LM_HEAD, ROPE_FREQS, INPUT_NORM, MLP_NORM) + QKV + (O_PROJ,) + GATE_UP + (DOWN,)
QWEN2_SCHEMA = LLAMA_SCHEMA + QKV_BIAS
QWEN3_SCHEMA = LLAMA_SCHEMA + QK_NORM
GEMMA2_SCHEMA = TOP + (INPUT_NORM,) + SANDWICH_NORMS + QKV + (O_PROJ,) + GATE_UP + (DOWN,)  # (always tied)
GEMMA3_SCHEMA = GEMMA2_SCHEMA + (LM_HEAD,) + QK_NORM
PHI3_SCHEMA = TOP + (LM_HEAD, INPUT_NORM, MLP_NORM, FUSED_QKV, O_PROJ, FUSED_GATE_UP, DOWN)
QWEN3_MOE_SCHEMA = TOP + (LM_HEAD, INPUT_NORM, MLP_NORM) + QKV + (O_PROJ,) + QK_NORM + moe_specs(
    "mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_SCHEMA = TOP + (LM_HEAD, ROPE_FREQS, INPUT_NORM, MLP_NORM) + QKV + (O_PROJ,) + moe_specs(
    "block_sparse_moe", "w1", "w3", "w2")


@dataclass(frozen=True)
class Weight:
    """One concrete tensor of a model: its names and spec."""

    hf_name: str
    gguf_name: str
    spec: WeightSpec
    layer: int | None


def schema_of(config: ModelConfig) -> tuple[WeightSpec, ...]:
    """The weight schema of the config's family (forge.models.families)."""
    from forge.models.families import family_of

    return family_of(config).schema


def expand(config: ModelConfig, schema=None, everything: bool = False) -> Iterator[Weight]:
    """The concrete tensors a checkpoint of this config holds: the required ones, plus lm_head when
    the embeddings are not tied (everything=True: every tensor the schema knows, for name lookups).
    schema: the config's family's by default."""
    schema = schema_of(config) if schema is None else schema
    specs = [s for s in schema if everything or s.required
             or (s.hf_name == "lm_head.weight" and not config.tie_word_embeddings)]
    for spec in specs:
        if not spec.per_layer:
            yield Weight(spec.hf(), spec.gguf(), spec, None)
    for layer in range(config.num_layers):  # (layer by layer: the order checkpoints and random_weights use)
        for spec in specs:
            if spec.per_layer:
                yield Weight(spec.hf(layer), spec.gguf(layer), spec, layer)


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(re.escape("{layer}"), r"(\d+)") + "$")


@functools.cache
def _patterns(schema: tuple[WeightSpec, ...], gguf: bool) -> list[tuple[re.Pattern, WeightSpec]]:
    return [(_pattern(s.gguf_name if gguf else s.hf_name), s) for s in schema]


def spec_of(hf_name: str, schema=LLAMA_SCHEMA) -> WeightSpec | None:
    """The spec of an HF-named tensor (None: not a weight the model uses)."""
    for pattern, spec in _patterns(schema, False):
        if pattern.match(hf_name):
            return spec
    return None


def hf_name_of_gguf(gguf_name: str, schema=LLAMA_SCHEMA) -> str | None:
    """llama.cpp tensor name -> HF name (None: not a weight the model uses)."""
    for pattern, spec in _patterns(schema, True):
        m = pattern.match(gguf_name)
        if m:
            return spec.hf(int(m.group(1)) if spec.per_layer else None)
    return None


def _expert_pattern(spec: WeightSpec) -> re.Pattern:
    """A checkpoint's per-expert name of a stacked spec (groups: layer, expert)."""
    head, tail = re.escape(spec.hf_name).split(re.escape("experts."), 1)
    return re.compile(f"{head}experts\\.(?P<expert>\\d+)\\.{tail}$".replace(re.escape("{layer}"), r"(?P<layer>\d+)"))


class ExpertStacker:
    """HF checkpoints hold one tensor per expert (`mlp.experts.{e}.gate_proj.weight`), the schema one
    stacked [E, ...] tensor (`mlp.experts.gate_proj.weight`): collects each layer's experts as the
    loader reads them (each cut for this rank by `cut`, as a 2-D tensor) and stacks them once all E
    are in, so at most one layer's unstacked copies are held."""

    def __init__(self, config: ModelConfig, schema: tuple[WeightSpec, ...], cut):
        self.num_experts = config.num_experts
        self.patterns = [(_expert_pattern(s), s) for s in schema if s.kind == "experts"]
        self.cut = cut
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, name: str, read, weights: dict) -> bool:
        """If `name` is one expert's tensor: read() it, keep it, and put the stacked tensor into `weights`
        once its last expert arrives. False: not an expert tensor of the schema."""
        for pattern, spec in self.patterns:
            m = pattern.match(name)
            if m:
                expert = int(m.group("expert"))
                if expert >= self.num_experts:
                    raise ValueError(f"{name}: expert {expert} of a model with {self.num_experts} experts")
                stacked = spec.hf(int(m.group("layer")))
                parts = self.pending.setdefault(stacked, {})
                parts[expert] = self.cut(stacked, read())
                if len(parts) == self.num_experts:
                    weights[stacked] = torch.stack([parts[e] for e in range(self.num_experts)])
                    del self.pending[stacked]
                return True
        return False

    def missing(self) -> list[str]:
        """Per-expert names still missing (a checkpoint that lacks some experts of a layer)."""
        return [_expert_name(stacked, e) for stacked, parts in self.pending.items()
                for e in range(self.num_experts) if e not in parts]


def _expert_name(stacked: str, expert: int) -> str:
    return stacked.replace("experts.", f"experts.{expert}.", 1)


def unstack_experts(weights: dict[str, torch.Tensor], schema: tuple[WeightSpec, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's names back: each stacked experts tensor as one tensor per expert (save_hf_dir)."""
    out = {}
    for name, t in weights.items():
        spec = spec_of(name, schema)
        if spec is not None and spec.kind == "experts":
            out.update({_expert_name(name, e): t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


def field_specs(model_field: str, schema=LLAMA_SCHEMA) -> list[WeightSpec]:
    """The specs stacked (in order) into one model attribute: q, k, v -> qkv_proj; gate, up -> gate_up_proj."""
    return [s for s in schema if s.model_field == model_field]


def missing_weights(names, config: ModelConfig) -> list[str]:
    """Required HF names absent from `names` (lm_head may be missing: the embeddings are then tied)."""
    present = set(names)
    return [w.hf_name for w in expand(config, everything=True) if w.spec.required and w.hf_name not in present]


class LazyWeights(dict):
    """name -> tensor, each made when first taken (`pop` / `[]`), from a zero-argument function: the
    model takes (and quantizes) one matrix before the next exists, so a large model's random weights
    never all exist at once (a 70B model's bfloat16 weights do not fit on one GPU; its int4 ones do)."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if callable(value):
            value = value()
            super().__setitem__(name, value)
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default

    def pop(self, name, *default):
        if name not in self:
            if default:
                return default[0]
            raise KeyError(name)
        value = self[name]
        super().pop(name)
        return value

    def values(self):
        return [self[name] for name in self]

    def items(self):
        return [(name, self[name]) for name in self]


def dummy_weights(config: ModelConfig, device, dtype: torch.dtype, seed: int = 0, scale: float = 0.02,
                  embedding_scale: float = 1.0, norm_noise: bool = False, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Random weights of the schema's shapes (pass a shard's local config for one rank): matrices
    N(0, scale) (embeddings times embedding_scale), biases N(0, scale), norms 1 (plus N(0, scale) with norm_noise), made
    on `device` so a large model's dummy load needs no host copy. lazy: a LazyWeights whose tensors
    are made as they are taken, each from its own generator (seeded by the seed and its name)."""
    from forge.models.families import family_of

    one = 1 - family_of(config).norm_offset  # the stored value of a unit norm (Gemma stores w of 1 + w)

    def make(name: str, kind: str, shape, g):
        def rnd():
            return torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale

        if kind == "norm":
            return one + rnd() if norm_noise else torch.full(shape, one, device=device, dtype=dtype)
        if kind == "bias":
            return rnd()
        return rnd() * (embedding_scale if kind == "embedding" else 1)

    if lazy:
        def maker(name, kind, shape):
            return lambda: make(name, kind, shape,
                                torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode())))

        return LazyWeights({w.hf_name: maker(w.hf_name, w.spec.kind, w.spec.shape(config)) for w in expand(config)})
    g = torch.Generator(device=device).manual_seed(seed)
    return {w.hf_name: make(w.hf_name, w.spec.kind, w.spec.shape(config), g) for w in expand(config)}
