"""Method registry, timm style: ``@register_method`` on a class, ``create_method(name, **config)`` to build one."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

_METHODS: dict[str, type] = {}
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
