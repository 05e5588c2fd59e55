"""xgrammar glue: one tokenizer description and grammar compiler per engine, one matcher per sequence.

How a step uses it:

* A spec is compiled once (cached by its canonical text) before its request is scheduled: the
  server compiles it off the engine thread (`compile_in_background`: a worker thread, after a helper
  process has shown that it compiles within the time limit, forge/structured/compile_check.py), the
  offline API at `add_request` (`compile`). Either way a spec that is too large, invalid, or matches no
  text at all (`root ::= root "a"`) is an InvalidRequestError. Each sequence gets its own `Matcher`
  (an `xgrammar.GrammarMatcher`).
* Limits (constructor arguments, defaults below): the spec's canonical text at most MAX_SPEC_BYTES;
  a compile at most COMPILE_TIMEOUT_S (server path); compiled grammars kept in the cache at most
  CACHE_BYTES in all, by xgrammar's own `memory_size_bytes` (least recently used dropped first).
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
* A fill that fails for a sequence (its grammar cannot take its token, or leaves no token allowed: a
  rule that can never end) raises forge.errors.RequestFailure naming that sequence's request, which
  the engine fails alone.

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
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import xgrammar as xgr

from forge.errors import InvalidRequestError, RequestFailure
from forge.kernels.token_bitmask import apply_token_bitmask
from forge.sampling_params import StructuredOutputsParams
from forge.tokenizer import Tokenizer

logger = logging.getLogger("forge")

PARAM = "response_format"  # the request field that errors name (the offline API's is structured_outputs)
# Limits (StructuredBackend's defaults). A spec's canonical text (regex, grammar, schema JSON, choices
# JSON) may be 64 KiB: far above real schemas, and compiled, at most tens of MiB (a 64 KiB literal
# regex: 17 MiB; 7,000 `[a-z0-9]` classes: 43 MiB).
MAX_SPEC_BYTES = 64 * 1024
COMPILE_TIMEOUT_S = 10.0  # per compile, on the server's path
CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse, by xgrammar's memory_size_bytes
COMPILE_WORKERS = 2  # the server's compile threads (and helper processes); more specs wait
_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice list",
         "grammar": "grammar"}
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


def build_tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, `vocab_size` rows wide (the model's logits width).

    Special added tokens (<|im_start|>, <repo_name>, ...) are given empty text so that no grammar
    ever produces them (their text would otherwise count as ordinary characters inside a JSON
    string, and then vanish from the detokenized output). Stop tokens stay allowed exactly where
    the grammar may end.
    """
    hf_tok = tokenizer.backend_tokenizer
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


def check_spec_size(key: tuple[str, str], max_bytes: int) -> None:
    """Reject a spec whose canonical text is over `max_bytes` (before anything compiles it)."""
    kind, text = key
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequestError(f"the {_WHAT[kind]} is {size:,} bytes; the limit is {max_bytes:,} bytes",
                                  param=PARAM)


def compile_spec(compiler: xgr.GrammarCompiler, kind: str, text: str) -> xgr.CompiledGrammar:
    """Compile a spec (a spec_key) and check that it can produce output; InvalidRequestError if not."""
    what = _WHAT[kind]
    try:
        if kind == "json":
            _check_schema(json.loads(text))
            compiled = compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        elif kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(text)
        elif kind == "choice":
            compiled = compiler.compile_grammar(_choice_grammar(json.loads(text)))
        else:
            compiled = compiler.compile_grammar(text)
    except InvalidRequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError (or its own types) naming the problem
        raise InvalidRequestError(f"invalid {what}: {_clean_error(e)}", param=PARAM) from None
    # xgrammar compiles grammars that match no text at all (`root ::= root "a"`, rules that only
    # refer to each other); their first mask allows nothing, which would leave the sampler no token.
    first = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first)
    if not _rows_allowing_something(first, compiled.tokenizer_info.vocab_size).all():
        raise InvalidRequestError(f"invalid {what}: it matches no text (a rule never ends, as in root ::= root \"a\")",
                                  param=PARAM)
    return compiled


def _rows_allowing_something(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per row of an xgrammar bitmask: does it allow any token below vocab_size?"""
    words, rest = divmod(vocab_size, 32)
    allowed = (bitmask[:, :words] != 0).any(dim=1)
    if rest:
        allowed |= (bitmask[:, words] & ((1 << rest) - 1)) != 0
    return allowed


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
    """Everything structured decoding keeps per engine: tokenizer info, compiler, grammar cache, the
    compile workers, the mask-fill thread and the (pinned, on a GPU) host buffer the step's masks are
    filled into. The limits default to the module's constants.

    Its inputs are explicit: the model's tokenizer, the logits' width (`vocab_size`, which may exceed
    the tokenizer's vocabulary), the token ids that end a grammar, and the device the logits are on."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids, device: str = "cpu", *,
                 max_spec_bytes: int = MAX_SPEC_BYTES, cache_bytes: int = CACHE_BYTES,
                 compile_timeout_s: float = COMPILE_TIMEOUT_S, compile_workers: int = COMPILE_WORKERS):
        self.vocab_size = vocab_size
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.stop_token_ids = frozenset(self.tokenizer_info.stop_token_ids)  # the tokens that end a grammar
        self.compile_threads = max(1, min(8, os.cpu_count() or 1))
        # Our own cache below (xgrammar's is off): keyed by the canonical spec, bounded in bytes, and seen
        # by compile_in_background, where a hit skips the workers and the time-limit check.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=self.compile_threads, cache_enabled=False)
        self.max_spec_bytes = max_spec_bytes
        self.cache_bytes = cache_bytes
        self.compile_timeout_s = compile_timeout_s
        self.compile_workers = compile_workers
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.cached_bytes = 0  # memory_size_bytes of the cached grammars, in all
        self._compiling: dict[tuple[str, str], Future] = {}  # key -> the background compile under way
        self._compile_pool: ThreadPoolExecutor | None = None
        self._checker = None  # forge.structured.compile_check.CompileChecker, made on first use
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
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_s": 0.0, "checked": 0, "check_s": 0.0, "accept_s": 0.0,
                      "fill_s": 0.0, "parallel_fills": 0, "apply_s": 0.0, "wait_s": 0.0, "masked_rows": 0}

    # -- compiling ------------------------------------------------------------------------------
    def key(self, spec: StructuredOutputsParams) -> tuple[str, str]:
        """The spec's cache key (kind, canonical text); InvalidRequestError if it is malformed or too large."""
        key = spec_key(spec)
        check_spec_size(key, self.max_spec_bytes)
        return key

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Compile (or find in the cache) in the calling thread, without a time limit: the offline API's path."""
        key = self.key(spec)
        hit = self._cached(key)
        if hit is not None:
            return hit
        return self._compile(key)

    def compile_in_background(self, spec: StructuredOutputsParams) -> Future:
        """Compile (or find in the cache) in a compile worker, within the time limit: the server's path.
        The future's exception is an InvalidRequestError when the spec is too large, invalid, matches no
        text or did not compile within compile_timeout_s."""
        done = Future()
        try:  # a cache hit (or a malformed spec) is answered at once, never queued behind slow compiles
            key = self.key(spec)
            hit = self._cached(key)
        except InvalidRequestError as e:
            done.set_exception(e)
            return done
        if hit is not None:
            done.set_result(hit)
            return done
        with self._lock:
            if self._compile_pool is None:
                self._compile_pool = ThreadPoolExecutor(self.compile_workers, thread_name_prefix="forge-grammar")
        return self._compile_pool.submit(self._compile_bounded, key)

    def _compile_bounded(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cached(key, locked=True)
            if hit is not None:
                return hit
            running = self._compiling.get(key)  # the same new spec from several requests compiles once
            if running is None:
                mine = self._compiling[key] = Future()
        if running is not None:
            return running.result()
        try:
            self._check(key)
            compiled = self._compile(key)
            mine.set_result(compiled)
            return compiled
        except BaseException as e:
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._compiling[key]

    def _check(self, key: tuple[str, str]) -> None:
        """Compile the spec in a helper process that is killed at the time limit (compile_check.py)."""
        from forge.structured.compile_check import CheckerUnavailable, CompileChecker

        with self._lock:
            if self._checker is None:
                self._checker = CompileChecker(self.tokenizer_info, self.compile_timeout_s, self.compile_workers,
                                               self.compile_threads)
        start = time.perf_counter()
        try:
            self._checker.check(*key, what=_WHAT[key[0]])
        except CheckerUnavailable as e:
            logger.warning("grammar compiles run without their time limit: %s", e)
            return
        with self._lock:
            self.stats["checked"] += 1
            self.stats["check_s"] += time.perf_counter() - start

    def _compile(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        start = time.perf_counter()
        compiled = compile_spec(self.compiler, *key)
        with self._lock:
            self.stats["compiled"] += 1
            self.stats["compile_s"] += time.perf_counter() - start
            self._store(key, compiled)
        return compiled

    def _cached(self, key: tuple[str, str], locked: bool = False) -> xgr.CompiledGrammar | None:
        if not locked:
            with self._lock:
                return self._cached(key, locked=True)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.stats["cache_hits"] += 1
        return hit

    def _store(self, key: tuple[str, str], compiled: xgr.CompiledGrammar) -> None:
        """Cache a compiled grammar, dropping the least recently used ones beyond cache_bytes (one
        larger than the whole budget is used by its request, never kept). Call with the lock held."""
        size = compiled.memory_size_bytes
        if key in self._cache or size > self.cache_bytes:
            return
        self._cache[key] = compiled
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self.cached_bytes -= dropped.memory_size_bytes

    def matcher(self, spec: StructuredOutputsParams, compiled: xgr.CompiledGrammar | None = None) -> "Matcher":
        """A fresh matcher for one sequence, from `compiled` when the caller compiled the spec already."""
        return Matcher(self, compiled if compiled is not None else self.compile(spec))

    # -- one step's masks ---------------------------------------------------------------------------
    def begin_step(self, seqs) -> "StepMasks | None":
        """Start the masks of a step's sampled sequences (None when none is constrained). Call it
        before the forward pass: with `overlap` on, the worker thread fills them meanwhile."""
        # A terminated grammar has no next mask (async scheduling still samples such a row once).
        rows = [i for i, s in enumerate(seqs) if s.structured is not None and not s.structured.is_terminated()]
        if not rows:
            return None
        self.finish_in_flight()
        step = StepMasks(self, [seqs[i].structured for i in rows], rows, self._bitmask(len(rows)),
                         [seqs[i].request_id for i in rows])
        if self.overlap:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-structured")
            step.future = self._worker.submit(self._fill, step)
            self._in_flight = step
        return step

    def begin_verify_step(self, seqs, drafts: list[list[int]]) -> "StepMasks | None":
        """The masks of a verify step (forge.spec_decode), whose rows are each sampled sequence's
        1 + len(drafts[i]) positions in turn: a constrained sequence's row j gets the mask after its
        first j drafts. Filled when applied, on the engine's thread."""
        first_rows, row = [], 0
        for d in drafts:
            first_rows.append(row)
            row += 1 + len(d)
        constrained = [i for i, s in enumerate(seqs) if s.structured is not None and not s.structured.is_terminated()]
        if not constrained:
            return None
        self.finish_in_flight()
        rows = [first_rows[i] + j for i in constrained for j in range(1 + len(drafts[i]))]
        step = StepMasks(self, [seqs[i].structured for i in constrained], rows, self._bitmask(len(rows)),
                         [seqs[i].request_id for i in constrained])
        step.drafts = [drafts[i] for i in constrained]
        return step

    def _fill_along_drafts(self, step: "StepMasks") -> None:
        failed, row = {}, 0
        for m, drafts, request_id in zip(step.matchers, step.drafts, step.request_ids):
            try:
                m._catch_up()
                m.fill_masks_along(drafts, step.host, row)
            except Exception as e:
                failed[request_id] = e
            row += 1 + len(drafts)
        if failed:
            raise RequestFailure(failed)
        dead_ends = (~_rows_allowing_something(step.host, self.vocab_size)).nonzero().flatten().tolist()
        if dead_ends:
            owners = [rid for rid, d in zip(step.request_ids, step.drafts) for _ in range(1 + len(d))]
            raise RequestFailure({owners[j]: InvalidRequestError(
                "the grammar allows no next token (it has a rule that can never end)", param=PARAM) for j in dead_ends})

    def finish_in_flight(self) -> None:
        """Wait for a fill a failed step left behind: it writes into the buffer the next step reuses and
        advances the matchers the next step reads."""
        step, self._in_flight = self._in_flight, None
        if step is not None and step.future is not None:
            try:
                step.future.result()
            except Exception:  # it failed with its step; nothing is left to clean up
                pass

    def _fill(self, step: "StepMasks") -> None:
        """Advance each matcher past its pushed tokens, then host[j] = the next-token mask of
        matchers[j], all at once (xgrammar's batched filler, which releases the GIL, so the engine's
        Python runs on meanwhile when this is the worker thread). Raises RequestFailure naming the
        requests whose grammar failed or leaves no token allowed."""
        matchers, host = step.matchers, step.host
        t0 = time.perf_counter()
        failed = {}
        for m, request_id in zip(matchers, step.request_ids):
            try:
                m._catch_up()
            except Exception as e:  # xgrammar refused the matcher's state: only this request is affected
                failed[request_id] = e
        if failed:
            raise RequestFailure(failed)
        t1 = time.perf_counter()
        self.stats["accept_s"] += t1 - t0
        parallel = self._parallel_fills_left > 0 and len(matchers) > 1
        if parallel:
            self._parallel_fills_left -= 1
            self.stats["parallel_fills"] += 1
            if self._parallel_filler is None:
                self._parallel_filler = xgr.BatchGrammarMatcher(_FILL_THREADS)
        filler = self._parallel_filler if parallel else self._serial_filler
        try:
            filler.batch_fill_next_token_bitmask([m.xgr_matcher for m in matchers], host)
        except Exception:  # find the matcher(s) it failed on
            self._fill_one_by_one(step)
        elapsed = time.perf_counter() - t1
        if not parallel and elapsed > _SLOW_FILL_S and len(matchers) > 1:
            self._parallel_fills_left = _PARALLEL_FILLS
        self.stats["fill_s"] += elapsed
        dead_ends = (~_rows_allowing_something(host, self.vocab_size)).nonzero().flatten().tolist()
        if dead_ends:
            raise RequestFailure({step.request_ids[j]: InvalidRequestError(
                f"the grammar allows no next token after {matchers[j].num_accepted} generated tokens "
                f"(it has a rule that can never end)", param=PARAM) for j in dead_ends})

    @staticmethod
    def _fill_one_by_one(step: "StepMasks") -> None:
        failed = {}
        for j, (m, request_id) in enumerate(zip(step.matchers, step.request_ids)):
            try:
                m.xgr_matcher.fill_next_token_bitmask(step.host, j)
            except Exception as e:
                failed[request_id] = e
        if failed:
            raise RequestFailure(failed)

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
        if step.drafts is not None:
            self._fill_along_drafts(step)
        elif step.future is None:  # not overlapped: fill now (on a GPU the forward pass is still running)
            self._fill(step)
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
        """Stop the worker thread (after the fill in flight, if any), the compile workers and helpers."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)
        if self._checker is not None:
            self._checker.shutdown()


class StepMasks:
    """The masks of one step's constrained rows: `rows` index the step's sampled sequences,
    `host[j]` receives the mask of `matchers[j]`, which belongs to request `request_ids[j]`."""

    def __init__(self, backend: StructuredBackend, matchers: list["Matcher"], rows: list[int], host: torch.Tensor,
                 request_ids: list[str]):
        self.backend = backend
        self.matchers = matchers
        self.rows = rows
        self.host = host
        self.request_ids = request_ids
        self.future = None  # the worker's fill, when overlapped
        # A verify step (forge.spec_decode): each matcher's drafts; its rows are the masks after
        # 0 .. len(drafts) of them, consecutive from its first row.
        self.drafts: list[list[int]] | None = None

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

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (e.g. rejected speculative tokens)."""
        self._catch_up()
        if num_tokens <= 0:
            return
        self.xgr_matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens
        self._terminated = self.xgr_matcher.is_terminated()
        self._rejected = None

    # -- speculative decoding (forge.spec_decode) ---------------------------------------------------
    def valid_prefix_len(self, tokens: list[int]) -> int:
        """How many of `tokens` the grammar accepts in turn from here (up to one that ends it); the
        state is rolled back after."""
        self._catch_up()
        if self._terminated:
            return 0
        m, n = self.xgr_matcher, 0
        for token in tokens:
            if not m.accept_token(int(token)):
                break
            n += 1
            if m.is_terminated():
                break
        if n:
            m.rollback(n)
        return n

    def fill_masks_along(self, tokens: list[int], bitmask: torch.Tensor, first_row: int) -> None:
        """bitmask[first_row + j] = the next-token mask after the first j of `tokens` (j = 0 .. len),
        which the grammar must accept (valid_prefix_len); the state is rolled back after."""
        m = self.xgr_matcher
        accepted = 0
        try:
            for j, token in enumerate(tokens):
                m.fill_next_token_bitmask(bitmask, first_row + j)
                if not m.accept_token(int(token)):
                    raise RuntimeError(f"draft token {token} is not allowed by the grammar")
                accepted += 1
                if m.is_terminated():  # a stop token ends the grammar (and the drafts: it is their last)
                    break
            if m.is_terminated():
                # The rows after a draft stop token are never sampled from: if the target draws the
                # stop token the sequence ends there, if not, the drafts after it are rejected. The
                # matcher has no next mask to give (xgrammar raises): those rows allow everything.
                bitmask[first_row + accepted : first_row + len(tokens) + 1] = -1
            else:
                m.fill_next_token_bitmask(bitmask, first_row + len(tokens))
        finally:
            if accepted:
                m.rollback(accepted)

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
