"""Reading whole pickled modules (the task_vectors / AdaMerging / Model Tinting releases)
without running their code.

Those checkpoints are ``torch.save(image_encoder)`` of the authors' ``ImageEncoder`` (an
open_clip ``CLIP`` inside) and ``ClassificationHead``: loading them normally imports the
authors' source tree and an old open_clip, and executes whatever the pickle names. Here
``torch.load`` runs with a restricted unpickler:

- tensors, parameters, storages and plain containers are rebuilt for real;
- every other class the pickle names becomes an inert ``Record`` of the state the pickle
  gives it (its ``__dict__``): nothing of the class's module is imported or run;
- any *call* of a name outside the allowlist (``os.system``, ``builtins.eval``, a class's
  constructor with arguments) is refused by name, before it happens.

``module_state_dict`` then walks the records as ``nn.Module.state_dict`` would.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from tintcli.errors import TintError

# (module, name) the pickle may rebuild for real: tensor and storage rebuilders, plain types
_REAL = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"),
    ("torch", "device"), ("torch.nn.parameter", "Parameter"), ("torch", "Tensor"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("builtins", "tuple"),
    ("builtins", "list"), ("builtins", "dict"),
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


_MALICIOUS = ("This file may be malicious: delete it, and do not load it with torch.load "
              "either; get it again from the release.")
_CODE = ("tint loads no code from checkpoints: where you trust the file, load it with "
         "torch.load and save its state_dict() instead, or get it again from the release.")


class UnsafePickle(TintError):
    """The pickle asked to call something tint does not run. Raised inside the unpickler,
    which knows only the call; ``load_pickled`` names the file and what it was for."""

    def __init__(self, action: str, hint: str, where: str = "the checkpoint") -> None:
        super().__init__(f"{where} is a pickle that {action}, which tint refuses to run\n{hint}")
        self.action, self.hint = action, hint

    def located(self, path: Path, what: str) -> UnsafePickle:
        """The same refusal, its first line naming the file and what it was for (with 20
        tasks the user must know which file to delete)."""
        return UnsafePickle(self.action, self.hint, f"{path} ({what})")


class Record:
    """An inert stand-in for an object of a class tint does not import: it keeps the state
    the pickle gave it and nothing else. Calling the class with arguments (what a pickle
    does to run code) is refused."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafePickle(f"calls {self._qualname}", _CODE)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})

    def __repr__(self) -> str:
        return f"<record of {self._qualname}>"


_record_classes: dict[str, type] = {}


def _record_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    if qualname not in _record_classes:
        _record_classes[qualname] = type(name, (Record,), {"_qualname": qualname,
                                                           "__module__": "tint.records"})
    return _record_classes[qualname]


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor without calling ``base.__init__``: records only."""
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not object:
        raise UnsafePickle(f"rebuilds {cls!r} from {base!r}", _CODE)
    return cls.__new__(cls)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2 for plain tensors and parameters only."""
    tensor = func(*args)
    return tensor


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's) use Python 2 names: __builtin__, copy_reg
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _REAL:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and (name in _DTYPES or name.endswith("Storage")):
            return getattr(torch, name)
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type_v2
        if module in ("copyreg", "builtins", "os", "posix", "nt", "subprocess", "sys",
                      "importlib", "runpy", "shutil", "socket", "pickle", "types",
                      "functools", "operator", "codecs"):
            raise UnsafePickle(f"asks for {module}.{name}", _MALICIOUS)
        return _record_class(module, name)


# torch.load(pickle_module=...) wants a module with Unpickler and load
restricted = types.ModuleType("tint_restricted_pickle")
restricted.Unpickler = RestrictedUnpickler
restricted.load = lambda file, **kw: RestrictedUnpickler(file, **kw).load()


def load_pickled(path: Path, what: str) -> Any:
    """``torch.load`` a whole-module pickle as records and tensors; no code runs."""
    path = Path(path)
    if not path.is_file():
        raise TintError(f"missing checkpoint for {what}: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted,
                          weights_only=False)
    except UnsafePickle as err:
        raise err.located(path, what) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            AttributeError, TypeError) as err:
        raise TintError(f"cannot read the checkpoint for {what}: {path} ({err})") from err


def module_state_dict(obj: Any, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """What ``nn.Module.state_dict()`` returns, from a record of a pickled module (or the
    state dict itself, when the file held one)."""
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return OrderedDict((prefix + k, v) for k, v in obj.items())
    if not isinstance(obj, Record | torch.nn.Module):
        raise TintError(f"expected a pickled module or a state dict, found {type(obj).__name__}")
    state = obj.__dict__
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, param in (state.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, buffer in (state.get("_buffers") or {}).items():
        if buffer is not None and name not in skip:
            out[prefix + name] = buffer
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def record_attribute(obj: Any, name: str, default: Any = None) -> Any:
    return obj.__dict__.get(name, default) if isinstance(obj, Record) else getattr(
        obj, name, default)


__all__ = ["Record", "UnsafePickle", "load_pickled", "module_state_dict", "record_attribute"]
