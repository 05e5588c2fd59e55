"""The periodic throughput line `forge serve` logs, like vLLM's:

    INFO 12-01 14:02:10 forge.server: running: 3 reqs, waiting: 0 reqs, prompt: 412.3 tok/s,
    generation: 61.0 tok/s, KV cache: 4.2%, prefix cache hits: 37.5%

It reads only what the engine thread publishes (AsyncEngine.snapshot and the engine's token
counters), from a task on the server's event loop, and stays quiet while the server is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger("forge.server")


class StatsLogger:
    def __init__(self, async_engine, interval: float):
        self.async_engine, self.interval = async_engine, interval
        self._last_time = time.monotonic()
        self._last_tokens = self._tokens()
        self._was_idle = True

    def _tokens(self) -> tuple[int, int]:
        stats = self.async_engine.engine.stats
        return stats["prompt_tokens"], stats["generation_tokens"]

    def line(self) -> str | None:
        """The line for the interval since the last call, or None when nothing ran in it (and nothing did before)."""
        now, tokens = time.monotonic(), self._tokens()
        seconds = max(now - self._last_time, 1e-9)
        prompt_rate, generation_rate = ((new - old) / seconds for new, old in zip(tokens, self._last_tokens))
        self._last_time, self._last_tokens = now, tokens
        snap = self.async_engine.snapshot
        idle = not (snap.num_running or snap.num_waiting or prompt_rate or generation_rate)
        if idle and self._was_idle:
            return None
        self._was_idle = idle
        return (f"running: {snap.num_running} reqs, waiting: {snap.num_waiting} reqs, prompt: {prompt_rate:.1f} tok/s, "
                f"generation: {generation_rate:.1f} tok/s, KV cache: {100 * snap.kv_cache_usage:.1f}%, "
                f"prefix cache hits: {100 * snap.prefix_cache_hit_rate:.1f}%")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            text = self.line()
            if text is not None:
                logger.info(text)
