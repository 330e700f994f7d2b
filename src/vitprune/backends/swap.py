"""The class swap every backend patches with (ToMe style): a module keeps its parameters and submodules and only
gets a subclass that puts a mixin in front of its own class. One cache serves all backends, so a class is
subclassed once per mixin, and the original class of a swapped one can always be recovered."""
from __future__ import annotations

from torch import nn

from ..engine import PatchContext

_PATCHED: dict[tuple[type, type], type] = {}
_ORIGINAL: dict[type, type] = {}


def patched_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` in front, named ``VitPrune<cls>`` (created once, then reused).

    The class is made at run time, so pickle cannot find it by name: instances pickle as "rebuild the swapped class
    from (cls, mixin), then restore the state", and both of those are importable. So a patched model goes through
    ``pickle``, ``torch.save``/``torch.load(weights_only=False)``, ``copy.deepcopy`` and DataLoader workers.
    """
    key = (cls, mixin)
    if key not in _PATCHED:
        new = type(f"VitPrune{cls.__name__}", (mixin, cls), {"__reduce_ex__": _reduce_swapped})
        _PATCHED[key] = new
        _ORIGINAL[new] = cls
    return _PATCHED[key]


def _reduce_swapped(self: nn.Module, protocol: int) -> tuple:
    cls = type(self)
    mixin = cls.__bases__[0]
    return _new_swapped, (_ORIGINAL[cls], mixin), self.__getstate__()


def _new_swapped(cls: type, mixin: type) -> nn.Module:
    """Unpickling: an empty instance of the swapped class (``__setstate__`` then restores its state)."""
    return object.__new__(patched_class(cls, mixin))


def original_class(cls: type) -> type:
    """The class a swapped class was made from (``cls`` itself if it was never swapped)."""
    return _ORIGINAL.get(cls, cls)


def swap_in(model: nn.Module, ctx: PatchContext, mixin: type) -> None:
    """Attach the patch context and swap the model's own class."""
    model._vitprune = ctx
    model.__class__ = patched_class(type(model), mixin)


def swap_out(model: nn.Module) -> None:
    """Undo :func:`swap_in`: the class the model had before patching, and no context."""
    model.__class__ = model._vitprune.original_class
    del model._vitprune


def no_intermediates(self: nn.Module, *args: object, **kwargs: object) -> None:
    """``forward_intermediates`` of a patched model (set as the mixins' method): one clear error instead of timm's
    per-block code, which would run the unreduced blocks and return features of the wrong model."""
    raise NotImplementedError(
        "forward_intermediates is not supported on a vitprune-patched model (token counts change per block); "
        "read vitprune.last_trace(model) after a forward, or vitprune.unpatch(model) first"
    )
