"""The server's connection and queue limits, with `forge serve`'s defaults (kept light: the CLI reads
them to build its help without importing the server). docs/RELIABILITY.md says what a client sees
when each one triggers."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from forge.errors import ForgeError


class ServerConfigError(ForgeError):
    """A server setting is out of range (a flag of `forge serve`)."""


@dataclass(frozen=True)
class ServerLimits:
    max_waiting: int = 256  # prompts admitted but not yet generating; more get 503 + Retry-After
    max_connections: int = 1024  # open connections (or running requests) beyond which requests get 503
    timeout_keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    timeout_request_header: float = 10.0  # seconds to send a whole request head, from its first byte
    timeout_request_body: float = 30.0  # seconds to send a whole request body, from the end of the head
    shutdown_timeout: float = 30.0  # seconds running requests may finish after SIGTERM before they are aborted

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ServerConfigError(f"{flag} must be an integer >= 1, got {value!r}")
            if f.type == "float":
                zero_ok = f.name == "shutdown_timeout"  # 0: abort running requests at once
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or value < 0 or (value == 0 and not zero_ok)):
                    raise ServerConfigError(f"{flag} must be a finite number of seconds {'>=' if zero_ok else '>'} 0, "
                                            f"got {value!r}")
