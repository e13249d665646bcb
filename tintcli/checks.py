"""Parameter checks a method declares with ``@register(check=...)`` (``tintcli/methods.py``).

Each helper looks at one key (only where the parameters have it) and raises a ValueError
that names the key, its value and what it must be; ``check_parameters`` turns that into the
one-line ``error:`` a user sees before any work.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping


def _fail(params: Mapping[str, object], key: str, must: str) -> None:
    raise ValueError(f"{key}={params[key]} must be {must}")


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def number(params: Mapping[str, object], key: str, low: float | None = None,
           high: float | None = None, must: str | None = None) -> None:
    """A finite number (NaN and inf never pass), within [low, high] where given."""
    if key not in params:
        return
    value = params[key]
    if not (_is_number(value) and (low is None or value >= low)
            and (high is None or value <= high)):
        span = (f" in [{low:g}, {high:g}]" if low is not None and high is not None
                else f" >= {low:g}" if low is not None else "")
        _fail(params, key, must or f"a finite number{span}")


def positive(params: Mapping[str, object], key: str) -> None:
    if key in params and not (_is_number(params[key]) and params[key] > 0):
        _fail(params, key, "a positive number")


def whole(params: Mapping[str, object], key: str, low: int = 1) -> None:
    value = params.get(key)
    if key in params and not (isinstance(value, int) and not isinstance(value, bool)
                              and value >= low):
        _fail(params, key, f"a whole number >= {low}")


def one_of(params: Mapping[str, object], key: str, options: Collection[str]) -> None:
    if key in params and params[key] not in options:
        _fail(params, key, "one of: " + ", ".join(map(str, options)))
