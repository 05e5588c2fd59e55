"""Checks for user-given values: each failure is one InvalidRequestError that names the value and the
allowed range, raised where the value enters forge (SamplingParams, EngineConfig), not deep inside.

Integers must be integers (bool and 2.5 are not); numbers must be real and finite (NaN, +-inf and
strings are not). Checked values come back as plain Python int / float (numpy scalars included).
"""

import math
from numbers import Integral, Real

from forge.errors import InvalidRequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _shown(value) -> str:
    """The value as a user typed it: numbers plain, anything else with its repr (quotes for strings)."""
    if isinstance(value, Integral) and not isinstance(value, bool) and int(value).bit_length() > 64:
        return f"an integer of {int(value).bit_length()} bits"  # (str() of a huge int is slow, then refused)
    text = str(value) if isinstance(value, Real) and not isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # messages stay one short line


def check_int(value, name: str, lo: int | None = None, hi: int | None = None, *, param: str | None = None) -> int:
    """`value` as an int in [lo, hi] (either bound optional), or InvalidRequestError."""
    allowed = _range_text(lo, hi)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidRequestError(f"{name} must be an integer{allowed}, got {_shown(value)}", param=param or name)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(f"{name} must be an integer{allowed}, got {_shown(value)}", param=param or name)
    return value


def check_float(value, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, param: str | None = None) -> float:
    """`value` as a finite float within the bounds (open or closed), or InvalidRequestError."""
    allowed = _range_text(lo, hi, lo_open, hi_open)
    bad = InvalidRequestError(f"{name} must be a finite number{allowed}, got {_shown(value)}", param=param or name)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise bad
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise bad from None
    if not math.isfinite(number):
        raise bad
    if lo is not None and (number <= lo if lo_open else number < lo):
        raise bad
    if hi is not None and (number >= hi if hi_open else number > hi):
        raise bad
    return number


def check_bool(value, name: str, *, optional: bool = False, param: str | None = None) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        what = "true, false or None" if optional else "true or false"
        raise InvalidRequestError(f"{name} must be {what}, got {_shown(value)}", param=param or name)
    return value


def check_token_ids(value, param: str = "prompt") -> list[int]:
    """A prompt's token ids (a list, tuple or 1-D array of integers) as a list of ints; the range
    against the vocabulary is checked by the engine, which knows it."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy / torch
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"prompt token ids must be a list of integers, got {type(value).__name__}", param=param)
    bad = next((t for t in value if isinstance(t, bool) or not isinstance(t, Integral)), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token ids must be integers, got {_shown(bad)}", param=param)
    return [int(t) for t in value]
