"""The papers' own code as benchmark rows: official ToMe and PPT, imported from a checkout the user points at.

Nothing of the peers is vendored (ToMe is CC BY-NC); a benchmark takes ``--peer NAME=DIR`` with DIR a clone of

* ``tome``: https://github.com/facebookresearch/ToMe (the ``tome`` package, ``tome.patch.timm``);
* ``ppt``: https://github.com/xjwu1024/PPT (``ppt_deit.py`` and its own ``tome.py``).

Both patch today's timm ``VisionTransformer`` in place and, at the configurations below, give the same logits as
vitprune's ToMe and PPT within 1e-5 (checked when a peer is loaded, so a peer row never times different work).
Both repos name a module ``tome``; each peer is imported with its own directory first on ``sys.path`` and the other's
``tome`` modules set aside, so the two can sit in one process.
"""
from __future__ import annotations

import copy
import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import vitprune
from vitprune.specs import parse_method_spec


@dataclass(frozen=True)
class Peer:
    label: str
    spec: str  # the vitprune method spec doing the same work
    patch: Callable[[nn.Module], nn.Module]  # patches a copy of the model with the official code


def _import_from(directory: str, module: str) -> object:
    """Import ``module`` with ``directory`` first on the path and no other checkout's ``tome`` in the way."""
    clashing = ("tome", module.split(".")[0])
    aside = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in clashing}
    sys.path.insert(0, directory)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"--peer: cannot import {module} from {directory} ({e}); pass a clone of the official repo") \
            from None
    finally:
        sys.path.remove(directory)
        for k in [k for k in sys.modules if k.split(".")[0] in clashing]:
            sys.modules.pop(k)  # the loaded module keeps its own references; the next peer imports afresh
        sys.modules.update(aside)


def _official_tome(directory: str) -> Peer:
    timm_patch = _import_from(directory, "tome.patch.timm")

    def patch(model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model)
        timm_patch.apply_patch(model)
        model.r = 13
        return model

    return Peer("official ToMe r=13", "tome:r=13", patch)


def _official_ppt(directory: str) -> Peer:
    ppt_deit = _import_from(directory, "ppt_deit")

    def patch(model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model)
        ppt_deit.apply_patch(model, pp_loc_list=[3, 6, 9], threshold=7e-5)
        model.r = 50
        return model

    return Peer("official PPT r=50 @3,6,9", "ppt:r=50", patch)


OFFICIAL: dict[str, Callable[[str], Peer]] = {"tome": _official_tome, "ppt": _official_ppt}


def load_peers(options: list[str], model: nn.Module, x: torch.Tensor) -> list[Peer]:
    """``["tome=DIR", ...]`` → peers, each checked to compute what vitprune's method computes on ``x``."""
    peers = []
    for option in options:
        name, sep, directory = option.partition("=")
        if not sep or name not in OFFICIAL:
            raise SystemExit(f"--peer {option!r}: expected NAME=DIR with NAME one of {sorted(OFFICIAL)}")
        peer = OFFICIAL[name](directory)
        method, config = parse_method_spec(peer.spec)
        ours = vitprune.patch(copy.deepcopy(model), method, **config)
        with torch.inference_mode():
            gap = (peer.patch(model)(x) - ours(x)).abs().max().item()
        if gap > 1e-5:
            raise SystemExit(f"{peer.label} differs from vitprune's {peer.spec} by {gap:.2e}: not the same work")
        peers.append(peer)
    return peers
