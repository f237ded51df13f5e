"""Model specs: ``path/to/file.py:function`` or ``package.module:function``.

A file spec is imported as a module named after the file's stem, with the file's
directory put at the front of ``sys.path``, so classes defined in it pickle as
``stem.Class`` and unpickle later wherever that file is importable. A file is imported
once per process: a second spec naming the same file reuses the module (and its classes).

Example::

    model, module = build_model("examples/digits.py:build")
    inputs = example_inputs_for(module, None)          # the file's example_inputs()
    inputs = example_inputs_for(module, "2,1,16,16")   # or a random tensor of that shape
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from .cli_errors import ModelError, UsageError, one_line

_FILE_MODULES: dict[str, ModuleType] = {}  # resolved path -> module imported from it

SPEC_FORM = "path/to/file.py:function or package.module:function"


def split_spec(spec: str) -> tuple[str, str]:
    """``"a/b.py:build"`` -> ``("a/b.py", "build")``; raises UsageError without a ``:``."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"spec {spec!r} must have the form {SPEC_FORM}")
    return where, name


def _is_file(where: str) -> bool:
    return where.endswith(".py") or os.sep in where or "/" in where


def import_file(path: str) -> ModuleType:
    """Import ``path`` as a module named after its stem (once per process)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UsageError(f"model file {path} not found")
    key = str(file)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = file.stem
    if not name.isidentifier():
        raise UsageError(f"model file name {file.name!r} is not a Python identifier; rename it")
    folder = str(file.parent)
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == file:
        _FILE_MODULES[key] = loaded
        return loaded
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if isinstance(exc, Exception):
            raise ModelError(f"importing {path} failed: {type(exc).__name__}: {one_line(exc)}") from exc
        raise
    _FILE_MODULES[key] = module
    return module


def import_dotted(where: str) -> ModuleType:
    """Import ``package.module``; a missing module is a UsageError, a failing one a ModelError."""
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
            raise UsageError(f"module {where!r} not found (is it on PYTHONPATH?)") from exc
        raise ModelError(f"importing {where} failed: {type(exc).__name__}: {one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise ModelError(f"importing {where} failed: {type(exc).__name__}: {one_line(exc)}") from exc


def absolute_spec(spec: str) -> str:
    """The spec with a file path made absolute (so it still works from another directory)."""
    where, name = split_spec(spec)
    return f"{Path(where).expanduser().resolve()}:{name}" if _is_file(where) else spec


def load_module(spec: str) -> ModuleType:
    """The module a spec names (its part before the last ``:``)."""
    where, _ = split_spec(spec)
    return import_file(where) if _is_file(where) else import_dotted(where)


def _did_you_mean(name: str, obj: Any) -> str:
    """`` (did you mean 'build'?)`` for a near miss among the public callables of ``obj``."""
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def load_builder(spec: str) -> Callable[..., Any]:
    """The callable a spec names; raises UsageError when the file, module or name is missing."""
    where, name = split_spec(spec)
    obj: Any = load_module(spec)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no function {name!r}{_did_you_mean(part, obj)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{where}:{name} is a {type(obj).__name__}, not a function")
    return obj


def build_model(spec: str) -> tuple[nn.Module, ModuleType]:
    """Call the spec's builder: ``(model, module)``; ModelError when it raises or returns no Module."""
    builder = load_builder(spec)
    try:
        model = builder()
    except Exception as exc:  # noqa: BLE001 - the user's function raised: show its message
        raise ModelError(f"{spec} raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned an object of type {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model, load_module(spec)


SHAPE_FORM = "comma-separated positive sizes, e.g. 1,3,224,224 (';' between several inputs)"


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """``"1,3,224,224"`` -> ``[(1, 3, 224, 224)]``; several inputs are separated by ``;``.

    Strict: only digits, commas, ``;`` and spaces (``1x3x224x224`` is refused, not guessed).

    Example:
        >>> parse_input_shape("1,3,8,8;1,5")
        [(1, 3, 8, 8), (1, 5)]
    """
    shapes = []
    for part in str(text).split(";"):
        items = [s.strip() for s in part.split(",")]
        if not items or not all(s.isdigit() and int(s) > 0 for s in items):
            hint = " ('x' is not a separator)" if "x" in part.lower() else ""
            raise UsageError(f"malformed --input-shape {text!r}{hint}: expected {SHAPE_FORM}")
        shapes.append(tuple(int(s) for s in items))
    return shapes


def random_inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Standard normal float32 tensors of the given shapes, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) for s in shapes)


def example_inputs_for(module_or_spec: ModuleType | str, input_shape: str | None) -> tuple:
    """Example inputs: random tensors of ``input_shape``, else the module's ``example_inputs()``.

    Raises UsageError when neither is available, ModelError when ``example_inputs()`` raises.
    """
    if input_shape:
        return random_inputs(parse_input_shape(input_shape))
    module = load_module(module_or_spec) if isinstance(module_or_spec, str) else module_or_spec
    make = getattr(module, "example_inputs", None)
    if not callable(make):
        raise UsageError(f"no example input: pass --input-shape (e.g. 1,3,224,224) or define "
                         f"example_inputs() in {getattr(module, '__file__', None) or module.__name__}")
    try:
        inputs = make()
    except Exception as exc:  # noqa: BLE001 - the user's function raised
        raise ModelError(f"example_inputs() raised {type(exc).__name__}: {one_line(exc)}") from exc
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def load_data(spec: str) -> tuple[Any, Any]:
    """Call a ``--data`` spec: it must return ``(train_loader, val_loader)``."""
    builder = load_builder(spec)
    try:
        loaders = builder()
    except Exception as exc:  # noqa: BLE001 - the user's function raised
        raise ModelError(f"{spec} raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
        raise ModelError(f"{spec} must return (train_loader, val_loader), got a {type(loaders).__name__}")
    return loaders[0], loaders[1]


CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")
PRUNED_HINT = ("pruned weights (state_dict.pt of a softprune-fx DIR) load with "
               "softprune_fx.apply_plan(build(), None, 'DIR/plan.json').load_state_dict(...)")


def unwrap_state_dict(state: Any) -> Any:
    """The state dict inside a checkpoint: under model / state_dict / model_state_dict (nested
    too), tensors only, a DistributedDataParallel ``module.`` prefix removed.

    Example:
        >>> sd = unwrap_state_dict({"epoch": 3, "model": {"module.fc.weight": torch.zeros(1)}})
        >>> list(sd)
        ['fc.weight']
    """
    for _ in range(3):  # {"model": {"state_dict": ...}} occurs too
        if not isinstance(state, dict):
            return state
        inner = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        return state
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def weights_mismatch(model: nn.Module, state: dict) -> str | None:
    """None when ``state`` fits ``model`` exactly, else one line: counts and the first names."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and isinstance(state[k], torch.Tensor)
              and tuple(state[k].shape) != tuple(ours[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shapes differ ({k}: file {list(state[k].shape)}, model {list(ours[k].shape)})")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict or a checkpoint dict holding one (``weights_only=True``, strict)."""
    if not Path(path).is_file():
        raise UsageError(f"weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a loadable state dict
        raise ModelError(f"cannot read weights {path}: {type(exc).__name__}: {one_line(exc)}") from exc
    state = unwrap_state_dict(state)
    if not isinstance(state, dict):
        raise ModelError(f"weights {path} hold a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    problem = weights_mismatch(model, state)
    if problem:
        raise ModelError(f"weights {path} do not match the model: {problem}; {PRUNED_HINT}")
    model.load_state_dict(state)
