"""The shared grid restore (tokens.restore_grid): identity when nothing was reduced, ToMe's unmerge follows the
source map, pruned positions get the documented fill, soft keep masks blend with the package."""
from __future__ import annotations

import pytest
import torch

from vitprune.methods.evit import EViT
from vitprune.methods.tome import bipartite_soft_matching
from vitprune.methods.base import Trace
from vitprune.tokens import PACKAGE_INDEX, TokenState, append_token, gather_tokens, grid_holders, merge_tokens, \
    restore_grid, with_prefix

B, P, H, W, C = 2, 1, 4, 5, 8


def initial(trace_source: bool = True) -> TokenState:
    x = torch.randn(B, P + H * W, C)
    return TokenState.initial(x, P, grid=(H, W), trace_source=trace_source)


def as_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, HW, C] patch tokens in raster order → [B, C, H, W]."""
    return tokens.transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize("trace_source", [True, False])
@pytest.mark.parametrize("fill", ["package", "zeros"])
def test_restore_of_unreduced_tokens_is_the_identity(trace_source, fill):
    state = initial(trace_source)
    grid, covered = restore_grid(state, fill)
    torch.testing.assert_close(grid, as_grid(state.x[:, P:]), rtol=0, atol=0)
    assert covered.shape == (B, H, W) and bool((covered == 1).all())


def test_tome_unmerge_puts_each_token_on_exactly_the_patches_it_holds():
    state = initial()
    for r in (5, 4):  # two rounds: merged tokens merge again
        merge, layout = bipartite_soft_matching(torch.randn_like(state.x), r, P)
        state = merge_tokens(state, merge, layout)
    assert state.num_tokens == P + H * W - 9
    grid, covered = restore_grid(state)
    flat = grid.flatten(2).transpose(1, 2)  # [B, HW, C]
    assert bool((covered == 1).all())  # merging leaves no patch without a token
    for b in range(B):
        for t in range(P, state.num_tokens):
            patches = state.source[b, t, P:].nonzero().flatten()
            assert len(patches) == int(state.size[b, t, 0])  # the source map agrees with the size
            torch.testing.assert_close(flat[b, patches], state.x[b, t].expand(len(patches), C), rtol=0, atol=0)
    # every patch is held by exactly one token, so the patches above cover the grid once
    assert bool((state.source[:, P:, P:].sum(1) == 1).all())


def test_merged_tokens_without_a_source_map_raise_instead_of_guessing():
    state = initial(trace_source=False)
    merge, layout = bipartite_soft_matching(torch.randn_like(state.x), 3, P)
    with pytest.raises(ValueError, match="trace_source=True"):
        restore_grid(merge_tokens(state, merge, layout))


def evit_state(fuse: bool, trace_source: bool = True) -> tuple[TokenState, torch.Tensor]:
    """EViT keeps 12 of the 20 patches at block 0 by the CLS attention it is given."""
    method = EViT(keep=0.6, blocks=(0,), fuse=fuse)
    method.setup(_info())
    state = initial(trace_source)
    attn = torch.rand(B, 2, P + H * W).softmax(-1)

    class Scores:
        def token_attn(self, has_cls):  # noqa: ARG002
            return attn

    reduced = method.reduce(0, state, Scores(), Trace())
    return reduced, attn


def _info():
    from vitprune.methods.base import ModelInfo

    return ModelInfo(depth=2, dim=C, num_heads=2, num_prefix=P, grid=(H, W), mlp_ratio=4.0)


@pytest.mark.parametrize("trace_source", [True, False])
def test_pruned_positions_get_the_package_or_zeros_as_documented(trace_source):
    state, _ = evit_state(fuse=True, trace_source=trace_source)
    assert state.num_tokens == P + 12 + 1 and int(state.index[0, -1]) == PACKAGE_INDEX
    kept = torch.zeros(B, H * W, dtype=torch.bool)
    kept.scatter_(1, state.index[:, P:-1] - P, True)
    package = state.x[:, -1]
    for fill in ("package", "zeros"):
        grid, covered = restore_grid(state, fill)
        flat = grid.flatten(2).transpose(1, 2)
        for b in range(B):
            torch.testing.assert_close(flat[b, state.index[b, P:-1] - P], state.x[b, P:-1], rtol=0, atol=0)
            want = package[b].expand(int((~kept[b]).sum()), C) if fill == "package" else torch.zeros(8, C)
            torch.testing.assert_close(flat[b, ~kept[b]], want, rtol=0, atol=0)
        assert torch.equal(covered.flatten(1) > 0, kept | (fill == "package"))


def test_pruning_without_a_package_leaves_zeros_and_says_so():
    state, _ = evit_state(fuse=False)
    grid, covered = restore_grid(state, "package")
    flat = grid.flatten(2).transpose(1, 2)
    missing = covered.flatten(1) == 0
    assert int(missing[0].sum()) == 8
    assert bool((flat[missing] == 0).all())


def test_soft_keep_blends_token_and_package():
    """While a selector trains nothing is removed: a position gets keep·token + (1 − keep)·package."""
    state = initial(trace_source=False)
    keep = torch.rand(B, P + H * W)
    keep[:, :P] = 1
    pkg = torch.randn(B, C)
    state = append_token(state.__class__(**{**state.__dict__, "keep": keep}), pkg, torch.full((B,), 3.0), None,
                         torch.full((B,), PACKAGE_INDEX))
    grid, covered = restore_grid(state)
    flat = grid.flatten(2).transpose(1, 2)
    k = keep[:, P:].unsqueeze(-1)
    torch.testing.assert_close(flat, k * state.x[:, P:-1] + (1 - k) * pkg.unsqueeze(1))
    torch.testing.assert_close(covered.flatten(1), torch.ones(B, H * W))


def test_grid_holders_of_gathered_tokens_follow_their_index():
    state = initial(trace_source=False)
    idx = torch.stack([torch.randperm(H * W)[:7] for _ in range(B)])
    kept = gather_tokens(state, with_prefix(idx, P))
    patch, package = grid_holders(kept)
    for b in range(B):
        assert sorted(patch[b][patch[b] >= 0].tolist()) == list(range(P, P + 7))
        assert torch.equal(kept.index[b, patch[b, idx[b]]], idx[b] + P)
    assert bool((package == -1).all())


def test_bad_fill_is_one_clear_error():
    with pytest.raises(ValueError, match="fill must be one of"):
        restore_grid(initial(), "nearest")
