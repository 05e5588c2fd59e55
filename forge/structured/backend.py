"""xgrammar glue: one tokenizer description and grammar compiler per engine, one matcher per sequence.

How a step uses it:

* `add_request` compiles the request's spec once (`StructuredBackend.compile`, cached by the spec's
  canonical text) and gives each sequence its own `Matcher` (an `xgrammar.GrammarMatcher`).
* After every accepted token (and when it is made) a matcher queues itself for its next mask. One
  background thread drains that queue, filling whole groups of matchers at once with xgrammar's
  batched filler (C++ threads, GIL released), while the engine finishes the step, schedules the
  next one and the model runs its forward pass.
* `apply` (before sampling) waits for those rows, copies them into the batch bitmask and sets the
  disallowed logits of the constrained rows to -inf, on the logits' device (xgrammar's CPU kernel,
  or its Triton kernel on CUDA). Unconstrained rows are not touched.

The overlap is on by default on a GPU, and on the CPU when torch leaves a core free
(`_overlap_default`); otherwise, or with FORGE_STRUCTURED_OVERLAP=0 (or `backend.overlap = False`),
the masks are filled in the engine's thread at apply time by xgrammar's batched filler (on a GPU
that still overlaps the forward pass, which runs asynchronously until sampling).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
import xgrammar as xgr

from forge.errors import InvalidRequestError
from forge.sampling_params import StructuredOutputsParams

logger = logging.getLogger("forge")

PARAM = "response_format"  # the request field that errors name (the offline API's is structured_outputs)
_CACHE_ENTRIES = 256
# Threads of xgrammar's batched mask filler (its C++ pool); "auto" = half the hardware threads.
_FILL_THREADS = int(os.environ.get("FORGE_STRUCTURED_FILL_THREADS", "0")) or "auto"  # compiled grammars kept per engine (least recently used dropped first)
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
    """Prefetch masks on a background thread? Yes on a GPU (the CPU idles during the forward pass);
    on the CPU only when a core is left over from torch's threads: a busy extra thread on cores the
    forward pass fully uses stalls its OpenMP regions. FORGE_STRUCTURED_OVERLAP=0/1 decides."""
    env = os.environ.get("FORGE_STRUCTURED_OVERLAP")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    return device.startswith("cuda") or (os.cpu_count() or 1) > torch.get_num_threads()


# -- the per-engine backend -----------------------------------------------------------------------------


class StructuredBackend:
    """Everything structured decoding keeps per engine: tokenizer info, compiler, grammar cache,
    the prefetch thread and the host bitmask buffer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, device: str = "cpu"):
        self.vocab_size = vocab_size
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        threads = max(1, min(8, os.cpu_count() or 1))
        # Our own LRU cache below is keyed by the whole spec; xgrammar's would be unbounded.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.overlap = _overlap_default(device)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Matcher] = []
        self._pending_lock = threading.Lock()
        self._draining = False
        self._fillers: list[xgr.BatchGrammarMatcher | None] = [None, None]
        self.bitmask_width = xgr.get_bitmask_shape(1, vocab_size)[1]
        self._host_bitmask: torch.Tensor | None = None
        self._pin = device.startswith("cuda") and torch.cuda.is_available()
        self._cuda_backend = "triton" if importlib.util.find_spec("triton") is not None else "torch_native"
        # Counters for benchmarks: grammars compiled, seconds spent compiling / filling / in apply.
        self.stats = {"compiled": 0, "cache_hits": 0, "compile_s": 0.0, "fill_s": 0.0, "apply_s": 0.0,
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

    # -- filling ----------------------------------------------------------------------------------
    def fill(self, matchers: list["Matcher"], bitmask: torch.Tensor, rows: list[int], background=False) -> None:
        """Fill bitmask[rows[j]] with the next-token mask of matchers[j], all at once."""
        t0 = time.perf_counter()
        if len(matchers) == 1:
            matchers[0].xgr_matcher.fill_next_token_bitmask(bitmask, rows[0])
        else:
            # One batched filler per calling thread (the engine's and the background one).
            k = int(background)
            if self._fillers[k] is None:
                self._fillers[k] = xgr.BatchGrammarMatcher(_FILL_THREADS)
            self._fillers[k].batch_fill_next_token_bitmask([m.xgr_matcher for m in matchers], bitmask, rows)
        self.stats["fill_s"] += time.perf_counter() - t0

    def schedule_fill(self, matcher: "Matcher") -> None:
        """Queue a matcher's next mask for the background thread. The engine accepts a whole batch
        of tokens in a row, so the thread usually picks up many matchers and fills them together."""
        with self._pending_lock:
            self._pending.append(matcher)
            if self._draining:
                return
            self._draining = True
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-structured")
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            rows = torch.empty((len(batch), self.bitmask_width), dtype=torch.int32)
            try:
                self.fill(batch, rows, list(range(len(batch))), background=True)
                ok = True
            except Exception:  # leave them unfilled: apply() fills them itself and reports the error
                logger.exception("structured outputs: background mask fill failed")
                ok = False
            for j, m in enumerate(batch):
                m._prefetched(rows[j : j + 1] if ok else None)

    def _bitmask(self, rows: int) -> torch.Tensor:
        buf = self._host_bitmask
        if buf is None or buf.shape[0] < rows:
            size = max(rows, 2 * buf.shape[0] if buf is not None else 64)
            buf = torch.full((size, self.bitmask_width), -1, dtype=torch.int32)
            if self._pin:
                buf = buf.pin_memory()
            self._host_bitmask = buf
        return buf[:rows]

    def apply(self, logits: torch.Tensor, seqs, rows: list[int]) -> torch.Tensor:
        """Set logits[i, t] = -inf for every constrained row i and every token t its grammar forbids."""
        start = time.perf_counter()
        n = logits.shape[0]
        bitmask = self._bitmask(n)
        done_rows, done_masks, late = [], [], []
        for i in rows:
            mask = seqs[i].structured.prefetched()
            if mask is None:
                late.append(i)
            else:
                done_rows.append(i)
                done_masks.append(mask)
        if len(done_rows) == 1:
            bitmask[done_rows[0]].copy_(done_masks[0][0])
        elif done_rows:
            bitmask[torch.tensor(done_rows)] = torch.cat(done_masks)
        if late:  # not prefetched (overlap off, or a first step): fill them here, all at once
            self.fill([seqs[i].structured for i in late], bitmask, late)
        indices = None if len(rows) == n else rows
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=indices)
        else:
            dev_mask = bitmask.to(logits.device, non_blocking=True)
            try:
                xgr.apply_token_bitmask_inplace(logits, dev_mask, vocab_size=self.vocab_size, indices=indices,
                                                backend=self._cuda_backend)
            except Exception as e:  # e.g. Triton cannot build its kernel here: plain torch ops do the same
                if self._cuda_backend == "torch_native":
                    raise
                logger.warning("structured outputs: %s bitmask kernel failed (%s); using torch ops",
                               self._cuda_backend, _clean_error(e))
                self._cuda_backend = "torch_native"
                xgr.apply_token_bitmask_inplace(logits, dev_mask, vocab_size=self.vocab_size, indices=indices,
                                                backend="torch_native")
        if logits.shape[-1] > self.vocab_size:  # padded logits beyond the tokenizer's vocabulary
            logits[rows if indices is not None else slice(None), self.vocab_size:] = float("-inf")
        self.stats["masked_rows"] += len(rows)
        self.stats["apply_s"] += time.perf_counter() - start
        return logits

    def shutdown(self) -> None:
        """Stop the background thread (after it finishes the fills already queued)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class Matcher:
    """One sequence's grammar state: accepts the tokens it generates and says which may come next."""

    def __init__(self, backend: StructuredBackend, compiled: xgr.CompiledGrammar):
        self.backend = backend
        self.xgr_matcher = xgr.GrammarMatcher(compiled)
        self._terminated = False
        self._rejected: int | None = None
        self._row: torch.Tensor | None = None  # [1, W]: the prefetched mask of the current state
        self._event = threading.Event()
        self._scheduled = False  # a background fill was queued (wait for it before touching the matcher)
        self.num_accepted = 0
        self._prefetch()

    # -- the engine's interface ----------------------------------------------------------------------
    def accept(self, token: int) -> bool:
        """Advance past a generated token. A token the grammar forbids (which masking prevents)
        ends the sequence: `is_terminated()` turns true."""
        self._wait()
        if self._terminated:
            return False
        ok = self.xgr_matcher.accept_token(int(token))
        if not ok:
            self._rejected = int(token)
            self._terminated = True
            logger.warning("structured outputs: token %d is not allowed by the grammar; ending the sequence", token)
            return False
        self.num_accepted += 1
        self._terminated = self.xgr_matcher.is_terminated()
        if not self._terminated:
            self._prefetch()
        return True

    def is_terminated(self) -> bool:
        """True once the grammar has ended (it accepted a stop token) or a token was rejected."""
        return self._terminated

    def is_completed(self) -> bool:
        """True when the grammar may end here (the next token may be a stop token)."""
        self._wait()
        return self._terminated or self.xgr_matcher.is_completed()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-next-token bitmask into bitmask[row] (int32, xgrammar's layout)."""
        mask = self.prefetched()
        if mask is None:
            self.xgr_matcher.fill_next_token_bitmask(bitmask, row)
        else:
            bitmask[row].copy_(mask[0])

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (e.g. rejected speculative tokens)."""
        self._wait()
        if num_tokens <= 0:
            return
        self.xgr_matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens
        self._terminated = self.xgr_matcher.is_terminated()
        self._rejected = None
        self._prefetch()

    # -- prefetching -------------------------------------------------------------------------------
    def _prefetch(self) -> None:
        self._row = None
        if not self.backend.overlap or self._terminated:
            return
        self._event.clear()
        self._scheduled = True
        self.backend.schedule_fill(self)

    def _prefetched(self, row: torch.Tensor | None) -> None:  # called by the background thread
        self._row = row
        self._event.set()

    def _wait(self) -> None:
        if self._scheduled:
            if not self._event.is_set():
                t0 = time.perf_counter()
                self._event.wait()
                self.backend.stats["wait_s"] += time.perf_counter() - t0
            self._scheduled = False

    def prefetched(self) -> torch.Tensor | None:
        """The [1, W] mask the background thread computed for the current state (None: not there)."""
        self._wait()
        return self._row

    def __repr__(self) -> str:
        return f"Matcher(accepted={self.num_accepted}, terminated={self._terminated})"
