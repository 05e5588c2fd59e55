"""How many threads forge's native CPU kernels use (OpenMP, torch's pool).

`--threads N` (EngineConfig.threads) fixes N. By default the kernels use every physical core while
the rest of the machine is idle, and one fewer (at least 1) as soon as other processes take CPU
time: a parallel region whose second thread is descheduled waits for it, so on a busy 2-core machine
2 threads ran 4-10x slower than 1 (benchmarks/cpu_generate.py), while on an idle one 2 threads run
batch-16 decode 1.5x faster. "Idle" is measured, not guessed: every SAMPLE_SECONDS the CPU time the
whole machine spent (/proc/stat) minus this process's own (time.process_time) over that interval;
less than OTHERS_IDLE of one core is idle. (The load average would count this process's own
threads and lag by a minute.)
"""

import os
import threading
import time

SAMPLE_SECONDS = 0.25
OTHERS_IDLE = 0.25  # cores' worth of other processes' CPU time below which the machine counts as idle


def _machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent outside idle / iowait since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ThreadBudget:
    def __init__(self, fixed: int | None, cores: int):
        self.fixed, self.cores = fixed, max(1, cores)
        self.busy_count = max(1, self.cores - 1)
        self._count = self.busy_count  # until the first measurement: as if the machine were busy
        self._last = (time.monotonic(), _machine_busy_seconds(), time.process_time())
        self._lock = threading.Lock()

    def threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        now = time.monotonic()
        if now - self._last[0] >= SAMPLE_SECONDS and self._lock.acquire(blocking=False):
            try:
                self._sample(now)
            finally:
                self._lock.release()
        return self._count

    def _sample(self, now: float) -> None:
        machine, own = _machine_busy_seconds(), time.process_time()
        then, machine_then, own_then = self._last
        self._last = (now, machine, own)
        if machine is None or machine_then is None:
            return
        others = (machine - machine_then) - (own - own_then)  # other processes' CPU seconds
        self._count = self.cores if others < OTHERS_IDLE * (now - then) else self.busy_count


_budget = ThreadBudget(None, 1)


def configure(fixed: int | None, cores: int) -> None:
    """Set by the model runner: --threads (None: adaptive) and the machine's physical cores."""
    global _budget
    _budget = ThreadBudget(fixed, cores)


def threads() -> int:
    """Threads for the next native kernel call."""
    return _budget.threads()
