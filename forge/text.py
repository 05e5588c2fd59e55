"""Text helpers shared by stop strings (forge.sequence) and the streaming chat parsers (forge.tools)."""

from collections.abc import Iterable


def partial_suffix_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`: the text a
    stream must hold back until it knows whether a marker (a stop string, a tool-call tag) follows."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
