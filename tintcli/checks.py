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


def device(params: Mapping[str, object], key: str) -> None:
    """A device torch knows and this machine has (null: where the tensors are)."""
    if params.get(key) is not None:
        try:
            device_named(params[key])
        except ValueError as err:
            raise ValueError(f"{key}={params[key]} {err}") from err


def device_named(name: object):
    """The torch device ``name`` names (``auto``: CUDA when present, else the CPU); a
    ValueError saying why where torch knows no such device or this machine lacks it. Every
    setting that names a device is read through here."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError("is not a device torch knows; use auto, cpu, cuda or cuda:<index>") \
            from err
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("asks for CUDA, which is not available here; use auto or cpu")
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"names {'an' if found.type[0] in 'aeiou' else 'a'} {found.type} "
                         "device; tint runs on cpu or cuda: use auto, cpu or cuda")
    return found
