"""xgrammar glue: one tokenizer description and grammar compiler per engine, one matcher per sequence.

How a step uses it:

* `add_request` compiles the request's spec once (`StructuredBackend.compile`, cached by the spec's
  canonical text) and gives each sequence its own `Matcher` (an `xgrammar.GrammarMatcher`).
* `begin_step` (before the forward pass) picks the constrained rows of the step. On the CPU with a
  spare core it hands their mask fill to a worker thread, which runs while the forward pass does.
* `StepMasks.apply` (after the forward pass is launched, before sampling) fills the masks in the
  engine's thread if the worker did not (on a GPU the forward pass is still running, so this
  overlaps it too) with xgrammar's batched filler, into one compact host buffer (pinned on a
  GPU), copies it to the logits' device and sets the forbidden logits of the constrained rows to
  -inf: forge's CUDA kernel (forge/kernels/token_bitmask.cu) on a GPU, torch ops on the CPU.
  Unconstrained rows are not touched.
* After sampling the engine hands each constrained sequence its token (`Matcher.push`); the
  grammar advances past it in the next step's fill, after that step's forward pass is launched.

FORGE_STRUCTURED_OVERLAP=0/1 (or `backend.overlap`) picks the worker thread or the in-thread fill;
the default follows the measurements in benchmarks/results/structured_*.json (`_overlap_default`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xgrammar as xgr

from forge.errors import InvalidRequestError
from forge.kernels.token_bitmask import apply_token_bitmask
from forge.sampling_params import StructuredOutputsParams

logger = logging.getLogger("forge")

PARAM = "response_format"  # the request field that errors name (the offline API's is structured_outputs)
_CACHE_ENTRIES = 256  # compiled grammars kept per engine (least recently used dropped first)
# Mask fills run on one thread while they are cheap (most grammar states cost microseconds a row:
# waking a thread pool costs more than it saves, and its spinning threads slow the engine's own
# Python, measured on the H200 host). When a one-thread fill takes longer than _SLOW_FILL_S
# (e.g. inside maxLength strings, ~ms a row in xgrammar 0.2.8) the next _PARALLEL_FILLS fills use
# xgrammar's pool of _FILL_THREADS threads ("auto" = half the hardware threads); then one thread
# is tried again.
_SLOW_FILL_S = 0.3e-3
_PARALLEL_FILLS = 8
_FILL_THREADS = int(os.environ.get("FORGE_STRUCTURED_FILL_THREADS", "0")) or "auto"
# xgrammar prefixes its errors with "[time] /path/file.cc:line: "; users need only the message.
_XGR_PREFIX = re.compile(r"^\s*\[[0-9:. ]+\]\s*\S+?:\d+:\s*")


def _clean_error(exc: BaseException) -> str:
    text = str(exc).strip()
    text = _XGR_PREFIX.sub("", text)
    return text.splitlines()[0].strip() if text else type(exc).__name__


# -- the tokenizer as xgrammar sees it ----------------------------------------------------------------


def _hf_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` inside forge's Tokenizer (or a bare one)."""
    for attr in ("_tok", "hf_tokenizer", "backend_tokenizer"):
        tok = getattr(tokenizer, attr, None)
        if tok is not None and hasattr(tok, "get_vocab"):
            return tok
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "to_str"):
        return tokenizer
    raise TypeError(f"cannot find the `tokenizers` object inside {type(tokenizer).__name__}")


def _vocab_metadata(hf_tok, vocab: dict[str, int]) -> tuple[xgr.VocabType, bool]:
    """(vocab type, add_prefix_space), detected like `xgrammar.TokenizerInfo.from_huggingface` does for
    a fast tokenizer: from the serialized tokenizer, overruled by the vocabulary's own evidence."""
    vocab_type, prefix = None, False
    try:
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(hf_tok.to_str())
        vocab_type, prefix = meta["vocab_type"], bool(meta["add_prefix_space"])
    except Exception:  # private helper: fall back to our own reading if its shape changes
        pass
    try:
        from_vocab = xgr.TokenizerInfo._detect_vocab_type_from_vocab(vocab)
    except Exception:
        from_vocab = None
    if from_vocab is not None and from_vocab != vocab_type:
        vocab_type = from_vocab
    if vocab_type is None:
        desc = json.loads(hf_tok.to_str())
        text = json.dumps(desc.get("decoder")) + json.dumps(desc.get("pre_tokenizer"))
        if '"ByteLevel"' in text:
            vocab_type = xgr.VocabType.BYTE_LEVEL
        elif "<0x0A>" in vocab:
            vocab_type = xgr.VocabType.BYTE_FALLBACK
        else:
            vocab_type = xgr.VocabType.RAW
    if vocab_type == xgr.VocabType.BYTE_LEVEL:
        prefix = False  # a byte-level vocab spells its spaces ("Ġ") in the tokens themselves
    return vocab_type, prefix


def build_tokenizer_info(tokenizer, vocab_size: int, stop_token_ids) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, `vocab_size` rows wide (the model's logits width).

    Special added tokens (<|im_start|>, <repo_name>, ...) are given empty text so that no grammar
    ever produces them (their text would otherwise count as ordinary characters inside a JSON
    string, and then vanish from the detokenized output). Stop tokens stay allowed exactly where
    the grammar may end.
    """
    hf_tok = _hf_tokenizer(tokenizer)
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, idx in vocab.items():
        if 0 <= idx < vocab_size:
            encoded[idx] = token
    stops = sorted(int(t) for t in stop_token_ids if 0 <= int(t) < vocab_size)
    try:
        added = hf_tok.get_added_tokens_decoder()
    except AttributeError:
        added = {}
    for idx, tok in added.items():
        if getattr(tok, "special", False) and idx < vocab_size and idx not in stops:
            encoded[idx] = ""
    vocab_type, prefix = _vocab_metadata(hf_tok, vocab)
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=stops or None,
                             add_prefix_space=prefix)


# -- specs ---------------------------------------------------------------------------------------------


def _choice_grammar(choices: list[str]) -> str:
    # GBNF string literals take JSON-style escapes; json.dumps escapes quotes, backslashes, controls.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def spec_key(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, canonical text): the compile cache's key. Raises InvalidRequestError for bad JSON text."""
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}", param=PARAM) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(
                f"a JSON schema must be an object (or a boolean), got {type(schema).__name__}", param=PARAM
            )
        # Property order is kept (it is the order the output writes them in), so no sort_keys.
        return "json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if spec.json_object:
        return "json_object", ""
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(list(spec.choice), ensure_ascii=False)
    if spec.grammar is not None:
        return "grammar", spec.grammar
    raise InvalidRequestError("structured outputs spec is empty", param=PARAM)


def _check_schema(schema) -> None:
    """Reject a schema that is not a valid JSON Schema (when `jsonschema` is installed)."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise InvalidRequestError(
            f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}", param=PARAM
        ) from None


def _overlap_default(device: str) -> bool:
    """Fill a step's masks on the worker thread (while the engine launches the forward pass) or in
    the engine's thread at sampling time? On a GPU the forward pass runs asynchronously, so the
    in-thread fill already overlaps it: off. On the CPU the forward pass holds the engine thread,
    so only a worker overlaps it, and only helps when a core is left over from torch's threads (a
    busy extra thread on cores the forward pass fully uses stalls its OpenMP regions).
    FORGE_STRUCTURED_OVERLAP=0/1 decides."""
    env = os.environ.get("FORGE_STRUCTURED_OVERLAP")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    if device.startswith("cuda"):
        return False
    return (os.cpu_count() or 1) > torch.get_num_threads()


# -- the per-engine backend -----------------------------------------------------------------------------


class StructuredBackend:
    """Everything structured decoding keeps per engine: tokenizer info, compiler, grammar cache,
    the worker thread and the (pinned, on a GPU) host buffer the step's masks are filled into."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, device: str = "cpu"):
        self.vocab_size = vocab_size
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.stop_token_ids = frozenset(self.tokenizer_info.stop_token_ids)  # the tokens that end a grammar
        threads = max(1, min(8, os.cpu_count() or 1))
        # Our own LRU cache below is keyed by the whole spec; xgrammar's would be unbounded.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.overlap = _overlap_default(device)
        self._worker: ThreadPoolExecutor | None = None
        self._serial_filler = xgr.BatchGrammarMatcher(1)
        self._parallel_filler: xgr.BatchGrammarMatcher | None = None  # made when a fill is first slow
        self._parallel_fills_left = 0
        self._in_flight: StepMasks | None = None
        self.bitmask_width = xgr.get_bitmask_shape(1, vocab_size)[1]
        self._host_bitmask: torch.Tensor | None = None  # [rows, words]: the masks of a step's constrained rows
        self._host_rows: torch.Tensor | None = None  # [rows]: which rows of the logits they belong to
        self._cuda = device.startswith("cuda") and torch.cuda.is_available()
        self._copy_done = None  # CUDA event: the last host->device copy out of the pinned buffer ended
        # Counters for benchmarks: grammars compiled, seconds spent compiling / filling / in apply.
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_s": 0.0, "accept_s": 0.0, "fill_s": 0.0, "parallel_fills": 0, "apply_s": 0.0,
                      "wait_s": 0.0, "masked_rows": 0}

    # -- compiling ------------------------------------------------------------------------------
    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        key = spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return hit
        start = time.perf_counter()
        compiled = self._compile(*key)
        with self._lock:
            self.stats["compiled"] += 1
            self.stats["compile_s"] += time.perf_counter() - start
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                "choice": "choice list", "grammar": "grammar"}[kind]
        try:
            if kind == "json":
                schema = json.loads(text)
                _check_schema(schema)
                return self.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "choice":
                return self.compiler.compile_grammar(_choice_grammar(json.loads(text)))
            return self.compiler.compile_grammar(text)
        except InvalidRequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError (or its own types) naming the problem
            raise InvalidRequestError(f"invalid {what}: {_clean_error(e)}", param=PARAM) from None

    def matcher(self, spec: StructuredOutputsParams) -> "Matcher":
        return Matcher(self, self.compile(spec))

    # -- one step's masks ---------------------------------------------------------------------------
    def begin_step(self, seqs) -> "StepMasks | None":
        """Start the masks of a step's sampled sequences (None when none is constrained). Call it
        before the forward pass: with `overlap` on, the worker thread fills them meanwhile."""
        # A terminated grammar has no next mask (async scheduling still samples such a row once).
        rows = [i for i, s in enumerate(seqs) if s.structured is not None and not s.structured.is_terminated()]
        if not rows:
            return None
        self._finish_in_flight()
        step = StepMasks(self, [seqs[i].structured for i in rows], rows, self._bitmask(len(rows)))
        if self.overlap:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-structured")
            step.future = self._worker.submit(self._fill, step.matchers, step.host)
            self._in_flight = step
        return step

    def _finish_in_flight(self) -> None:
        """Wait for a fill a failed step left behind: it writes into the buffer the next step reuses."""
        step, self._in_flight = self._in_flight, None
        if step is not None and step.future is not None:
            try:
                step.future.result()
            except Exception:  # it failed with its step; nothing is left to clean up
                pass

    def _fill(self, matchers: list["Matcher"], host: torch.Tensor) -> None:
        """Advance each matcher past its pushed tokens, then host[j] = the next-token mask of
        matchers[j], all at once (xgrammar's batched filler, which releases the GIL, so the engine's
        Python runs on meanwhile when this is the worker thread)."""
        t0 = time.perf_counter()
        for m in matchers:
            m._catch_up()
        t1 = time.perf_counter()
        self.stats["accept_s"] += t1 - t0
        parallel = self._parallel_fills_left > 0 and len(matchers) > 1
        if parallel:
            self._parallel_fills_left -= 1
            self.stats["parallel_fills"] += 1
            if self._parallel_filler is None:
                self._parallel_filler = xgr.BatchGrammarMatcher(_FILL_THREADS)
        filler = self._parallel_filler if parallel else self._serial_filler
        filler.batch_fill_next_token_bitmask([m.xgr_matcher for m in matchers], host)
        elapsed = time.perf_counter() - t1
        if not parallel and elapsed > _SLOW_FILL_S and len(matchers) > 1:
            self._parallel_fills_left = _PARALLEL_FILLS
        self.stats["fill_s"] += elapsed

    def _bitmask(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the host buffer, free to overwrite (the last copy out of it ended)."""
        buf = self._host_bitmask
        if buf is None or buf.shape[0] < rows:
            size = max(rows, 2 * buf.shape[0] if buf is not None else 64)
            buf = torch.empty((size, self.bitmask_width), dtype=torch.int32, pin_memory=self._cuda)
            self._host_bitmask = buf
            self._host_rows = torch.empty(size, dtype=torch.int32, pin_memory=self._cuda)
        elif self._copy_done is not None:
            self._copy_done.synchronize()  # normally long done: the step's tokens were read back since
        return buf[:rows]

    def _apply(self, logits: torch.Tensor, step: "StepMasks") -> torch.Tensor:
        start = time.perf_counter()
        if step.future is None:  # not overlapped: fill now (on a GPU the forward pass is still running)
            self._fill(step.matchers, step.host)
        else:
            t0 = time.perf_counter()
            step.future.result()  # a fill error surfaces here, failing the step
            self.stats["wait_s"] += time.perf_counter() - t0
            self._in_flight = None
        m = len(step.rows)
        rows = self._host_rows[:m]
        rows.copy_(torch.from_numpy(np.asarray(step.rows, dtype=np.int32)))
        if logits.device.type == "cuda":  # both host buffers are pinned: the copies are asynchronous
            bitmask = step.host.to(logits.device, non_blocking=True)
            rows = rows.to(logits.device, non_blocking=True)
            if self._copy_done is None:
                self._copy_done = torch.cuda.Event()
            self._copy_done.record()
            apply_token_bitmask(logits, bitmask, rows)
        else:
            apply_token_bitmask(logits, step.host, rows)
        self.stats["masked_rows"] += len(step.rows)
        self.stats["apply_s"] += time.perf_counter() - start
        return logits

    def shutdown(self) -> None:
        """Stop the worker thread (after the fill in flight, if any)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


class StepMasks:
    """The masks of one step's constrained rows: `rows` index the step's sampled sequences,
    `host[j]` receives the mask of `matchers[j]`."""

    def __init__(self, backend: StructuredBackend, matchers: list["Matcher"], rows: list[int], host: torch.Tensor):
        self.backend = backend
        self.matchers = matchers
        self.rows = rows
        self.host = host
        self.future = None  # the worker's fill, when overlapped

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the forbidden logits of the constrained rows to -inf (in place, on logits' device)."""
        return self.backend._apply(logits, self)


class Matcher:
    """One sequence's grammar state: takes the tokens it generates and says which may come next.

    The engine hands it each sampled token with `push`, which only records it: the grammar
    advances past it (`_catch_up`) just before the next mask fill, which runs after the next
    forward pass is launched, so the per-token parsing overlaps the GPU too. `accept` advances at
    once and says whether the grammar allowed the token.
    """

    def __init__(self, backend: StructuredBackend, compiled: xgr.CompiledGrammar):
        self.backend = backend
        self.xgr_matcher = xgr.GrammarMatcher(compiled)
        self._pending: list[int] = []  # pushed tokens the grammar has not advanced past yet
        self._terminated = False
        self._rejected: int | None = None
        self.num_accepted = 0

    # -- the engine's interface ----------------------------------------------------------------------
    def push(self, token: int) -> None:
        """Record a generated token. A stop token ends the grammar at once: the mask allows one only
        where the grammar may end, and accepting it there terminates the matcher."""
        if self._terminated:
            return
        self._pending.append(int(token))
        if token in self.backend.stop_token_ids:
            self._terminated = True

    def is_terminated(self) -> bool:
        """True once the grammar has ended (it took a stop token) or a token was rejected."""
        return self._terminated

    # -- exact, immediate use ------------------------------------------------------------------------
    def accept(self, token: int) -> bool:
        """Advance past `token` now; False (and the matcher terminated) if the grammar forbids it."""
        self._catch_up()
        if self._terminated:
            return False
        return self._advance(int(token))

    def is_completed(self) -> bool:
        """True when the grammar may end here (the next token may be a stop token)."""
        self._catch_up()
        return self._terminated or self.xgr_matcher.is_completed()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-next-token bitmask into bitmask[row] (int32, xgrammar's layout)."""
        self._catch_up()
        self.xgr_matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (e.g. rejected speculative tokens)."""
        self._catch_up()
        if num_tokens <= 0:
            return
        self.xgr_matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens
        self._terminated = self.xgr_matcher.is_terminated()
        self._rejected = None

    # -- internals ---------------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Advance the grammar past the pushed tokens."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._terminated = False  # push may have set it ahead of the grammar
        for token in pending:
            if not self._advance(token):
                return

    def _advance(self, token: int) -> bool:
        if not self.xgr_matcher.accept_token(token):
            # Masking makes this impossible for sampled tokens; if it happens, the sequence ends
            # (the engine sees is_terminated() after its next token).
            self._rejected = token
            self._terminated = True
            logger.warning("structured outputs: token %d is not allowed by the grammar; ending the sequence", token)
            return False
        self.num_accepted += 1
        self._terminated = self.xgr_matcher.is_terminated()
        return True

    def __repr__(self) -> str:
        return f"Matcher(accepted={self.num_accepted}, pending={len(self._pending)}, terminated={self._terminated})"
