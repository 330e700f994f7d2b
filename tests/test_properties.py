"""Property-based checks of ``vitprune.patch`` over drawn methods, configs (valid and invalid), model shapes, batch
sizes and dtypes (hypothesis).

Invalid input → one ValueError or TypeError with a message, and the model untouched: class, state dict, outputs.
Valid input → finite outputs that equal the images run one at a time, and ``unpatch`` gives the original back.
Derandomized, so CI draws the same 500 examples every run.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import vitprune

pytestmark = pytest.mark.usefixtures("one_thread")

# (image size, patch size, depth, register tokens, global pool): 4 to 16 patches, 3 or 4 blocks
SHAPES = [(32, 8, 4, 0, "token"), (24, 8, 3, 0, "avg"), (32, 8, 4, 1, "token"), (16, 4, 4, 0, "token"),
          (32, 16, 3, 0, "avg"), (32, 8, 3, 0, "map")]  # map: SigLIP-like, no CLS token


@lru_cache(maxsize=None)
def base_model(shape: tuple) -> VisionTransformer:
    img, patch, depth, reg, pool = shape
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=32, depth=depth, num_heads=2, num_classes=5,
                             reg_tokens=reg, global_pool=pool, class_token=pool != "map").eval()


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Seven draws in eight from ``valid``: every option may be wrong, so most examples should run."""
    return st.integers(0, 7).flatmap(lambda i: valid if i else invalid)


blocks = mostly(
    st.lists(st.integers(1, 2), min_size=1, max_size=2, unique=True).map(tuple),  # exist in every shape
    st.one_of(st.lists(st.integers(-1, 4), max_size=4).map(tuple), st.integers(-1, 4),  # empty, repeated, missing
              st.lists(st.floats(0, 4), min_size=1, max_size=3).map(tuple)),
)
fraction = mostly(st.floats(0.3, 1.0), st.one_of(st.floats(-0.5, 1.5), st.integers(-1, 2)))
fractions = mostly(fraction, st.lists(fraction, min_size=1, max_size=3).map(tuple))  # a list: one per block, or not
count = mostly(st.integers(0, 4), st.one_of(st.integers(-3, 40), st.floats(0, 6)))

CONFIGS = {
    "tome": st.fixed_dictionaries({}, optional={
        "r": st.one_of(count, st.lists(st.integers(-1, 6), max_size=5), st.tuples(st.integers(0, 6), st.floats(-2, 2)),
                       st.tuples(count, count, count))}),
    "evit": st.fixed_dictionaries({"blocks": blocks}, optional={"keep": fractions, "fuse": st.booleans()}),
    "ppt": st.fixed_dictionaries({"blocks": blocks}, optional={
        "r": st.one_of(count, st.lists(count, min_size=1, max_size=3).map(tuple)),
        "policy": mostly(st.sampled_from(["adaptive", "adaptive_invariant", "prune", "pool"]), st.just("merge")),
        "threshold": mostly(st.floats(0, 1e-2), st.just(-1.0))}),
    "togo": st.fixed_dictionaries({"blocks": blocks}, optional={
        "keep": fractions, "group": mostly(st.integers(1, 2), st.integers(-1, 9)), "package": st.booleans(),
        "head_weights": mostly(st.sampled_from(["attention", "learned", "uniform"]), st.just("best"))}),
    "spvit": st.fixed_dictionaries({"blocks": blocks}, optional={
        "keep": fractions, "mode": mostly(st.sampled_from(["fixed", "adaptive"]), st.just("soft")),
        "threshold": mostly(st.floats(0.05, 0.95), st.floats(-0.5, 1.5))}),
    "heatvit": st.fixed_dictionaries({"blocks": blocks}, optional={
        "keep": fractions, "mode": st.sampled_from(["fixed", "adaptive"]),
        "package": mostly(st.sampled_from(["update", "append", "none"]), st.just("zip"))}),
}
calls = st.sampled_from(sorted(CONFIGS)).flatmap(lambda m: st.tuples(st.just(m), CONFIGS[m]))


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls, shape=st.sampled_from(SHAPES), batch=st.integers(1, 3), bf16=st.booleans())
def test_patch_refuses_cleanly_or_runs_like_image_by_image(call, shape, batch, bf16) -> None:
    method, config = call
    model = base_model(shape)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model.to(dtype)
    img = shape[0]
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(batch)).to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)
    try:
        vitprune.patch(model, method, **config)
    except (ValueError, TypeError) as err:
        event(f"refused: {type(err).__name__}")
        assert str(err), "an error must say what is wrong"
        assert type(model) is VisionTransformer and not vitprune.is_patched(model)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(x), reference)
        return
    event(f"ran: {method}")
    try:
        with torch.no_grad():
            out = model(x)
            single = torch.cat([model(x[i:i + 1]) for i in range(batch)])
        assert torch.isfinite(out.float()).all()
        tol = 5e-2 if bf16 else 1e-4
        torch.testing.assert_close(out.float(), single.float(), atol=tol, rtol=tol)
    finally:
        vitprune.unpatch(model)
    assert type(model) is VisionTransformer
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
