"""Failure isolation: a step that raises fails only the request(s) that caused it; every other request
goes on and produces exactly the output it would have produced.

* Work done for particular requests says whose it was: sampling with a request's parameters (the
  sampler is wrapped by PerRequestSampler), its grammar's masks (forge.structured) and the checks of
  its new token (EngineCore._append_token) raise forge.errors.RequestFailure naming the request(s).
  Those fail at once.
* Any other exception does not say whose it is. The requests that took part in the failed step
  become suspects and are bisected: a step runs with only one half of them while every other request
  is held out of the scheduler, then with the other half; a half that fails again is split again, and
  a request that fails a step on its own is the cause. k bad requests among n cost about 2k·log2(n)
  extra steps, each of which still generates tokens for the requests in it. These trial steps run
  without async scheduling, so a failure always belongs to the step that raised it.
* After any failure the engine is put back as after a preemption: every running sequence recomputes
  its KV cache from its tokens and tokens sampled but not read back are dropped. The sampler's draws
  are a function of (sequence, output position), so the retried steps draw the same tokens.

A failed request comes out of `LLMEngine.step` as a finished RequestOutput whose `error` is the cause
(its completions' finish_reason is "error"): an InvalidRequestError when the request's own input was
at fault, any other exception for an internal error.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from forge.errors import InvalidRequestError, RequestFailure
from forge.outputs import RequestOutput
from forge.sequence import Sequence

logger = logging.getLogger("forge")


class FailureIsolation:
    """Runs the engine's steps; turns a step's exception into failed requests (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine  # the forge.engine.core.EngineCore whose steps these are
        self.trials: deque[set[str]] = deque()  # groups of suspect request ids; the first runs alone
        self.held: list[Sequence] = []  # sequences kept out of the scheduler while a trial runs

    @property
    def isolating(self) -> bool:
        """A trial is under way: steps run synchronously, with only the trial's requests."""
        return bool(self.trials)

    def has_held(self) -> bool:
        return any(not seq.is_finished for seq in self.held)

    def step(self, run_step, emit: str) -> list[RequestOutput]:
        """One engine step (`run_step(emit)`), with failures isolated."""
        trial = self._begin_trial()
        before = self._progress(trial) if trial else None
        try:
            outputs = run_step(emit)
        except Exception as exc:
            return self._recover(exc)
        if trial:
            self._end_trial(trial, before)
        return outputs

    # -- after a failure ----------------------------------------------------------------------------
    def _recover(self, exc: Exception) -> list[RequestOutput]:
        engine = self.engine
        participants = self._participants()
        outputs = engine.recover_after_failed_step()
        causes = self._blame(exc, participants)
        for request_id, cause in causes.items():
            out = engine.fail_request(request_id, cause)
            if out is not None:
                outputs.append(out)
        return outputs

    def _participants(self) -> set[str]:
        """The requests the failed step may have touched (a superset is fine: it only costs a split)."""
        engine = self.engine
        seqs = list(engine.scheduler.running)
        if engine.in_flight is not None:
            seqs += engine.in_flight.seqs
        ids = {s.request_id for s in seqs if not s.is_finished}
        if not ids:  # it failed before any sequence was running: the ones it was admitting
            ids = {s.request_id for s in engine.scheduler.waiting}
        return ids

    def _blame(self, exc: Exception, participants: set[str]) -> dict[str, BaseException]:
        """The requests to fail now; if the cause is not known yet, split the suspects into trials."""
        live = self.engine.requests
        if isinstance(exc, RequestFailure):
            named = {rid: cause for rid, cause in exc.causes.items() if rid in live}
            if named:
                logger.warning("failing request(s) %s: %s", ", ".join(named), _one_line(exc))
                return named
        suspects = sorted((rid for rid in participants if rid in live), key=lambda rid: live[rid].arrival_time)
        if len(suspects) <= 1:
            logger.error("engine step failed with one request in it (%s); failing it", suspects or "none",
                         exc_info=exc)
            return {rid: exc for rid in suspects}
        if self.trials:
            logger.warning("trial step with %d suspects failed: %s", len(suspects), _one_line(exc))
            untested = self.trials.popleft() - set(suspects)
        else:
            logger.error("engine step failed with %d requests in it; finding the cause by bisection",
                         len(suspects), exc_info=exc)
            untested = set()
        half = len(suspects) // 2
        groups = [set(suspects[:half]), set(suspects[half:])] + ([untested] if untested else [])
        self.trials.extendleft(reversed(groups))
        return {}

    # -- trials ------------------------------------------------------------------------------------
    def _begin_trial(self) -> set[str] | None:
        """Hold every sequence outside the first trial out of the scheduler; None when no trial is left."""
        live = self.engine.requests
        while self.trials:
            trial = {rid for rid in self.trials[0] if rid in live}
            if trial:
                self.trials[0] = trial
                break
            self.trials.popleft()
        if not self.trials:
            self._release()
            return None
        scheduler = self.engine.scheduler
        for seq in reversed(list(scheduler.running)):  # reversed: appendleft keeps their order
            if seq.request_id not in trial:
                scheduler.preempt(seq)  # its blocks go back to the pool: the trial has the whole cache
        waiting = list(scheduler.waiting)
        scheduler.waiting.clear()
        self.held += [s for s in waiting if s.request_id not in trial]
        scheduler.waiting.extend(s for s in self.held if s.request_id in trial and not s.is_finished)
        scheduler.waiting.extend(s for s in waiting if s.request_id in trial)
        self.held = [s for s in self.held if s.request_id not in trial and not s.is_finished]
        return trial

    def _progress(self, trial: set[str]) -> dict[str, tuple[int, int]]:
        """Per trial request: (tokens generated, tokens computed) over its sequences."""
        live = self.engine.requests
        return {rid: (sum(s.num_output_tokens for s in live[rid].seqs), sum(s.num_computed_tokens for s in live[rid].seqs))
                for rid in trial if rid in live}

    def _end_trial(self, trial: set[str], before: dict[str, tuple[int, int]]) -> None:
        """After a trial step that did not fail: requests that generated a token (or finished) in it
        are cleared; those still prefilling stay on trial."""
        after = self._progress(trial)
        cleared = {rid for rid in trial if rid not in after or after[rid][0] > before[rid][0]}
        moved = cleared or any(after[rid] != before[rid] for rid in after)
        remaining = trial - cleared
        if remaining and moved:
            self.trials[0] = remaining
        else:  # all cleared, or nothing could run (then there is nothing to learn from waiting)
            self.trials.popleft()
        if not self.trials:
            self._release()

    def _release(self) -> None:
        """Trials over: the held sequences go back to the front of the queue, in their order."""
        if self.held:
            self.engine.scheduler.waiting.extendleft(reversed([s for s in self.held if not s.is_finished]))
            self.held = []


class PerRequestSampler:
    """The engine's sampler, made to name the request whose row fails: when a batch raises, each row is
    sampled alone and the requests whose rows fail are a RequestFailure (the step is then retried
    without them; draws depend only on (sequence, position), so sampling a row twice changes nothing)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int] | None = None):
        # (offsets, a verify step's, only when given: the wrapped sampler may take (logits, seqs) alone)
        extra = (offsets,) if offsets is not None else ()
        try:
            return self.sampler.sample_async(logits, seqs, *extra)
        except Exception as exc:
            failed = {}
            for i, seq in enumerate(seqs):
                try:
                    self.sampler.sample_async(logits[i : i + 1], [seq], *((offsets[i : i + 1],) if extra else ())).results()
                except Exception as e:
                    failed[seq.request_id] = _sampling_cause(e, logits[i], seq)
            if not failed:
                raise
            raise RequestFailure(failed) from exc

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int] | None = None):
        return self.sample_async(logits, seqs, offsets).results()


def _sampling_cause(exc: Exception, row: torch.Tensor, seq: Sequence) -> BaseException:
    """A row whose logits are sound fails because of its request's sampling parameters: a client error.
    NaN logits (or none finite) are the model's, not the request's."""
    if torch.isnan(row).any() or not torch.isfinite(row).any():
        return exc
    p = seq.params
    values = ", ".join(f"{name}={getattr(p, name)!r}" for name in
                       ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                        "repetition_penalty") if getattr(p, name) != _DEFAULTS[name])
    return InvalidRequestError(f"sampling failed with this request's parameters ({values or 'the defaults'}): "
                               f"{_one_line(exc)}")


_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
             "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
