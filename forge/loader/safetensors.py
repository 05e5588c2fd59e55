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
from forge.errors import ModelLoadError
from forge.loader.progress import load_progress
from forge.models.schema import ExpertStacker, schema_of, spec_of, unstack_experts


def load_hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"bad config.json in {path}: {type(e).__name__}: {e}") from None


def load_hf_dir(path: Path, shard: tuple[int, int] | None = None):
    from forge.loader import LoadedModel
    from forge.tokenizer import Tokenizer

    config = load_hf_config(path)
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
        with load_progress(sum(len(st.keys()) for _, st in opened), path) as bar:
            for f, st in opened:
                try:
                    for name in st.keys():
                        if spec_of(name, schema) is not None:  # (not e.g. old checkpoints' rotary_emb.inv_freq)
                            weights[name] = cut(name, st.get_tensor(name))
                        else:
                            experts.add(name, lambda st=st, name=name: st.get_tensor(name), weights)
                        bar.update()
                except Exception as e:
                    raise ModelLoadError(f"cannot read {f}: {e}".split("\n")[0]) from None
        tokenizer = tokenizer.result()
    if experts.missing():
        raise ModelLoadError(f"{path} is missing {len(experts.missing())} expert tensors (first: {experts.missing()[0]})")
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    from forge.loader.gguf import _check_complete

    _check_complete(weights, config, path)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, path=path, shard=shard)


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
