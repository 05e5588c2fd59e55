"""An incremental JSON syntax checker that reports where values start and end.

The tool-call parsers stream a call's arguments as the model writes them, so they must know, one
character at a time, whether the text is still a valid JSON prefix, where each member of the
call object begins and ends, and where the object closes. `json.loads` only answers for complete
text and `json.JSONDecoder.raw_decode` gives no positions inside the value, hence this small
pushdown checker for RFC 8259 JSON (no NaN/Infinity, no comments, no trailing commas).

Positions are offsets into all the text fed so far. Events, appended to `events` as they happen:

* ("start", depth, pos): a value begins at `pos`; depth 0 is the top-level value, 1 its members.
* ("end", depth, end): the value that began at depth `depth` ends just before `end`.
* ("key", depth, start, end): an object key (its quoted text is [start, end)) at member depth `depth`.
"""

from __future__ import annotations

__all__ = ["JsonScanner"]

_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"

# Scanner states.
_VALUE = 0  # a value must come next
_ARRAY_FIRST = 1  # just after "[": a value or "]"
_OBJECT_FIRST = 2  # just after "{": a key or "}"
_OBJECT_KEY = 3  # just after "," in an object: a key
_COLON = 4  # after a key
_AFTER_VALUE = 5  # after a member value: "," or the container's closer
_STRING = 6
_ESCAPE = 7  # after a backslash in a string
_UNICODE = 8  # inside \uXXXX
_NUMBER = 9
_LITERAL = 10  # inside true / false / null
_DONE = 11  # the top-level value is complete; nothing more is consumed
_ERROR = 12

# Number sub-states (JSON's number grammar); the accepting ones may end the number.
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_EXP, _N_EXP_SIGN, _N_EXP_DIGITS = range(8)
_N_ACCEPTING = (_N_ZERO, _N_INT, _N_FRAC, _N_EXP_DIGITS)
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonScanner:
    """Checks one JSON value fed in pieces; see the module docstring for the events it records."""

    def __init__(self) -> None:
        self.pos = 0  # characters consumed so far (all of them a valid JSON prefix)
        self.events: list[tuple] = []
        self._state = _VALUE
        self._stack: list[str] = []  # open containers, "{" or "["
        self._token_start = 0  # where the current string / number / literal began
        self._in_key = False
        self._unicode_left = 0
        self._number_state = _N_MINUS
        self._literal = ""

    @property
    def done(self) -> bool:
        """The top-level value is complete."""
        return self._state == _DONE

    @property
    def failed(self) -> bool:
        """The character at `pos` cannot continue valid JSON."""
        return self._state == _ERROR

    def feed(self, text: str, start: int = 0) -> int:
        """Consume text[start:] until it ends, the value completes or a character is invalid;
        returns the index in `text` where consumption stopped."""
        i = start
        n = len(text)
        while i < n and self._state < _DONE:
            if self._step(text[i]):
                i += 1
                self.pos += 1
        return i

    def finish(self) -> None:
        """End of input: a top-level number still being read is complete."""
        if self._state == _NUMBER and not self._stack and self._number_state in _N_ACCEPTING:
            self.events.append(("end", 0, self.pos))
            self._state = _DONE

    # -- one character ---------------------------------------------------------------------------

    def _step(self, ch: str) -> bool:
        """Advance by `ch`; False when `ch` was not consumed (it ended a number, or is invalid)."""
        state = self._state
        if state == _STRING:
            if ch == '"':
                self._end_string()
            elif ch == "\\":
                self._state = _ESCAPE
            elif ch < " ":
                self._state = _ERROR
                return False
            return True
        if state in (_VALUE, _ARRAY_FIRST):
            if ch in _WS:
                return True
            if state == _ARRAY_FIRST and ch == "]":
                return self._close("[")
            return self._begin_value(ch)
        if state in (_OBJECT_FIRST, _OBJECT_KEY):
            if ch in _WS:
                return True
            if ch == '"':
                self._token_start = self.pos
                self._in_key = True
                self._state = _STRING
                return True
            if state == _OBJECT_FIRST and ch == "}":
                return self._close("{")
            self._state = _ERROR
            return False
        if state == _COLON:
            if ch in _WS:
                return True
            if ch == ":":
                self._state = _VALUE
                return True
            self._state = _ERROR
            return False
        if state == _AFTER_VALUE:
            if ch in _WS:
                return True
            top = self._stack[-1]
            if ch == ",":
                self._state = _OBJECT_KEY if top == "{" else _VALUE
                return True
            if ch in "}]":
                return self._close("{" if ch == "}" else "[")
            self._state = _ERROR
            return False
        if state == _ESCAPE:
            if ch in '"\\/bfnrt':
                self._state = _STRING
            elif ch == "u":
                self._state, self._unicode_left = _UNICODE, 4
            else:
                self._state = _ERROR
                return False
            return True
        if state == _UNICODE:
            if ch not in _HEX:
                self._state = _ERROR
                return False
            self._unicode_left -= 1
            if not self._unicode_left:
                self._state = _STRING
            return True
        if state == _NUMBER:
            return self._number(ch)
        if state == _LITERAL:
            expected = self._literal[self.pos - self._token_start]
            if ch != expected:
                self._state = _ERROR
                return False
            if self.pos - self._token_start == len(self._literal) - 1:
                self._end_value(self.pos + 1)
            return True
        return False

    def _begin_value(self, ch: str) -> bool:
        depth = len(self._stack)
        if ch in "{[":
            self.events.append(("start", depth, self.pos))
            self._stack.append(ch)
            self._state = _OBJECT_FIRST if ch == "{" else _ARRAY_FIRST
            return True
        self._token_start = self.pos
        if ch == '"':
            self.events.append(("start", depth, self.pos))
            self._in_key = False
            self._state = _STRING
            return True
        if ch == "-" or ch in _DIGITS:
            self.events.append(("start", depth, self.pos))
            self._state = _NUMBER
            self._number_state = _N_MINUS if ch == "-" else (_N_ZERO if ch == "0" else _N_INT)
            return True
        if ch in _LITERALS:
            self.events.append(("start", depth, self.pos))
            self._state = _LITERAL
            self._literal = _LITERALS[ch]
            return True
        self._state = _ERROR
        return False

    def _number(self, ch: str) -> bool:
        ns = self._number_state
        digit = ch in _DIGITS
        if ns == _N_MINUS and digit:
            self._number_state = _N_ZERO if ch == "0" else _N_INT
        elif ns == _N_INT and digit:
            pass
        elif ns in (_N_DOT, _N_FRAC) and digit:
            self._number_state = _N_FRAC
        elif ns in (_N_ZERO, _N_INT) and ch == ".":
            self._number_state = _N_DOT
        elif ns in (_N_ZERO, _N_INT, _N_FRAC) and ch in "eE":
            self._number_state = _N_EXP
        elif ns == _N_EXP and ch in "+-":
            self._number_state = _N_EXP_SIGN
        elif ns in (_N_EXP, _N_EXP_SIGN, _N_EXP_DIGITS) and digit:
            self._number_state = _N_EXP_DIGITS
        elif ns in _N_ACCEPTING:
            # `ch` ends the number; it is read again as whatever follows a value.
            self._end_value(self.pos)
            return False
        else:
            self._state = _ERROR
            return False
        return True

    def _end_string(self) -> None:
        if self._in_key:
            self.events.append(("key", len(self._stack), self._token_start, self.pos + 1))
            self._state = _COLON
        else:
            self._end_value(self.pos + 1)

    def _end_value(self, end: int) -> None:
        """The scalar value being read ends just before `end`."""
        self.events.append(("end", len(self._stack), end))
        self._state = _AFTER_VALUE if self._stack else _DONE

    def _close(self, opener: str) -> bool:
        if self._stack[-1] != opener:
            self._state = _ERROR
            return False
        self._stack.pop()
        self.events.append(("end", len(self._stack), self.pos + 1))
        self._state = _AFTER_VALUE if self._stack else _DONE
        return True
