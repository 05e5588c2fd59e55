"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, sampling_params)`."""

import dataclasses
import random
import warnings
from collections.abc import Sequence as Seq
from pathlib import Path

from tqdm.auto import tqdm

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.errors import InvalidRequestError
from forge.outputs import RequestOutput
from forge.sampling_params import SamplingParams

PromptType = str | dict | list[int]

# vLLM engine arguments that have no forge counterpart, with vLLM's default and why they do not apply.
# They are accepted so that vLLM code runs unchanged; a value other than the default warns once.
_NOT_APPLICABLE = {
    "trust_remote_code": (False, "forge runs no code from model repositories"),
    "tokenizer_mode": ("auto", "forge always uses the model's fast tokenizer"),
    "skip_tokenizer_init": (False, "forge needs the tokenizer to detokenize"),
    "revision": (None, "forge never downloads a model: pass a local path"),
    "tokenizer_revision": (None, "forge never downloads a model: pass a local path"),
    "code_revision": (None, "forge never downloads a model: pass a local path"),
    "download_dir": (None, "forge never downloads a model: pass a local path"),
    "hf_token": (None, "forge never downloads a model: pass a local path"),
    "swap_space": (4, "forge preempts by recomputing and never swaps KV blocks to the CPU"),
    "cpu_offload_gb": (0, "forge keeps every weight on its device"),
    "enable_chunked_prefill": (None, "forge always prefills long prompts in chunks"),
    "disable_custom_all_reduce": (False, "forge's tensor parallelism uses NCCL's all-reduce"),
    "distributed_executor_backend": (None, "forge runs one process per GPU"),
    "pipeline_parallel_size": (1, "forge has tensor parallelism only"),
    "max_seq_len_to_capture": (8192, "forge captures CUDA graphs for decode batches, whatever their length"),
    "disable_log_stats": (True, "the offline API logs no statistics"),
    "compilation_config": (None, "forge does not use torch.compile"),
    "hf_overrides": (None, "forge reads the model's config as stored"),
    "mm_processor_kwargs": (None, "forge runs text-only models"),
    "limit_mm_per_prompt": (None, "forge runs text-only models"),
    "enable_lora": (False, "forge has no LoRA adapters"),
    "task": ("auto", "forge generates text"),
    "runner": ("auto", "forge generates text"),
}
_warned: set[str] = set()


class LLM:
    """Load a model (None = the embedded SmolLM2-135M-Instruct) and generate from batches of prompts.

    Keyword arguments are EngineConfig fields (device, dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, num_kv_blocks, gpu_memory_utilization, enforce_eager, enable_prefix_caching,
    tensor_parallel_size, max_logprobs, quantization, threads, kv_cache_memory, ...). vLLM's other common
    engine arguments are accepted too:
    `tokenizer` (it must be the model itself: forge uses the tokenizer stored with the model), `seed`
    (requests without their own seed draw reproducible ones from it), and those in _NOT_APPLICABLE,
    which warn once when set to anything but vLLM's default. `dtype` takes torch dtypes and vLLM's names
    ("auto", "half", "float16", "bfloat16", "float", "float32").
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, seed: int | None = None, **kwargs):
        for name in [k for k in kwargs if k in _NOT_APPLICABLE]:
            default, reason = _NOT_APPLICABLE[name]
            if kwargs.pop(name) != default:
                _warn_once(name, f"LLM({name}=...) does not apply to forge and is ignored: {reason}")
        unknown = [k for k in kwargs if k not in {f.name for f in dataclasses.fields(EngineConfig)}]
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r} (see help(forge.LLM) and "
                            f"forge.config.EngineConfig)")
        if tokenizer is not None and (model is None or Path(tokenizer).resolve() != Path(model).resolve()):
            _warn_once("tokenizer", "LLM(tokenizer=...) is ignored: forge uses the tokenizer stored with the model")
        if seed is not None:
            kwargs["seed"] = seed
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        # vLLM seeds its engine's random state (default 0), so unseeded requests repeat run to run:
        # requests without a seed get one from this stream.
        self._seeds = random.Random(seed) if seed is not None else None
        self._hf_tokenizer = None

    def get_tokenizer(self):
        """The tokenizer as HF code expects it: transformers' PreTrainedTokenizerFast when transformers is
        installed, else forge.hf_tokenizer.HFCompatibleTokenizer (see that module)."""
        if self._hf_tokenizer is None:
            from forge.hf_tokenizer import hf_compatible_tokenizer

            self._hf_tokenizer = hf_compatible_tokenizer(self.llm_engine.tokenizer, str(self.llm_engine.model_path))
        return self._hf_tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: None = None,
    ) -> list[RequestOutput]:
        if lora_request is not None:
            raise InvalidRequestError("forge has no LoRA adapters: leave lora_request out", param="lora_request")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError(f"prompts must be a string, a dict, a list of token ids or a list of those, "
                                      f"got {type(prompts).__name__}", param="prompt")
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params_list)} sampling params",
                                      param="sampling_params")
        if self._seeds is not None:
            params_list = [p if p.seed is not None or p.greedy else
                           dataclasses.replace(p, seed=self._seeds.getrandbits(62)) for p in params_list]
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(engine.add_request(prompt, p))
        except Exception:
            for rid in ids:  # a bad prompt in the batch leaves nothing behind
                engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        tool_parser: str | None = "auto",
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the model's chat template
        (or `chat_template`: a template's text, or the name of one the model carries). Each output's
        `prompt` is the rendered text. continue_final_message=True (with add_generation_prompt=False)
        continues the last message instead of starting a new turn; chat_template_kwargs are more
        template variables (e.g. enable_thinking).

        tools (OpenAI's shape) reach the template. tool_choice (forge's addition, OpenAI's values):
        "required" or {"type": "function", "function": {"name": ...}} constrain the output with a
        grammar, so it is always a valid call (parallel_tool_calls=False: exactly one); "auto" (the
        default with tools) leaves the model free; "none" reads no calls. Each CompletionOutput's
        `tool_calls` then holds the calls read from its `text` (forge.tools.ToolCall: id, name,
        arguments JSON text; .to_openai()), with "auto" only when `tool_parser` ("auto": detected
        from the template; or hermes / llama3_json / mistral) knows the format. `text` stays the raw
        output, as in vLLM."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        tool_use = None
        if tools or tool_choice is not None:
            from forge.tools.chat import ToolUse, template_tool_parser

            parser = template_tool_parser(tok, chat_template) if tool_parser == "auto" else tool_parser
            tool_use = ToolUse.resolve(tools, tool_choice, parallel_tool_calls, parser, require_parser=False)
        prompts = []
        for conversation in conversations:
            text = tok.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, chat_template=chat_template,
                                           **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": tok.encode(text), "prompt": text})
        if tool_use is None:
            return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        from forge.tools.chat import ChatOutputParser, chat_params

        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [chat_params(p, tool_use, None, "") for p in params] if isinstance(params, Seq) \
            else chat_params(params, tool_use, None, "")
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request)
        for out in outputs:
            for c in out.outputs:
                parser = ChatOutputParser.for_request(tool_use, None, out.prompt)
                c.tool_calls = parser.extract(c.text).tool_calls if parser.tools is not None else None
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(done) < len(wanted) and engine.has_unfinished_requests():
                for out in engine.step(emit="finished"):
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in wanted - done.keys():  # interrupted: leave the engine clean
                engine.abort_request(rid)
        return [done[rid] for rid in request_ids]


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(message, UserWarning, stacklevel=3)
