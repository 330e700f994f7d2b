"""What every method is: a small config object that says where it acts and how it reduces a TokenState."""
from __future__ import annotations

from dataclasses import dataclass, field
import numbers
from typing import Any, ClassVar, Iterable, Sequence

from torch import Tensor

from ..attention import AttentionScores
from ..tokens import TokenState


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that methods need to validate and plan their schedule (backend-independent)."""

    depth: int
    dim: int
    num_heads: int
    num_prefix: int  # CLS + distillation + register tokens (never reduced)
    grid: tuple[int, int]  # patch grid (rows, cols) at the model's image size
    mlp_ratio: float = 4.0
    has_cls: bool = True  # methods scored by CLS attention need one
    patch_embed_macs: int = 0  # per image, so methods can plan against the whole model's MACs
    head_macs: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix


@dataclass
class Snapshot:
    """Where the tokens stood after a block that reduced them (recorded only with ``trace_source=True``)."""

    layer: int
    source: Tensor  # [B, N, N0]
    size: Tensor  # [B, N, 1]
    index: Tensor  # [B, N]


@dataclass
class Trace:
    """Per-forward record: tokens entering each block's attention and MLP, plus whatever methods note."""

    tokens_attn: list[int] = field(default_factory=list)
    tokens_mlp: list[int] = field(default_factory=list)
    notes: dict[str, dict[int, Any]] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)

    def note(self, key: str, layer: int, value: Any) -> None:
        self.notes.setdefault(key, {})[layer] = value


class TokenReducer:
    """Base of all methods. Subclasses are dataclasses registered with ``@register_method``.

    The engine calls, for every block ``layer``: ``before_attention`` (learned selectors act here), then attention,
    then ``reduce`` between the attention residual and the MLP (ToMe, EViT, PPT, ToGo act here).
    """

    name: ClassVar[str] = "base"
    prop_attn: bool = False
    has_cls: ClassVar[bool] = True  # attention-scored methods set it from ModelInfo in ``setup``

    def setup(self, info: ModelInfo) -> None:
        """Validate the config against the model and precompute the schedule; raise ValueError on bad settings."""

    def before_attention(self, layer: int, state: TokenState, trace: Trace) -> TokenState:
        return state

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        return state

    def describe(self) -> str:
        """A short config string for tables, e.g. ``r=13``."""
        return ""

    @property
    def static_shapes(self) -> bool:
        """True when every block's token count is fixed by the config (not by the data), so the patched model can
        be exported with static shapes (ONNX) and batched without padding. Data-dependent methods override."""
        return True


def check_keep(keep: float, what: str = "keep") -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(
            f"{what} must be a fraction of tokens to keep in (0, 1], got {keep!r}; "
            "use 1.0 to keep all tokens, a smaller value (e.g. 0.7) to prune"
        )
    return float(keep)


def is_whole(v: Any) -> bool:
    """An integer (Python or numpy), not a bool: block indices and token counts must be whole numbers."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_blocks(blocks: int | Sequence[int], depth: int, method: str) -> tuple[int, ...]:
    """Validated block indices, **in the order given**, so per-block values pair with the blocks the user paired them
    with (:func:`per_block` then orders them). A single int means one block."""
    if is_whole(blocks):
        blocks = (blocks,)
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise TypeError(f"{method}: blocks must be block indices, e.g. blocks=(3, 6, 9), got {blocks!r}")
    blocks = tuple(blocks)
    if not blocks:
        raise ValueError(
            f"{method}: blocks is empty, so nothing would be reduced; give the blocks to reduce at, e.g. blocks=(3, 6, 9) "
            "(to run the model without reduction, vitprune.unpatch it)"
        )
    not_whole = [b for b in blocks if not is_whole(b)]
    if not_whole:
        raise TypeError(f"{method}: blocks must be whole block indices, got {not_whole}")
    blocks = tuple(int(b) for b in blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"{method}: blocks {bad} do not exist; this model has blocks 0..{depth - 1}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{method}: blocks {blocks} repeat a block; list each block once")
    return blocks


def per_block(value: Any, blocks: Sequence[int], what: str) -> dict[int, Any]:
    """A scalar, or one value per block in the order ``blocks`` was given → {block: value} in ascending block order."""
    if isinstance(value, (numbers.Number, str)):  # a bool too: the caller's check says what it should be
        values = tuple(value for _ in blocks)
    elif isinstance(value, Iterable):
        values = tuple(value)
    else:
        raise TypeError(f"{what} must be a number or one number per block, got {value!r}")
    if len(values) != len(blocks):
        raise ValueError(f"{what} has {len(values)} values for {len(blocks)} blocks {tuple(blocks)}; give one per block")
    return dict(sorted(zip(blocks, values)))
