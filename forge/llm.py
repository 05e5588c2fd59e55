"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, sampling_params)`."""

from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.errors import InvalidRequestError
from forge.outputs import RequestOutput
from forge.sampling_params import SamplingParams

PromptType = str | dict | list[int]


class LLM:
    """Load a model (None = the embedded SmolLM2-135M-Instruct) and generate from batches of prompts.

    Keyword arguments are EngineConfig fields: device, dtype, max_model_len, block_size,
    num_kv_blocks, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, enforce_eager, ...
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
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
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)),
             "prompt": None}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

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
