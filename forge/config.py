"""Model and engine configuration: small dataclasses, filled from GGUF metadata or HF config.json."""

import os
import re
from dataclasses import dataclass

from forge.errors import InvalidRequestError
from forge.sampling_params import MAX_LOGPROBS
from forge.spec_decode.config import SpeculativeConfig
from forge.validation import INT64_MAX, INT64_MIN, check_bool, check_float, check_int

DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's (and torch's) other names
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATION_MODES = ("auto", "none", "int8", "int4", "fp8")  # forge.quant
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; fp8 = float8 e4m3 (CUDA)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class RopeScaling:
    """RoPE frequency scaling, by `rope_type` (HF's names):
    * "llama3": leave high frequencies alone, divide low ones by `factor`, blend in between;
    * "linear": divide every frequency by `factor` (positions interpolated; Gemma 3's global layers);
    * "longrope": divide frequency i by short_factor[i], or long_factor[i] when the engine's context
      is longer than original_max_position_embeddings (Phi-3), and scale cos/sin by attention_factor.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None


@dataclass
class ModelConfig:
    """The shape of a decoder of one of forge's families (forge.models.families)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "llama"
    family: str = "llama"  # forge.models.families: the decoder's switches and the weight schema
    # Sliding-window attention: a windowed layer's query sees the last `sliding_window` keys (itself
    # included). layer_types: "sliding_attention" | "full_attention" per layer; None = every layer
    # windowed when sliding_window is set (Mistral, Phi-3).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2/3)
    # Mixture of experts (Qwen3-MoE, Mixtral; 0 experts: a dense MLP): every layer's MLP is
    # num_experts SwiGLU experts of width moe_intermediate_size, num_experts_per_tok picked per token by
    # a softmax router; norm_topk_prob rescales the picked weights to sum to 1.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0):
            raise ValueError(f"a mixture of experts needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= "
                             f"num_experts ({self.num_experts}) and a positive moe_intermediate_size "
                             f"({self.moe_intermediate_size})")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must list {self.num_layers} of {', '.join(LAYER_TYPES)}")

    def layer_window(self, layer: int) -> int | None:
        """The keys layer `layer`'s queries see (None: the whole context)."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        """From an HF config.json: the family (forge.models.families) picked by model_type/architectures
        reads its fields."""
        from forge.models.families import config_from_hf

        return config_from_hf(cfg)

    def to_hf_dict(self) -> dict:
        from forge.models.families import config_to_hf

        return config_to_hf(self)


_MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_MEMORY_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*")


def parse_memory_size(value, name: str) -> int:
    """Bytes as an int, or a string such as "512MiB", "1.5GB", "2g" (k/m/g/t = powers of 1000, kib/mib/gib
    = powers of 1024), as a positive int of bytes; one-line InvalidRequestError otherwise."""
    if isinstance(value, str):
        match = _MEMORY_SIZE.fullmatch(value.lower())
        if match and match.group(2) in _MEMORY_UNITS:
            size = float(match.group(1)) * _MEMORY_UNITS[match.group(2)]
            if size >= 1:
                return int(size)
        raise InvalidRequestError(f"{name} must be a size in bytes such as 536870912, 512MiB or 2GB, got {value!r}",
                                  param=name)
    return check_int(value, f"{name} (bytes)", 1, param=name)


@dataclass
class EngineConfig:
    """How the engine runs a model: device, memory and batching limits."""

    model: str | None = None  # path to a .gguf file or an HF directory; None = the embedded default
    load_format: str = "auto"  # "dummy": random weights of the model's shape (benchmarks; needs only config.json)
    device: str = "cpu"
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    max_model_len: int | None = None  # defaults to min(model context, 8192)
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = sized from kv_cache_memory (CPU) / gpu_memory_utilization (CUDA)
    # CPU KV cache: bytes or "512MiB"/"2GB"; None = max_model_len x min(max_num_seqs, 4) tokens, at most 1/4 of RAM
    kv_cache_memory: int | str | None = None
    threads: int | None = None  # CPU compute threads; None = physical cores - 1 for torch (at least 1), and for the
    # native kernels every core while the machine is otherwise idle (forge.engine.model_runner, forge.native.threads)
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Schedule and launch step t+1 before reading step t's tokens back, so the host's per-step
    # work overlaps the GPU. None = on for a single CUDA device (it gains nothing on the CPU).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # > 1: one process per device (forge.distributed), rank 0 schedules
    # auto: GGUF blocks and HF FP8/AWQ/GPTQ checkpoints stay quantized; none: dequantize (exact);
    # int8 (CPU) / int4 / fp8 (CUDA): quantize float weights at load (forge.quant)
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"  # auto: the compute dtype (float16 with forge's native CPU kernels); fp8: e4m3 (CUDA)
    seed: int = 0
    max_logprobs: int = MAX_LOGPROBS  # most logprobs a request may ask for (-1: the whole vocabulary), as vLLM
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
    # "prompt_lookup_min": m} or {"method": "draft_model", "model": PATH, ...} (or its JSON); forge.spec_decode
    speculative_config: "dict | str | SpeculativeConfig | None" = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field at construction, so a bad value fails here in one line (InvalidRequestError,
        param = the field) instead of as a hang or a traceback deep in the engine."""
        if self.model is not None:
            if not isinstance(self.model, (str, os.PathLike)):
                raise InvalidRequestError(f"model must be a path, got {type(self.model).__name__}", param="model")
            if not os.fspath(self.model).strip():
                raise InvalidRequestError("model path is empty: pass a .gguf file or an HF model directory, or omit "
                                          "it for the default model", param="model")
        if self.load_format not in LOAD_FORMATS:
            raise InvalidRequestError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}",
                                      param="load_format")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise InvalidRequestError(f"device must be cpu, cuda or cuda:N, got {self.device!r}", param="device")
        if isinstance(self.dtype, str) or type(self.dtype).__name__ == "dtype":  # a torch.dtype: "torch.float16"
            self.dtype = DTYPE_ALIASES.get(str(self.dtype).removeprefix("torch."), str(self.dtype).removeprefix("torch."))
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)} (or half, float), got {self.dtype!r}",
                                      param="dtype")
        if self.max_model_len is not None:  # room for one prompt token and one generated token
            self.max_model_len = check_int(self.max_model_len, "max_model_len", 2)
        self.block_size = check_int(self.block_size, "block_size", 1, 1024)
        if self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}", param="block_size")
        if self.num_kv_blocks is not None:
            self.num_kv_blocks = check_int(self.num_kv_blocks, "num_kv_blocks", 1)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_memory_size(self.kv_cache_memory, "kv_cache_memory")
        if self.threads is not None:
            self.threads = check_int(self.threads, "threads", 1, 1024)
        self.gpu_memory_utilization = check_float(self.gpu_memory_utilization, "gpu_memory_utilization", 0, 1,
                                                  lo_open=True)
        # 0 would schedule nothing and spin forever
        self.max_num_seqs = check_int(self.max_num_seqs, "max_num_seqs", 1)
        self.max_num_batched_tokens = check_int(self.max_num_batched_tokens, "max_num_batched_tokens", 1)
        check_bool(self.enable_prefix_caching, "enable_prefix_caching")
        check_bool(self.enforce_eager, "enforce_eager")
        check_bool(self.async_scheduling, "async_scheduling", optional=True)
        self.tensor_parallel_size = check_int(self.tensor_parallel_size, "tensor_parallel_size", 1)
        self.seed = check_int(self.seed, "seed", INT64_MIN, INT64_MAX)
        if self.quantization not in QUANTIZATION_MODES:
            raise InvalidRequestError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got "
                                      f"{self.quantization!r}", param="quantization")
        if self.quantization == "int8" and self.device.startswith("cuda"):
            raise InvalidRequestError("quantization 'int8' runs on the CPU only (on CUDA: fp8, int4, auto or none)",
                                      param="quantization")
        if self.quantization == "fp8" and not self.device.startswith("cuda"):
            raise InvalidRequestError("quantization 'fp8' runs on CUDA only (on the CPU: int8, int4, auto or none)",
                                      param="quantization")
        if self.quantization in ("int4", "fp8") and self.device.startswith("cuda") and self.dtype == "float32":
            raise InvalidRequestError(f"quantization {self.quantization!r} computes in bfloat16 or float16 on CUDA, "
                                      f"not float32 (use dtype auto)", param="quantization")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                                      f"{self.kv_cache_dtype!r}", param="kv_cache_dtype")
        if self.kv_cache_dtype != "auto" and not self.device.startswith("cuda"):
            raise InvalidRequestError(f"kv_cache_dtype {self.kv_cache_dtype!r} runs on CUDA only (the CPU keeps its "
                                      f"cache in float32, or float16 with quantized weights)", param="kv_cache_dtype")
        self.max_logprobs = check_int(self.max_logprobs, "max_logprobs (-1 = the whole vocabulary)", -1,
                                      param="max_logprobs")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
