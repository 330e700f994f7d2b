"""What training leaves behind, and how a model is rebuilt from it.

A *trained checkpoint* is a folder holding only what was trained:

* ``selectors.safetensors`` — the method's own parameters (learned selectors), when it has any (kilobytes);
* ``backbone.safetensors`` — the fine-tuned model's own state dict (the plain timm layout, so
  ``vitprune bench --checkpoint`` and ``timm`` load it as-is), only when the backbone was trained;
* ``vitprune.json`` — the method, its config, the base model and which of the two files exist.

``vitprune.load(model_or_name, folder)`` = base weights + that folder → the patched, trained model.
The *resume state* (``resume.pt``: trainable tensors, optimizer, scheduler, step, RNG states) is separate and only
read by ``vitprune train --resume``; it is written atomically so a kill mid-write never corrupts it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .. import patching
from ..models import read_safetensors
from ..methods.base import TokenReducer

FORMAT = 1
SELECTORS = "selectors.safetensors"
BACKBONE = "backbone.safetensors"
CONFIG = "vitprune.json"
RESUME = "resume.pt"
METHOD_PREFIX = patching.METHOD_MODULE + "."
QUANT_BUFFER = ".input_max"  # hw.quant.QuantLinear's calibration buffer


def method_config(method: TokenReducer) -> dict[str, Any]:
    """The keyword config that rebuilds ``method`` (``create_method(name, **config)``), JSON-ready."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(method):
        if not f.init or f.name == "checkpoint":
            continue
        value = getattr(method, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def save_trained(model: nn.Module, folder: str | Path, *, model_name: str, backbone: bool,
                 base_checkpoint: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained parts of a patched model: selectors (if the method has any), the backbone if trained."""
    if not patching.is_patched(model):
        raise ValueError("save_trained needs a vitprune-patched model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # quantization-aware training leaves fake-quant calibration buffers (``input_max``); the checkpoint holds the
    # fp32 weights in the plain layout, to be quantized and calibrated again for deployment
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.endswith(QUANT_BUFFER)}
    selectors = {k.removeprefix(METHOD_PREFIX): v for k, v in state.items() if k.startswith(METHOD_PREFIX)}
    if not selectors and not backbone:
        raise ValueError(f"{model._vitprune.method.name} has no trainable selector; train the backbone instead")
    if selectors:
        save_file(selectors, str(folder / SELECTORS))
    if backbone:
        save_file({k: v for k, v in state.items() if not k.startswith(METHOD_PREFIX)}, str(folder / BACKBONE))
    method = model._vitprune.method
    config = {"format": FORMAT, "method": method.name, "config": method_config(method), "model": model_name,
              "base_checkpoint": base_checkpoint, "selectors": bool(selectors), "backbone": backbone, **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; give the folder that `vitprune train --out` wrote")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or "method" not in config:
        raise ValueError(f"{path} is not a vitprune trained checkpoint (format {FORMAT})")
    for flag, name in (("selectors", SELECTORS), ("backbone", BACKBONE)):
        if config.get(flag) and not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing; the checkpoint folder is incomplete")
    return config


def load_method_weights(module: nn.Module, folder: str | Path) -> None:
    """Load a selectors-only checkpoint into a method's module (strict: same blocks, same shapes)."""
    config = read_config(folder)
    if not config.get("selectors"):
        raise ValueError(f"{folder} holds no selectors (method {config['method']!r})")
    ref = next(iter(module.parameters()))
    tensors = {k: v.to(ref.device, ref.dtype) for k, v in read_safetensors(Path(folder) / SELECTORS).items()}
    _load_strict(module, tensors, folder)


def load_matching_selectors(module: nn.Module, folder: str | Path) -> list[str]:
    """Start selectors from a folder's selectors at the same blocks (multi-stage training adds one at a time);
    returns the blocks loaded. Shapes must match."""
    config = read_config(folder)
    if not config.get("selectors"):
        return []
    own = module.state_dict()
    tensors = read_safetensors(Path(folder) / SELECTORS)
    take = {k: v for k, v in tensors.items() if k in own}
    bad = [k for k, v in take.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{folder}: selector shapes differ ({bad[:3]}); it was trained for another model")
    module.load_state_dict({**own, **{k: v.to(own[k]) for k, v in take.items()}})
    return sorted({k.split(".")[0] for k in take})


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: Any) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = [k for k in own.keys() & tensors.keys() if own[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{source} does not fit this model/method: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shape mismatch {bad[:3]}; train for this model and config")
    if any(not torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise ValueError(f"{source} holds NaN/Inf weights; retrain or resume from an earlier checkpoint")
    module.load_state_dict(tensors)


def load(model: nn.Module | str, folder: str | Path, **create_kwargs: Any) -> nn.Module:
    """Rebuild a trained model: base weights (a model, or a name for ``vitprune.models.create_model``) + folder.

    The backbone (if it was trained) is loaded strictly before patching; then the method is patched with its
    config and its selectors loaded. On any error the given model is left as it was.
    """
    folder = Path(folder)
    config = read_config(folder)
    if isinstance(model, str):
        from ..models import create_model

        model = create_model(model, **create_kwargs)
    elif patching.is_patched(model):
        raise ValueError("vitprune.load needs the unpatched base model; call vitprune.unpatch(model) first")
    backup = {k: v.clone() for k, v in model.state_dict().items()} if config.get("backbone") else None
    try:
        if backup is not None:
            from ..models import load_checkpoint

            load_checkpoint(model, folder / BACKBONE)
        patching.patch(model, config["method"], **config["config"])
        if config.get("selectors"):
            load_method_weights(getattr(model, patching.METHOD_MODULE), folder)
    except Exception:
        if patching.is_patched(model):
            patching.unpatch(model)
        if backup is not None:
            model.load_state_dict(backup)
        raise
    return model.eval()


def save_resume(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a kill leaves either the old or the new state, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (run without --resume first)")
    return torch.load(path, map_location="cpu", weights_only=False)
