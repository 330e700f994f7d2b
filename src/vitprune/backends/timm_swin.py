"""timm Swin backend: a thin class swap of ``SwinTransformer`` (swin_tiny/small/base/large_patch4_window*_*).

Swin is a ViT in four stages of *windowed* attention: each block attends within 7×7 windows of a full, regular grid,
every other block shifted by half a window, and each stage after the first starts with a patch merging layer that
concatenates 2×2 neighbours. In a Swin block at 7×7 windows the per-token work — LayerNorm, the qkv and output
projections, the MLP — is ≈ 90% of the MACs, so that is what a pruned token saves:

* **Per-token work runs on the kept tokens only**, gathered as on ViT: each stage's blocks run through the shared
  engine (:func:`~vitprune.engine.run_blocks`) with :class:`WindowBlockOps`, and the learned selectors prune
  before their blocks exactly as they do on ViT/PiT.
* **Window attention runs on the grid.** The kept tokens' q/k/v go back to their grid positions (one gather that
  also does timm's cyclic shift and window partition: :class:`WindowLayout`), every position no kept token holds
  gets zeros and is masked as a key, and attention runs per window with timm's own relative position bias and
  shift mask, as ``SwinTransformerBlock``/``WindowAttention`` do; the outputs are gathered back to the kept tokens.
  A window with no kept token computes (finite) garbage that nothing reads.
* **Package tokens attend to themselves only** (their attention output is their own value vector): see
  :meth:`WindowBlockOps.attention` for why.
* **Patch merging runs on the restored grid** (:func:`vitprune.tokens.restore_grid`): kept tokens at their
  positions, every pruned position filled with the package token that holds it, as on PiT. The next stage starts
  from a full grid and its selectors prune again; after the last stage the grid is restored too, so the final norm
  and timm's head (average pooling) see every position.

Methods see one block numbering across stages (Swin-T: stage 0 = blocks 0–1, 1 = 2–3, 2 = 4–9, 3 = 10–11) and a
:class:`~vitprune.backends.timm_pit.StagedModelInfo`; keep rates are fractions of the *stage's* patch tokens.
Only the learned selectors (``spvit``, ``heatvit``) run here (see :func:`check_method`). Parameters are never
touched, so ``unpatch`` gives back the original model exactly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import EXP_ATTR, AttentionScores, masked_softmax
from ..engine import PatchContext, run_blocks
from ..kernels import fast_path_enabled, gelu_mlp_inplace, linear_into, workspace
from ..methods.base import ModelInfo, TokenReducer, Trace
from ..registry import register_backend
from ..tokens import TokenState, restore_grid
from .swap import no_intermediates, swap_in, swap_out
from .timm import _plain_gelu_mlp
from .timm_pit import StagedModelInfo, _Stage

try:
    from timm.layers import ClassifierHead
    from timm.models.swin_transformer import (
        PatchMerging,
        SwinTransformer,
        SwinTransformerBlock,
        WindowAttention,
        window_partition,
        window_reverse,
    )
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's Swin backend needs timm >= 1.0: pip install 'timm>=1.0'") from e


def is_timm_swin(model: nn.Module) -> bool:
    return isinstance(model, SwinTransformer)


def check_supported(model: nn.Module) -> None:
    """Only timm's own Swin pieces: the backend re-runs their parts (norms, qkv, bias table, shift mask, MLP)."""
    problems = []
    for s, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
            problems.append(f"stage {s} downsamples with {type(stage.downsample).__name__} (only PatchMerging)")
        for i, block in enumerate(stage.blocks):
            if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
                problems.append(f"stage {s} block {i} is {type(block).__name__} (only timm's SwinTransformerBlock "
                                "with WindowAttention is supported)")
                break
    if not isinstance(model.head, ClassifierHead):
        problems.append(f"head is {type(model.head).__name__} (only timm's ClassifierHead)")
    if problems:
        raise ValueError(f"cannot patch {type(model).__name__}: " + "; ".join(problems)
                         + ". Use a timm Swin (e.g. timm.create_model('swin_tiny_patch4_window7_224')).")


def check_method(model: nn.Module, method: TokenReducer) -> None:
    """Only the learned selectors run on Swin; the training-free methods would mis-run, so they are refused."""
    if not getattr(method, "supports_stages", False):
        raise ValueError(
            f"method {method.name!r} cannot run on {type(model).__name__} (Swin): Swin has no CLS token (so no CLS "
            "attention to score tokens by), its attention is windowed (there is no global attention map to rank or "
            "merge by), and its windows and patch merging need every token back on the full grid, which vitprune "
            "does for the learned selectors only; use 'spvit' or 'heatvit' (vitprune.patch(model, 'spvit') takes "
            "SPViT's Swin budget by default), or a plain ViT/DeiT for ToMe/EViT/PPT/ToGo"
        )


def model_info(model: nn.Module) -> StagedModelInfo:
    stages = []
    for stage in model.layers:
        block = stage.blocks[0]
        dim = block.norm1.normalized_shape[0]
        stages.append(ModelInfo(depth=len(stage.blocks), dim=dim, num_heads=block.attn.num_heads, num_prefix=0,
                                grid=tuple(block.input_resolution), mlp_ratio=block.mlp.fc1.out_features / dim,
                                has_cls=False))
    proj = model.patch_embed.proj
    first = stages[0]
    fc = model.head.fc
    return StagedModelInfo(
        depth=sum(s.depth for s in stages), dim=first.dim, num_heads=first.num_heads, num_prefix=0,
        grid=first.grid, mlp_ratio=first.mlp_ratio, has_cls=False,
        patch_embed_macs=first.num_patches * proj.weight[0].numel() * proj.out_channels,
        head_macs=fc.weight.numel() if isinstance(fc, nn.Linear) else 0,
        stages=tuple(stages),
    )


# ---- window layout --------------------------------------------------------------------------------------------

@dataclass
class WindowLayout:
    """Where the current tokens sit in one block's shifted, window-partitioned grid (built once per token layout
    and window/shift, shared by the blocks of a stage).

    ``src``: [B·nW·A] row of every window slot in the block's q/k/v rows ``[B·N tokens | zero | pad]`` (``zero``:
    a position no kept token holds; ``pad``: timm's zero padding of a grid the window does not divide, whose q/k/v
    are ``qkv(0)`` and which timm attends to like a token). ``window``/``slot``: [B·Np] the window and the slot in
    it of each patch token's position, to gather the outputs back. ``mask``: additive [B or 1, nW, 1, A, A] shift
    mask + key mask (−max for empty positions: finite, so a window with no token at all gives no NaN) or None.
    ``key_weight``: [B·nW, A] soft key weights while a selector trains with gradient (``masked_softmax``) or None.
    """

    src: Tensor
    window: Tensor
    slot: Tensor
    num_windows: int
    area: int
    mask: Tensor | None
    key_weight: Tensor | None
    full: bool  # every position holds a token, no package, no soft mask: q/k/v can be computed on the windows
    padded: bool  # the window does not divide the grid (timm pads)


def _shift_mask(block: nn.Module, padded: tuple[int, int], like: Tensor) -> Tensor | None:
    """timm's shift mask ([nW, A, A], 0 / −100) for this block, or None for an unshifted one."""
    if not any(block.shift_size):
        return None
    if block.attn_mask is not None and not getattr(block, "dynamic_mask", False):
        return block.attn_mask.to(like.dtype)
    return block.get_attn_mask(like.new_empty(1, padded[0], padded[1], 1))


def build_layout(state: TokenState, block: nn.Module, soft: bool) -> WindowLayout:
    """Map the tokens of ``state`` onto ``block``'s windows, with timm's own roll / pad / window_partition applied
    to integer row numbers, so the arrangement is timm's by construction. ``soft``: a selector trains with
    gradient — every patch token stays on the grid and its keep weight masks it as a key."""
    x, index, keep = state.x, state.index, state.keep
    b, n = index.shape
    h, w = state.grid
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    device = x.device
    zero, pad = b * n, b * n + 1
    is_patch = index >= state.num_prefix
    placed = is_patch if (keep is None or soft) else is_patch & (keep > 0)  # padding of adaptive batches: off grid
    rows = torch.arange(b * n, device=device).view(b, n)
    where = torch.where(placed, index - state.num_prefix, h * w)  # off grid → the spare column h·w
    cells = torch.full((b, h * w + 1), zero, dtype=torch.long, device=device).scatter_(1, where, rows)
    cells = cells[:, : h * w].view(b, h, w, 1)
    if sh or sw:
        cells = torch.roll(cells, shifts=(-sh, -sw), dims=(1, 2))
    ph, pw = (wh - h % wh) % wh, (ww - w % ww) % ww
    cells = F.pad(cells, (0, 0, 0, pw, 0, ph), value=pad)
    hp, wp = h + ph, w + pw
    src = window_partition(cells, (wh, ww)).reshape(-1)
    area, num_windows = wh * ww, (hp // wh) * (wp // ww)
    # where each grid position's output lands: window_reverse of the slot numbers, un-padded, shifted back
    ordinal = torch.arange(b * num_windows * area, device=device).view(b * num_windows, wh, ww, 1)
    landing = window_reverse(ordinal, (wh, ww), hp, wp)[:, :h, :w]
    if sh or sw:
        landing = torch.roll(landing, shifts=(sh, sw), dims=(1, 2))
    n_patch = int(is_patch[0].sum())
    first = state.num_prefix
    dst = landing.reshape(b, h * w).gather(1, (index[:, first:first + n_patch] - first).clamp_min(0)).reshape(-1)
    mask = _shift_mask(block, (hp, wp), x)
    mask = None if mask is None else mask.view(1, num_windows, 1, area, area)
    key_weight = None
    empty = (src == zero).view(b, num_windows, 1, 1, area)
    if soft:
        weights = torch.cat([keep.reshape(-1), keep.new_tensor([0.0, 1.0])])
        key_weight = weights.index_select(0, src).view(b * num_windows, area)
    elif bool(empty.any()):
        key = torch.zeros(empty.shape, dtype=x.dtype, device=device).masked_fill_(empty, torch.finfo(x.dtype).min)
        mask = key if mask is None else mask + key
    full = not soft and not bool(empty.any()) and n_patch == n
    return WindowLayout(src=src, window=dst // area, slot=dst % area, num_windows=num_windows, area=area,
                        mask=mask, key_weight=key_weight, full=full, padded=bool(ph or pw))


class _SwinStage(_Stage):
    """The method seen from one Swin stage (PiT's view: global block numbers, the package that holds each pruned
    position), plus the window layouts of the tokens the blocks currently run on, rebuilt only when a selector
    changes the tokens."""

    def __init__(self, method: TokenReducer, first: int, grid: tuple[int, int]) -> None:
        super().__init__(method, first, 0, grid[0] * grid[1])
        self.state: TokenState | None = None
        self.reduced = False  # a selector changed the tokens: the grid must be restored
        self._layouts: dict[tuple, WindowLayout] = {}

    def before_attention(self, layer: int, state: TokenState, trace: Trace) -> TokenState:
        new = super().before_attention(layer, state, trace)
        if self.state is None or new.index is not self.state.index or new.keep is not self.state.keep:
            self._layouts.clear()
        self.reduced |= new is not state
        self.state = new
        return new

    def layout(self, block: nn.Module) -> WindowLayout:
        keep = self.state.keep
        soft = keep is not None and keep.requires_grad
        key = (tuple(block.window_size), tuple(block.shift_size))
        if key not in self._layouts:
            self._layouts[key] = build_layout(self.state, block, soft)
        return self._layouts[key]


# ---- the block ----------------------------------------------------------------------------------------------

class WindowBlockOps:
    """Runs the parts of a timm ``SwinTransformerBlock`` on the kept tokens of one stage (see module docstring)."""

    def __init__(self, stage: _SwinStage) -> None:
        self.stage = stage

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.norm1(x)

    def attention(
        self, block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        """Window attention of the tokens ``h`` [B, N, C] (patch tokens, then package tokens).

        Package tokens attend to themselves only, so their attention output is their own value vector. A package
        holds tokens from all over the image, so it has no window; letting it attend to every kept token would
        give it a global receptive field no Swin block was trained with, and letting it into windows as a key
        would put one vector into every window's softmax. Attending to itself is what a token alone in its window
        gets — the update the pruned tokens it stands for would get with all their neighbours pruned — and costs
        nothing. ``size`` (proportional attention) changes nothing here: every key in a window is one patch.
        """
        attn = block.attn
        layout = self.stage.layout(block)
        b, n, _ = h.shape
        heads, width = attn.num_heads, attn.qkv.out_features
        if layout.full:  # every position held, no package: qkv on the windows, as timm (moves C, not 3·C, wide rows)
            windows, values = self._window_qkv(attn, h, layout), None
        else:
            rows = self._qkv_rows(attn, h)  # [B·N + 2, 3·attn_dim]
            windows, values = rows.index_select(0, layout.src), rows[: b * n].view(b, n, width)
        q, k, v = windows.view(-1, layout.area, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(attn, q, k, v, layout)  # [B·nW, heads, A, d]
        n_patch = layout.window.shape[0] // b
        out = out[layout.window, :, layout.slot].reshape(b, n_patch, -1)
        if n_patch < n:  # package tokens: their own value vector
            out = torch.cat([out, values[:, n_patch:, 2 * width // 3:]], dim=1)
        # scores per window (each window one sequence); the selectors, the only methods that run here, never read them
        return attn.proj_drop(attn.proj(out)), AttentionScores(q, k, v, attn.scale, None)

    @staticmethod
    def _window_qkv(attn: nn.Module, h: Tensor, layout: WindowLayout) -> Tensor:
        """[B·nW·A, 3·attn_dim] q/k/v of the windows from the tokens' rows, timm's padding being zero rows."""
        h2d = h.reshape(-1, h.shape[-1])
        if layout.padded:
            h2d = torch.cat([h2d, h2d.new_zeros(2, h2d.shape[1])])
        rows = h2d.index_select(0, layout.src)
        if fast_path_enabled(attn) and type(attn.qkv) is nn.Linear:
            return linear_into(rows, attn.qkv, "swin_qkv")
        return attn.qkv(rows)

    @staticmethod
    def _qkv_rows(attn: nn.Module, h: Tensor) -> Tensor:
        """qkv of every token as rows, then a zero row (empty positions) and ``qkv(0)`` (timm's padding)."""
        h2d = h.reshape(-1, h.shape[-1])
        m, width = h2d.shape[0], attn.qkv.out_features
        bias = attn.qkv.bias
        if fast_path_enabled(attn) and type(attn.qkv) is nn.Linear:
            rows = workspace("swin_qkv", m + 2, width, h2d)
            if bias is None:
                torch.mm(h2d, attn.qkv.weight.t(), out=rows[:m])
                rows[m:].zero_()
            else:
                torch.addmm(bias, h2d, attn.qkv.weight.t(), out=rows[:m])
                rows[m].zero_()
                rows[m + 1].copy_(bias)
            return rows
        qkv = attn.qkv(h2d)
        pad = attn.qkv(h2d.new_zeros(1, h2d.shape[1])) if bias is not None else qkv.new_zeros(1, width)
        return torch.cat([qkv, qkv.new_zeros(1, width), pad])

    @staticmethod
    def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout) -> Tensor:
        """timm's window attention: relative position bias + shift mask (+ key mask), one fused SDPA call; the
        explicit softmax when a selector trains with gradient (soft key weights) or the exp is replaced."""
        heads, area = attn.num_heads, layout.area
        bias = attn._get_rel_pos_bias().to(q.dtype)  # [1, heads, A, A]
        if layout.mask is not None:
            bias = (bias.unsqueeze(1) + layout.mask).view(-1, heads, area, area)  # [B·nW or nW, heads, A, A]
        if 1 < bias.shape[0] != q.shape[0]:  # one per window: one per image and window
            bias = bias.view(1, -1, heads, area, area).expand(q.shape[0] // bias.shape[0], -1, -1, -1, -1)
            bias = bias.reshape(q.shape[0], heads, area, area)
        dropout = attn.attn_drop.p if attn.training else 0.0
        exp = getattr(attn, EXP_ATTR, None)
        if layout.key_weight is None and exp is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
        weights = masked_softmax(logits, layout.key_weight, exp or torch.exp).to(q.dtype)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        return weights @ v

    @staticmethod
    def attn_residual(block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + block.drop_path1(y)

    @staticmethod
    def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
        mlp = block.mlp
        if fast_path_enabled(block) and _plain_gelu_mlp(mlp):
            return x.add_(gelu_mlp_inplace(mlp.fc1, mlp.act, mlp.fc2, block.norm2(x)))
        return x + block.drop_path2(mlp(block.norm2(x)))


# ---- the model ----------------------------------------------------------------------------------------------

def _check_input(model: nn.Module, x: Tensor) -> None:
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty [B, C, H, W] image batch, got shape {tuple(x.shape)}")
    in_chans = model.patch_embed.proj.in_channels
    if x.shape[1] != in_chans:
        raise ValueError(f"model expects {in_chans} input channel(s), got {x.shape[1]}; convert the images first")
    size = tuple(model.patch_embed.img_size)
    if tuple(x.shape[-2:]) != size:
        raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the model's {size[0]}x{size[1]}: the "
                         "selectors' keep counts are fractions of that grid; resize the images, or build the model "
                         "for your size (timm.create_model(..., img_size=...)) and patch it again")


def _kept_positions(state: TokenState) -> Tensor:
    """[B, H, W] keep weight of the patch token at each grid position (0 where a package fills it)."""
    h, w = state.grid
    b, n = state.index.shape
    is_patch = state.index >= 0
    weight = state.keep if state.keep is not None else state.x.new_ones(b, n)
    where = torch.where(is_patch, state.index, h * w)
    grid = weight.new_zeros(b, h * w + 1).scatter(1, where, weight * is_patch)
    return grid[:, : h * w].view(b, h, w)


class PatchedSwinTransformer:
    """Mixin placed in front of the model's own class; see module docstring."""

    _vitprune: PatchContext

    def forward_features(self, x: Tensor) -> Tensor:
        _check_input(self, x)
        ctx = self._vitprune
        x = self.patch_embed(x)  # [B, H, W, C]
        trace, first = Trace(), 0
        for stage in self.layers:
            x = stage.downsample(x)
            b, h, w, c = x.shape
            state = TokenState.initial(x.reshape(b, h * w, c), 0, grid=(h, w), trace_source=ctx.trace_source)
            view = _SwinStage(ctx.method, first, (h, w))
            state = run_blocks(stage.blocks, WindowBlockOps(view), state, view, trace)
            first += len(stage.blocks)
            if view.reduced:
                grid, _ = restore_grid(state, "package", view.owner)  # [B, C, H, W]
                x = grid.permute(0, 2, 3, 1)
            else:
                x = state.x.view(b, h, w, c)
        ctx.finish(state, trace)
        # the features are the restored grid: the training loop's token term compares it position by position,
        # over the positions a kept token holds
        ctx.final_size, ctx.final_keep = None, _kept_positions(state) if view.reduced else None
        return self.norm(x)

    forward_intermediates = no_intermediates


def apply(model: nn.Module, ctx: PatchContext) -> None:
    swap_in(model, ctx, PatchedSwinTransformer)


def restore(model: nn.Module) -> None:
    swap_out(model)


register_backend("timm_swin", is_timm_swin, sys.modules[__name__])
