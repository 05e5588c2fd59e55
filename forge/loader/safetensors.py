"""HF model directories: config.json + *.safetensors (single or sharded) + tokenizer files."""

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forge.config import ModelConfig
from forge.distributed.sharding import tensor_sharder
from forge.errors import ForgeError, ModelLoadError
from forge.loader.progress import load_progress
from forge.loader.quantized import QuantizedCheckpoint, checkpoint_format, float_weight, kv_scale_name
from forge.models.schema import ExpertStacker, schema_of, spec_of, unstack_experts


def load_hf_config(path: Path) -> ModelConfig:
    return _read_config(path)[0]


def _read_config(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, config.json as a dict)."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
        return ModelConfig.from_hf_dict(raw), raw
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"bad config.json in {path}: {type(e).__name__}: {e}") from None


def load_hf_dir(path: Path, shard: tuple[int, int] | None = None):
    from forge.loader import LoadedModel
    from forge.tokenizer import Tokenizer

    config, raw_config = _read_config(path)
    quant = checkpoint_format(raw_config) or QuantizedCheckpoint()  # (a float checkpoint: every tensor as it is)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors files")
    cut = tensor_sharder(config, shard)
    schema = schema_of(config)
    weights: dict[str, torch.Tensor] = {}
    experts = ExpertStacker(config, schema, cut)  # (MoE checkpoints: one tensor per expert, stacked per layer)
    with ThreadPoolExecutor(1) as background, ExitStack() as files_open:
        # The tokenizer is built while the tensors are read (the Rust tokenizer and the copies release the GIL).
        tokenizer = background.submit(Tokenizer.from_hf_dir, path)
        opened = []
        for f in files:  # (headers only: the tensor count for the progress bar)
            try:
                opened.append((f, files_open.enter_context(safe_open(f, framework="pt"))))
            except Exception as e:
                raise ModelLoadError(f"cannot read {f}: {e}".split("\n")[0]) from None
        where = {name: st for _, st in opened for name in st.keys()}  # (a weight's scales may sit in another file)

        def read(name: str):
            """The weight `name` as the checkpoint holds it: a tensor or, quantized, a forge.quant.layouts form."""
            return quant.read(name, lambda n: where[n].get_tensor(n), where.__contains__)

        with load_progress(len(where), path) as bar:
            for f, st in opened:
                try:
                    for name in st.keys():
                        _load_tensor(quant.target(name), read, schema, cut, experts, weights)
                        bar.update()
                except ForgeError:
                    raise
                except Exception as e:
                    raise ModelLoadError(f"cannot read {f}: {e}".split("\n")[0]) from None
        tokenizer = tokenizer.result()
    if experts.missing():
        raise ModelLoadError(f"{path} is missing {len(experts.missing())} expert tensors (first: {experts.missing()[0]})")
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    from forge.loader.gguf import _check_complete

    _check_complete(weights, config, path)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, path=path, shard=shard,
                       quantization=quant.method or None)


def _load_tensor(name: str | None, read, schema, cut, experts: ExpertStacker, weights: dict) -> None:
    """Put checkpoint tensor `name` (as quant.target named it; None: read along with its weight) into `weights`."""
    if name is None:
        return
    spec = spec_of(name, schema)
    if spec is not None:  # (not e.g. old checkpoints' rotary_emb.inv_freq)
        w = read(name)
        weights[name] = cut(name, w if spec.kind in ("matrix", "embedding") else float_weight(w))
    elif kv_scale_name(name) is not None:  # (FP8 KV-cache scales: one per layer, the same on every rank)
        weights[kv_scale_name(name)] = read(name).float()
    else:
        experts.add(name, lambda: float_weight(read(name)), weights)


def save_hf_dir(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer=None) -> None:
    """Write an HF-layout directory (used to convert a GGUF and by tests); MoE experts one tensor per
    expert, as transformers writes them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = config.to_hf_dict()
    tensors = {k: v.contiguous() for k, v in unstack_experts(weights, schema_of(config)).items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_hf_dir(path)
