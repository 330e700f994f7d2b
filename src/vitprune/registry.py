"""Registries, timm style. Methods: ``@register_method`` on a class, ``create_method(name, **config)`` to build one.
Backends (model families): ``register_backend(name, matches, backend)``; ``find_backend(model)`` picks one."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, TypeVar

_METHODS: dict[str, type] = {}
_BACKENDS: dict[str, tuple[Callable[[Any], bool], Any]] = {}
BACKEND_API = ("check_supported", "model_info", "apply", "restore")  # optional: check_method(model, method)
T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return add


def available_methods() -> list[str]:
    """Names accepted by ``vitprune.patch`` (sorted)."""
    _import_builtin_methods()
    return sorted(_METHODS)


def create_method(name: str, **config: Any) -> Any:
    """Build a method from its name and keywords; unknown names or keywords raise one clear ValueError."""
    _import_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    cls = _METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"method {name!r} got unknown option(s) {', '.join(unknown)}; it accepts: {', '.join(sorted(fields))}"
        )
    return cls(**config)


def _import_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)


def register_backend(name: str, matches: Callable[[Any], bool], backend: Any) -> None:
    """Register a model family: ``matches(model)`` says whether ``backend`` patches ``model``.

    ``backend`` is any object (usually the backend's module) with ``check_supported(model)`` (raise one ValueError
    saying why not), ``model_info(model) -> ModelInfo``, ``apply(model, ctx)`` and ``restore(model)``, and optionally
    ``check_method(model, method)``. Backends are asked in registration order; the first that matches is used.
    """
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    missing = [attr for attr in BACKEND_API if not callable(getattr(backend, attr, None))]
    if missing:
        raise TypeError(f"backend {name!r} lacks {', '.join(missing)}; a backend provides {', '.join(BACKEND_API)}")
    _BACKENDS[name] = (matches, backend)


def available_backends() -> list[str]:
    """Names of the registered backends, in the order they are asked."""
    _import_builtin_backends()
    return list(_BACKENDS)


def find_backend(model: Any) -> Any | None:
    """The backend that patches ``model``, or None."""
    _import_builtin_backends()
    for matches, backend in _BACKENDS.values():
        if matches(model):
            return backend
    return None


def _import_builtin_backends() -> None:
    from .backends import timm, timm_eva, timm_pit, timm_swin  # noqa: F401  (each registers itself on import)

    # transformers stays optional: a model can only be one of its classes if transformers has been imported already
    if "transformers" in sys.modules:
        try:
            from .backends import hf  # noqa: F401
        except ImportError:
            pass
    # likewise open_clip: its image towers exist only once open_clip has been imported
    if "open_clip" in sys.modules:
        try:
            from .backends import open_clip  # noqa: F401
        except ImportError:
            pass
