"""The OpenAI completions and chat endpoints: requests -> engine submissions -> responses or SSE chunks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from forge.errors import InvalidRequestError
from forge.outputs import CompletionOutput, Logprob, RequestOutput
from forge.sampling_params import SamplingParams
from forge.server import protocol
from forge.server.async_engine import AsyncEngine, EngineRequestError, RequestStream
from forge.server.chat import ChatJob, ChatSettings
from forge.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from forge.tools.chat import ChatOutputParser, ToolUse, chat_params

# JSON has no -inf; a token the sampler could not pick (e.g. masked by a grammar) gets this instead, as in vLLM.
MIN_LOGPROB = -9999.0


@dataclass
class _Choice:
    """What a stream has already sent for one choice (prompt i, completion j)."""

    index: int
    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0  # completions logprobs: where the next token starts in the choice's text
    started: bool = False  # has sent a chunk
    finished: bool = False
    parser: ChatOutputParser | None = None  # chat: reads reasoning and tool calls out of the text


@dataclass
class _Job:
    """One API request: its prompts, and the engine streams once submitted."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    prompts: list[dict]  # {"prompt": str | None, "prompt_token_ids": list[int]}
    params: SamplingParams
    echo: bool = False
    prompt_only: bool = False  # echo with max_tokens 0: the one token generated is dropped
    include_usage: bool = False
    chat: ChatJob | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    streams: list[RequestStream] = field(default_factory=list)


@dataclass
class _Admission:
    """The prompts of one admitted request that are not handed to the engine yet."""

    unsubmitted: int


class OpenAIServing:
    def __init__(self, async_engine: AsyncEngine, model_name: str, max_waiting: int,
                 chat_settings: ChatSettings = ChatSettings()):
        self.engine = async_engine
        self.tokenizer = async_engine.engine.tokenizer
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.chat_settings = chat_settings
        self.tool_parser = chat_settings.resolved_tool_parser(self.tokenizer)
        # Prompts admitted but not yet submitted (being tokenized): the engine does not count them yet.
        self._unsubmitted = 0
        self._live: dict[str, _Job] = {}  # jobs with engine requests, until their response ends
        self.draining = False  # shutting down: new requests are refused
        self.aborting = False  # shutting down, and the drain time is up: running requests are aborted

    # -- endpoints ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        req.check_supported()
        prompts = req.prompts()
        params = req.completion_params(len(prompts), self.engine.engine.max_model_len)
        with self._admit(len(prompts)) as admission:
            tokenized = [await asyncio.to_thread(self._tokenize, p) for p in prompts]
            job = _Job("completion", f"cmpl-{uuid.uuid4().hex}", self.model_name, tokenized, params,
                       echo=bool(req.echo), prompt_only=req.prompt_only, include_usage=req.include_usage)
            return await self._run(job, bool(req.stream), raw, admission)

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        conversation = req.conversation()
        options = req.template_options()
        tool_use = ToolUse.resolve(req.tools, req.tool_choice, req.parallel_tool_calls, self.tool_parser)
        params = req.sampling_params(req.max_new_tokens, req.num_logprobs,
                                     max_model_len=self.engine.engine.max_model_len)
        reasoning_parser = self.chat_settings.reasoning_parser
        with self._admit(1) as admission:
            text, ids, generation_prompt = await asyncio.to_thread(self._render_chat, conversation, tool_use, options)
            params = chat_params(params, tool_use, reasoning_parser, generation_prompt)
            job = _Job("chat", f"chatcmpl-{uuid.uuid4().hex}", self.model_name,
                       [{"prompt": None, "prompt_token_ids": ids}], params, include_usage=req.include_usage,
                       chat=ChatJob(tool_use, reasoning_parser, text))
            return await self._run(job, bool(req.stream), raw, admission)

    async def tokenize(self, req: TokenizeRequest) -> dict:
        """vLLM's /tokenize: a prompt (special tokens added by default) or a chat rendered with the
        server's template (not added by default: the template writes them)."""
        req.check()
        tok = self.tokenizer
        if req.prompt is not None:
            add_special = req.add_special_tokens is not False
            ids = await asyncio.to_thread(tok.encode, req.prompt, add_special)
        else:
            conversation = protocol.conversation(req.messages)
            options = protocol.chat_template_options(req.add_generation_prompt, req.continue_final_message,
                                                     req.chat_template_kwargs)
            tool_use = ToolUse.resolve(req.tools, "none" if req.tools else None)
            text, ids, _ = await asyncio.to_thread(self._render_chat, conversation, tool_use, options)
            if req.add_special_tokens:
                ids = tok.encode(text, add_special_tokens=True)
        strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.engine.max_model_len, "tokens": ids,
                "token_strs": strs}

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        vocab = self.engine.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens, False)}

    # -- shutdown (called by the server, see uvicorn_server.ForgeServer) ------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new requests; running ones go on."""
        self.draining = True

    def abort_all(self) -> int:
        """End every running request with the shutdown error (streams still get it and [DONE]).
        Returns how many requests that was."""
        self.draining = self.aborting = True
        for job in self._live.values():
            self._abort(job)
        return len(self._live)

    # -- shared machinery ------------------------------------------------------------------------------
    @contextmanager
    def _admit(self, count: int) -> Iterator[_Admission]:
        """Reserve `count` places in the waiting queue, or refuse with 503.

        Check and reservation happen together, before the first `await`: simultaneous requests are
        counted one after another, so a burst cannot overshoot `max_waiting`. A reserved place passes
        to the engine's own count when its prompt is submitted (`_submit`); whatever was not
        submitted is given back however the request ends."""
        if self.draining:
            raise _shutting_down()
        waiting = self._unsubmitted + self.engine.num_waiting_requests
        if waiting + count > self.max_waiting:
            raise APIError(f"the server is busy: {waiting} requests wait (limit {self.max_waiting}); retry shortly",
                           status=503, type="server_error", code="server_busy", headers={"Retry-After": "1"})
        admission = _Admission(count)
        self._unsubmitted += count
        try:
            yield admission
        finally:
            self._unsubmitted -= admission.unsubmitted
            admission.unsubmitted = 0

    async def _submit(self, job: _Job, i: int, admission: _Admission) -> RequestStream:
        # Hand the place over in the same synchronous stretch in which generate() counts the request
        # as waiting (before its first await): it is never counted twice, nor missed.
        admission.unsubmitted -= 1
        self._unsubmitted -= 1
        return await self.engine.generate(job.prompts[i], job.params, f"{job.id}-{i}")

    def _tokenize(self, prompt: str | list[int]) -> dict:
        # Runs in a worker thread: a long prompt must not stall the event loop or the step loop.
        text, ids = self.engine.engine.tokenize_prompt(prompt)
        return {"prompt": text, "prompt_token_ids": ids}

    def _render_chat(self, conversation: list[dict], tool_use: ToolUse, options: dict) -> tuple[str, list[int], str]:
        """(prompt text, its token ids, the generation prompt: what the template added for the new turn, or
        the continued message's text). Runs in a worker thread."""
        tok, template = self.tokenizer, self.chat_settings.chat_template
        text = tok.apply_chat_template(conversation, tool_use.tools, chat_template=template, **options)
        generation_prompt = ""
        if options["continue_final_message"]:
            generation_prompt = conversation[-1]["content"]
        elif options["add_generation_prompt"] and self.chat_settings.reasoning_parser is not None:
            # only the new turn tells whether the reasoning is open, closed, or still to come
            base = tok.apply_chat_template(conversation, tool_use.tools, chat_template=template,
                                           **{**options, "add_generation_prompt": False})
            generation_prompt = text[len(base):] if text.startswith(base) else text
        return text, tok.encode(text), generation_prompt

    async def _run(self, job: _Job, stream: bool, raw: Request, admission: _Admission):
        self._check_min_tokens(job)
        results = await asyncio.gather(*(self._submit(job, i, admission) for i in range(len(job.prompts))),
                                       return_exceptions=True)
        job.streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors or self.aborting:
            self._abort(job)
            if not errors:
                raise _shutting_down()
            if isinstance(errors[0], InvalidRequestError):
                raise self._request_error(job, errors[0])
            if isinstance(errors[0], EngineRequestError):
                raise APIError(str(errors[0]), status=503, type="server_error", code="engine_unavailable")
            raise errors[0]
        self._live[job.id] = job
        if stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _AbortingStreamingResponse(self._sse(job), on_close=lambda: self._close_job(job),
                                              media_type="text/event-stream", headers=headers)
        try:
            finals = await self._collect(job, raw)
        finally:
            self._close_job(job)
        if finals is None:  # the client went away; nobody reads this
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        return JSONResponse(self._full_response(job, finals))

    def _check_min_tokens(self, job: _Job) -> None:
        """Without max_tokens a request may generate up to the end of the context: min_tokens must fit there."""
        params, context = job.params, self.engine.engine.max_model_len
        if params.max_tokens is not None or not params.min_tokens:
            return
        for p in job.prompts:
            prompt_len = len(p["prompt_token_ids"])
            if prompt_len + params.min_tokens > context:
                raise APIError(f"prompt ({prompt_len} tokens) + min_tokens ({params.min_tokens}) = "
                               f"{prompt_len + params.min_tokens} exceeds the model's context of {context} tokens",
                               param="min_tokens", code="context_length_exceeded")

    def _close_job(self, job: _Job) -> None:
        self._abort(job)
        self._live.pop(job.id, None)

    def _abort(self, job: _Job) -> None:
        for s in job.streams:
            if not s.finished:
                self.engine.abort(s.request_id)

    async def _collect(self, job: _Job, raw: Request) -> list[RequestOutput] | None:
        """Wait for every stream to finish; None if the client disconnects first."""
        finals: list[RequestOutput | None] = [None] * len(job.streams)

        async def drain(i: int, s: RequestStream):
            async for out in s:
                finals[i] = out

        tasks = {asyncio.ensure_future(drain(i, s)) for i, s in enumerate(job.streams)}
        gone = asyncio.ensure_future(_wait_for_disconnect(raw))
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(gone)
                if gone in done:
                    return None
                for t in done:
                    if t.exception() is not None:
                        raise self._engine_error(t.exception(), job)
        finally:
            for t in tasks | {gone}:
                t.cancel()
        return finals

    async def _merged(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all of a job's streams, as they arrive."""
        if len(job.streams) == 1:
            async for out in job.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream):
            try:
                async for out in s:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(job.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def _sse(self, job: _Job) -> AsyncIterator[str]:
        """The server-sent events of a streamed job. Cancelled (client gone) -> the finally aborts."""
        n = job.params.n
        choices: dict[int, _Choice] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            if job.kind == "chat":
                for j in range(n):  # OpenAI's first chunk of each choice carries only the role
                    yield _sse(self._chunk(job, [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]))
            async for i, out in self._merged(job):
                finals[i] = out
                for completion in out.outputs:
                    completion = self._view(job, completion)
                    idx = i * n + completion.index
                    choice = choices.setdefault(idx, _Choice(idx))
                    if choice.finished:
                        continue
                    echo = job.echo and not choice.started  # the prompt goes first, in the first chunk
                    if echo:
                        text, logprobs = self._echo(job, i, out)
                        choice.text_offset = len(text)
                    delta = self._delta(job, choice, completion, force=echo)
                    if delta is None:
                        continue
                    if echo:
                        delta["text"] = text + delta["text"]
                        delta["logprobs"] = _join_logprobs(logprobs, delta["logprobs"])
                    choice.started = True
                    yield _sse(self._chunk(job, [delta]))
            if job.include_usage:
                yield _sse(self._chunk(job, [], usage=self._usage(job, [finals[i] for i in sorted(finals)])))
        except (EngineRequestError, InvalidRequestError) as e:
            yield _sse(self._engine_error(e, job).body())
        finally:
            self._abort(job)
        yield "data: [DONE]\n\n"

    def _request_error(self, job: _Job, e: InvalidRequestError) -> APIError:
        err = APIError.from_invalid_request(e)
        if job.chat is not None and job.chat.grammar_from_tools and err.param == "response_format":
            err.param = "tools"  # the grammar that failed is the tools' schema
        return err

    def _engine_error(self, e: BaseException, job: _Job | None = None) -> APIError:
        if isinstance(e, InvalidRequestError):  # the engine failed the request for its own input
            return self._request_error(job, e) if job is not None else APIError.from_invalid_request(e)
        # Once the server aborts what still runs at shutdown, every engine error is that abort.
        return _shutting_down() if self.aborting else APIError(str(e), status=500, type="server_error")

    def _delta(self, job: _Job, choice: _Choice, c: CompletionOutput, force: bool = False) -> dict | None:
        """The chunk choice for what is new in `c` since the last chunk, or None if nothing is."""
        new_text = c.text[choice.text_sent:]
        new_tokens = len(c.token_ids) - choice.tokens_sent
        finished = c.finish_reason is not None
        want_logprobs = job.params.logprobs is not None and new_tokens > 0
        delta = None
        if job.kind == "chat":  # the text read as reasoning, content and tool calls (held back while undecided)
            if choice.parser is None:
                choice.parser = job.chat.output_parser()
            delta = choice.parser.feed(new_text, final=finished).to_openai()
            new_text = ""
        choice.text_sent = len(c.text)
        if not new_text and not delta and not finished and not want_logprobs and not force:
            return None
        logprobs = None
        if want_logprobs:
            if job.kind == "chat":
                logprobs = _chat_logprobs(c, choice.tokens_sent, job.params.logprobs)
            else:
                logprobs, choice.text_offset = _completion_logprobs(c, choice.tokens_sent, job.params.logprobs,
                                                                     choice.text_offset)
        choice.tokens_sent, choice.finished = len(c.token_ids), finished
        reason = _finish_reason(c)
        stop_reason = c.stop_reason if finished else None
        if job.kind == "chat":
            if reason == "stop" and choice.parser.num_calls:
                reason = "tool_calls"
            return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                    "stop_reason": stop_reason}
        return {"index": choice.index, "text": new_text, "logprobs": logprobs, "finish_reason": reason,
                "stop_reason": stop_reason}

    def _chunk(self, job: _Job, choices: list[dict], usage: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        chunk = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices}
        if job.include_usage:
            chunk["usage"] = usage
        return chunk

    def _full_response(self, job: _Job, finals: list[RequestOutput]) -> dict:
        n = job.params.n
        choices = []
        for i, out in enumerate(finals):
            for c in sorted((self._view(job, c) for c in out.outputs), key=lambda c: c.index):
                index = i * n + c.index
                if job.kind == "chat":
                    logprobs = _chat_logprobs(c, 0, job.params.logprobs) if job.params.logprobs is not None else None
                    message, reason = _chat_message(job.chat.output_parser().extract(c.text), _finish_reason(c))
                    choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                                    "stop_reason": c.stop_reason})
                else:
                    prefix, prefix_logprobs = self._echo(job, i, out) if job.echo else ("", None)
                    k = job.params.logprobs
                    logprobs = _completion_logprobs(c, 0, k, len(prefix))[0] if k is not None else None
                    choices.append({"index": index, "text": prefix + c.text,
                                    "logprobs": _join_logprobs(prefix_logprobs, logprobs),
                                    "finish_reason": _finish_reason(c), "stop_reason": c.stop_reason})
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
                "usage": self._usage(job, finals)}

    def _usage(self, job: _Job, finals: list[RequestOutput]) -> dict:
        prompt = sum(len(p["prompt_token_ids"]) for p in job.prompts)
        completion = sum(len(self._view(job, c).token_ids) for out in finals for c in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _view(self, job: _Job, c: CompletionOutput) -> CompletionOutput:
        """A completion as the client sees it: without the token a prompt-only request generated, or
        without the stop token's text where special tokens were kept for the tool parser."""
        if job.prompt_only:
            return dataclasses.replace(c, text="", token_ids=[], cumulative_logprob=None,
                                       logprobs=[] if c.logprobs is not None else None, stop_reason=None,
                                       finish_reason=None if c.finish_reason is None else "length")
        if job.chat is not None and job.chat.strip_stop_text and c.finish_reason == "stop" \
                and isinstance(c.stop_reason, int):
            stop_text = self.tokenizer.decode([c.stop_reason], skip_special_tokens=False)
            if stop_text and c.text.endswith(stop_text):
                return dataclasses.replace(c, text=c.text[:-len(stop_text)])
        return c

    def _echo(self, job: _Job, i: int, out: RequestOutput) -> tuple[str, dict | None]:
        """Prompt i's text, and with logprobs its legacy logprobs object (the first token has none)."""
        prompt = job.prompts[i]
        ids = prompt["prompt_token_ids"]
        text = prompt["prompt"]
        if text is None:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        k = job.params.logprobs
        if k is None:
            return text, None
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        entries = out.prompt_logprobs or [None] * len(ids)
        offsets = [sum(len(t) for t in tokens[:p]) for p in range(len(tokens))]
        return text, {
            "tokens": tokens, "text_offset": offsets,
            "token_logprobs": [None if e is None else _lp(e[t].logprob) for t, e in zip(ids, entries)],
            "top_logprobs": [None if e is None else _top_dict(e, t, k) for t, e in zip(ids, entries)],
        }


class _AbortingStreamingResponse(StreamingResponse):
    """A StreamingResponse that aborts its requests however it ends: finished, client gone, or
    cancelled before the body generator ever started (whose own `finally` would then never run)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# -- helpers ------------------------------------------------------------------------------------------

def _shutting_down() -> APIError:
    return APIError("the server is shutting down; retry on another instance or after it restarts", status=503,
                    type="server_error", code="server_shutting_down")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finish_reason(c: CompletionOutput) -> str | None:
    # "abort" only reaches a client when the engine failed the request, which is reported as an error.
    return None if c.finish_reason is None else ("length" if c.finish_reason == "length" else "stop")


def _chat_message(parsed, reason: str | None) -> tuple[dict, str | None]:
    """OpenAI's assistant message for a parsed output, and the finish reason ("tool_calls" when it
    made calls and stopped on its own; a call cut off by max_tokens keeps "length"). Content is null
    when there is none beside calls or reasoning, as vLLM sends it."""
    content = parsed.content or (None if parsed.tool_calls or parsed.reasoning else "")
    message: dict = {"role": "assistant", "content": content}
    if parsed.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        if reason == "stop":
            reason = "tool_calls"
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning or None
    return message, reason


def _lp(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


def _ranked(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    """The top-k alternatives of a position, most likely first (the engine marks them rank 1..k)."""
    return sorted((lp for lp in entry.values() if 1 <= lp.rank <= k), key=lambda lp: lp.rank)


def _chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        chosen = entry[tid]
        token = chosen.decoded_token or ""
        content.append({
            "token": token, "logprob": _lp(chosen.logprob), "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": _lp(lp.logprob),
                              "bytes": list((lp.decoded_token or "").encode("utf-8"))} for lp in _ranked(entry, k)],
        })
    return {"content": content}


def _top_dict(entry: dict[int, Logprob], token_id: int, k: int) -> dict[str, float]:
    top = {lp.decoded_token or "": _lp(lp.logprob) for lp in _ranked(entry, k)}
    chosen = entry[token_id]
    top.setdefault(chosen.decoded_token or "", _lp(chosen.logprob))  # vLLM's convention: the chosen token is listed
    return top


def _completion_logprobs(c: CompletionOutput, start: int, k: int, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object for tokens [start:], and the text offset after them."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        token = entry[tid].decoded_token or ""
        tokens.append(token)
        token_logprobs.append(_lp(entry[tid].logprob))
        top_logprobs.append(_top_dict(entry, tid, k))
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}, offset


def _join_logprobs(first: dict | None, second: dict | None) -> dict | None:
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


async def _wait_for_disconnect(raw: Request) -> None:
    """Returns once the client has closed the connection (the body was already read)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # an empty trailing body message: don't spin on it
