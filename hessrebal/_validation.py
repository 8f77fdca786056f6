"""Checks of settings, declared as tables.

Every estimator and strategy states the values each setting may take in one
table (a dict from setting name to a list of constraints), in the spirit of
scikit-learn's parameter constraints, and checks it with :func:`check_params`
when it is used (``fit``, ``compute``, ``solve``), never in ``__init__``. One
wording of the error for every setting in the package:
``"<name> must be <what>; got <value>."``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

__all__ = [
    "Interval", "Options", "CALLABLE", "check", "check_params", "check_positive",
    "OBJECTIVES", "POSITIVE", "NON_NEGATIVE", "POSITIVE_INT", "NON_NEGATIVE_INT",
    "UNIT_OPEN", "UNIT_CLOSED",
]

# Objectives of the coefficient problem, shared by the surgeon and the solvers.
OBJECTIVES = ("weighted", "maxmin")


class Interval:
    """Numbers of ``kind`` (``Real`` or ``Integral``; never a bool, always
    finite) between ``low`` and ``high`` (None: unbounded); ``closed`` is
    ``"left"``, ``"right"``, ``"both"`` or ``"neither"``."""

    def __init__(self, kind: type, low: float | None, high: float | None,
                 closed: str = "both") -> None:
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed in ("right", "neither")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed in ("left", "neither")):
                return False
        return True

    def convert(self, value: Any) -> Any:
        return int(value) if self.kind is Integral else float(value)

    def describe(self) -> str:
        noun = "int" if self.kind is Integral else "number"
        if self.high is None and self.low == 0 and self.closed in ("left", "both"):
            return f"a non-negative {noun}"
        if self.high is None and ((self.low == 0 and self.closed in ("right", "neither"))
                                  or (self.kind is Integral and self.low == 1
                                      and self.closed in ("left", "both"))):
            return f"a positive {noun}"
        left = "[" if self.closed in ("left", "both") else "("
        right = "]" if self.closed in ("right", "both") else ")"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"a{'n' if noun == 'int' else ''} {noun} in {left}{low}, {high}{right}"


class Options:
    """One of a fixed set of values (compared with ``==``)."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.values = tuple(values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, type(None), bool, Integral, Real)) and any(
            value == v and type(value) is type(v) for v in self.values)

    def convert(self, value: Any) -> Any:
        return value

    def describe(self) -> str:
        return f"one of {self.values}"


class _Callable:
    def accepts(self, value: Any) -> bool:
        return callable(value)

    def convert(self, value: Any) -> Any:
        return value

    def describe(self) -> str:
        return "a callable"


CALLABLE = _Callable()


def _describe(constraints: Sequence[Any]) -> str:
    words = ["None" if c is None else c.describe() for c in constraints]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check(value: Any, name: str, *constraints: Any) -> Any:
    """``value`` (an int or float where an :class:`Interval` accepted it) if
    one of ``constraints`` accepts it (``None`` in the list accepts None);
    otherwise a ``ValueError`` (``TypeError`` when only a callable would do)
    naming ``name``."""
    for c in constraints:
        if c is None:
            if value is None:
                return None
        elif c.accepts(value):
            return c.convert(value)
    error = TypeError if all(c is CALLABLE for c in constraints if c is not None) \
        else ValueError
    raise error(f"{name} must be {_describe(constraints)}; got {value!r}.")


def check_params(obj: Any, table: Mapping[str, Sequence[Any]],
                 prefix: str = "") -> dict[str, Any]:
    """Check every attribute of ``obj`` named in ``table`` (see :func:`check`);
    return the checked values by name. ``prefix`` goes before each name in the
    error (e.g. the strategy's class)."""
    return {name: check(getattr(obj, name), prefix + name, *constraints)
            for name, constraints in table.items()}


def check_positive(value: Any, name: str, integer: bool = False,
                   allow_none: bool = False) -> Any:
    """``value`` as a positive int (``integer=True``) or a positive finite
    float; None passes when ``allow_none``."""
    kind = Interval(Integral, 1, None, "left") if integer else Interval(Real, 0, None, "neither")
    return check(value, name, *((kind, None) if allow_none else (kind,)))


POSITIVE = Interval(Real, 0, None, "neither")
NON_NEGATIVE = Interval(Real, 0, None, "left")
POSITIVE_INT = Interval(Integral, 1, None, "left")
NON_NEGATIVE_INT = Interval(Integral, 0, None, "left")
UNIT_OPEN = Interval(Real, 0, 1, "neither")
UNIT_CLOSED = Interval(Real, 0, 1, "both")

