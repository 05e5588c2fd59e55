"""LLMEngine: the public engine the offline `LLM`, the server and the benchmarks drive.

    add_request  -> InputProcessor   (tokenize, validate, the Request and its Sequences)
    step         -> EngineCore       (schedule -> execute -> masks -> sample -> update)
                    OutputProcessor  (tokens, logprob entries, stop checks, RequestOutput)

The parts live in forge.engine.{input_processor,core,output_processor}; this class builds them
from an EngineConfig and keeps the names callers use.
"""

from __future__ import annotations

import torch

from forge.config import EngineConfig
from forge.engine.core import EngineCore
from forge.engine.input_processor import InputProcessor
from forge.errors import InvalidRequestError
from forge.loader import load_model
from forge.outputs import RequestOutput
from forge.quant import keeps_gguf_quantized
from forge.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidRequestError("--device cuda was asked for but torch sees no CUDA GPU", param="device")
        tp_size = config.tensor_parallel_size
        # Rank 0's slice only: each tensor is cut as it is read (the workers do the same for theirs).
        loaded = load_model(config.model, config.load_format, shard=(0, tp_size) if tp_size > 1 else None,
                            keep_quantized=keeps_gguf_quantized(config.quantization, config.device, tp_size > 1))
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        self.core = core = EngineCore(config, loaded)
        del loaded  # (the model freed the loader's weights as it was built)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size, core.max_model_len,
                                              core.context_limit, config.max_logprobs, core.make_matcher)
        # The parts, by the names callers (server, benchmarks, tests) use.
        self.output_processor = core.output_processor
        self.max_model_len = core.max_model_len
        self.context_limit = core.context_limit
        self.tp = core.tp
        self.runner = core.runner
        self.block_manager = core.block_manager
        self.scheduler = core.scheduler
        self.sampler = core.sampler
        self.isolation = core.isolation
        self.async_scheduling = core.async_scheduling
        self.eos_token_ids = core.eos_token_ids
        self.requests = core.requests
        self.stats = core.stats

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and the structured-output threads, if any (idempotent;
        the workers also stop when the engine is collected)."""
        self.core.shutdown()

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: str | dict | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, grammar=None) -> str:
        """Queue a request; returns its id. `grammar`: params.structured_outputs already compiled (the
        server compiles it off the engine thread, StructuredBackend.compile_in_background); without it
        the spec is compiled here."""
        req = self.input_processor.make_request(prompt, params, request_id, grammar, ids_in_use=self.requests)
        self.core.add_request(req)
        return req.request_id

    def tokenize_prompt(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt: text, a list of token ids, or a dict with "prompt"
        or "prompt_token_ids"."""
        return self.input_processor.tokenize_prompt(prompt)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request at any point; its KV blocks are freed at once."""
        self.core.abort_request(request_id)

    def fail_request(self, request_id: str, cause: BaseException) -> RequestOutput | None:
        return self.core.fail_request(request_id, cause)

    def recover_after_failed_step(self) -> list[RequestOutput]:
        return self.core.recover_after_failed_step()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step --------------------------------------------------------------------------------
    def step(self, emit: str = "all") -> list[RequestOutput]:
        """Run one engine step. Returns outputs of the requests that got a token this step
        (emit="all", for streaming) or only of those that finished (emit="finished": skips building
        per-step output objects, which costs O(output length) per request per step).

        A step that raises fails only the request(s) that caused it, found by name or by bisection
        (forge.engine.failures); they come back finished, with `error` set, and the others go on."""
        return self.core.step(emit)

    @property
    def in_flight(self):
        """Async scheduling: the step whose tokens are not read back yet (forge.engine.core.InFlight)."""
        return self.core.in_flight

    # -- structured outputs ----------------------------------------------------------------------
    @property
    def structured_backend(self):
        """The forge.structured.StructuredBackend of this engine's vocabulary, built on first use."""
        return self.core.structured_backend

    @property
    def has_structured_backend(self) -> bool:
        return self.core.has_structured_backend

    # -- introspection ---------------------------------------------------------------------------
    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def spec_stats(self):
        """Speculative decoding's counts (forge.spec_decode.decoder.SpecStats), None without speculative_config."""
        return self.core.spec.stats if self.core.spec is not None else None

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.prefix_hit_rate

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.isolation.held)  # held: out of a failure's trial steps
