"""A sequence's grammar held back until its reasoning ends (StructuredOutputsParams.reasoning_end).

A reasoning model writes `<think>...</think>` before its answer; structured outputs and forced tool
calls constrain the answer only. The engine keeps the matcher here, with `seq.structured` left None
(so the sequence is sampled freely), and hands it over once the output text contains the end marker:
the next token is the grammar's first. Text is matched rather than token ids because the marker is
one token in Qwen3 / DeepSeek-R1 but several in other vocabularies.
"""

from __future__ import annotations


class ReasoningGate:
    def __init__(self, matcher, end: str):
        self.matcher = matcher  # a forge.structured.Matcher, untouched until the gate opens
        self.end = end
        self._searched = 0  # output text already searched (less a marker's length, for one split across tokens)

    def opens(self, text: str) -> bool:
        """Whether the output text so far contains the end marker."""
        found = text.find(self.end, max(0, self._searched - len(self.end) + 1)) >= 0
        self._searched = len(text)
        return found
