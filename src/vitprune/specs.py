"""Method specs as text, for the CLI and result files: ``"tome:r=13"``, ``"evit:keep=0.7,blocks=(3,6,9)"``."""
from __future__ import annotations

import ast
import re
from typing import Any

_OPTION_SPLIT = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")  # commas that start a new key=value


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` → (name, config). Values are Python literals (ints, floats, tuples, lists,
    strings, booleans); a bare word is taken as a string. ``"none"`` is the unpatched model."""
    name, _, options = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "ckpt":
        return trained_spec(options.strip())
    if name == "recipe":  # a `vitprune tune` result: recipe:DIR/recipe.json
        from .tune import read_recipe

        return read_recipe(options.strip())
    if not name:
        raise ValueError(f"empty method spec {spec!r}; write e.g. 'tome:r=13'")
    config: dict[str, Any] = {}
    for item in _OPTION_SPLIT.split(options) if options.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"cannot read option {item!r} in {spec!r}; write key=value, e.g. 'evit:keep=0.7,blocks=(3,6,9)'")
        config[key.strip()] = _literal(value.strip())
    return name, config


def trained_spec(folder: str) -> tuple[str, dict[str, Any]]:
    """``"ckpt:<folder>"``: the method and config a `vitprune train` folder was trained with, its selectors loaded.

    Only selectors travel this way; a fine-tuned backbone is the model's weights (``--checkpoint``)."""
    from .train.checkpoint import read_config

    config = read_config(folder)
    if not config.get("selectors"):
        raise ValueError(f"{folder} trained no selectors; pass its backbone.safetensors as --checkpoint and "
                         f"-m {config['method']}:... for the method")
    return config["method"], {**config["config"], "checkpoint": str(folder)}


def format_method_spec(name: str, config: dict[str, Any]) -> str:
    if not config:
        return name
    return name + ":" + ",".join(f"{k}={_compact(v)}" for k, v in config.items())


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _compact(value: Any) -> str:
    return repr(value).replace(" ", "")
