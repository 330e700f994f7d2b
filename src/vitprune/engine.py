"""The one token engine: runs transformer blocks over a TokenState and lets a method reduce it in between.

Backends describe how to run the pieces of their block (``BlockOps``); methods describe how to reduce tokens.
Neither knows the other, so every method works on every backend.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from torch import Tensor, nn

from .attention import AttentionScores
from .methods.base import ModelInfo, Snapshot, TokenReducer, Trace
from .tokens import TokenState


class BlockOps(Protocol):
    """How a backend runs the parts of one pre-norm transformer block."""

    def norm1(self, block: nn.Module, x: Tensor) -> Tensor: ...

    def attention(
        self, block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None
    ) -> tuple[Tensor, AttentionScores]:
        """``size``: proportional-attention sizes or None; ``keep``: [B, N] key mask (selector training) or None.

        Backends of RoPE models take one more keyword, ``pos``: the tokens' rotary positions (``TokenState.pos``).
        """

    def attn_residual(self, block: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor: ...


def run_blocks(
    blocks: Sequence[nn.Module], ops: BlockOps, state: TokenState, method: TokenReducer, trace: Trace,
    after_block: Callable[[int, TokenState], None] | None = None,
) -> TokenState:
    """x → [method.before_attention] → attention (+size bias) → residual → [method.reduce] → MLP → residual.

    ``after_block(layer, state)`` sees each block's output (``forward_intermediates`` collects features with it).
    """
    for layer, block in enumerate(blocks):
        state = method.before_attention(layer, state, trace)
        trace.tokens_attn.append(state.num_tokens)
        size = state.size if method.prop_attn else None
        rope = {} if state.pos is None else {"pos": state.pos}  # only RoPE backends carry positions
        y, scores = ops.attention(block, ops.norm1(block, state.x), size, state.keep, **rope)
        state = state.with_x(ops.attn_residual(block, state.x, y))
        reduced = method.reduce(layer, state, scores, trace)
        if reduced is not state and reduced.source is not None:
            trace.snapshots.append(Snapshot(layer, reduced.source.detach(), reduced.sizes().detach(), reduced.index))
        state = reduced
        trace.tokens_mlp.append(state.num_tokens)
        state = state.with_x(ops.mlp_residual(block, state.x))
        if after_block is not None:
            after_block(layer, state)
    return state


class PatchContext:
    """What ``vitprune.patch`` attaches to a model (as ``model._vitprune``): the method and the last forward's trace."""

    def __init__(self, method: TokenReducer, info: ModelInfo, original_class: type, trace_source: bool) -> None:
        self.method = method
        self.info = info
        self.original_class = original_class
        self.trace_source = trace_source
        self.last_trace: Trace | None = None
        self.last_state: TokenState | None = None  # detached sizes/sources/positions, only when tracing
        self.final_size: Tensor | None = None  # sizes after the last block, for size-weighted pooling
        self.final_keep: Tensor | None = None  # keep mask after the last block (selector training / padding)

    def finish(self, state: TokenState, trace: Trace) -> None:
        self.last_trace = trace
        self.final_size = state.size
        self.final_keep = state.keep
        if self.trace_source:
            self.last_state = TokenState(
                x=state.x.detach(),
                num_prefix=state.num_prefix,
                size=None if state.size is None else state.size.detach(),
                source=None if state.source is None else state.source.detach(),
                index=state.index,
                grid=state.grid,
            )

    def __getstate__(self) -> dict:
        """Pickle / deepcopy the method, not the last forward's record (transient, and possibly part of a graph)."""
        state = dict(self.__dict__)
        state.update(last_trace=None, last_state=None, final_size=None, final_keep=None)
        return state

    def __repr__(self) -> str:
        return f"PatchContext(method={self.method!r})"
