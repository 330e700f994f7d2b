"""torch.compile of patched timm ViTs: every fixed-count method is one graph (``fullgraph=True``), gives the eager
numbers, and a second call with new images does not recompile.

Dynamo's capture (the part that can fail: graph breaks, data-dependent Python, guards that recompile) is checked for
every method with the ``aot_eager`` backend, which runs the captured graph without code generation. Inductor's
generated kernels are checked on a smaller model for the methods whose reductions are most unlike a plain ViT
(ToMe's merge, PPT's two branches picked per image): compiling C++ on a CPU takes most of this file's time.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import vitprune
from vitprune.kernels import fast_path_enabled
from vitprune.tokens import PACKAGE_INDEX

from conftest import make_vit

pytestmark = pytest.mark.usefixtures("one_thread")

# 112 px: a 7x7 patch grid (50 tokens with CLS), so ToGo meets edge groups of several shapes
METHODS = [
    ("tome", {"r": 2}),
    ("evit", {"keep": 0.7}),
    ("ppt", {"r": 6}),
    ("togo", {"keep": 0.69}),
    ("spvit", {}),
    ("heatvit", {"mode": "fixed"}),
]


def compiled_twice(model, x, x2, backend: str, freezing: bool = False):
    """(compiled output for x, eager output for x, compiled output for x2): capture once, then any recompile of
    the second call raises. ``freezing``: Inductor's inference path (weights as constants, pre-packed)."""
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        eager = model(x)
        tokens = vitprune.last_trace(model).tokens_mlp
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch._inductor.config.patch(freezing=freezing):
            out = compiled(x)
        assert vitprune.last_trace(model).tokens_mlp == tokens  # the trace is written under compilation too
        with torch._dynamo.config.patch(error_on_recompile=True):
            out2 = compiled(x2)
    assert counters["stats"]["unique_graphs"] == 1
    return out, eager, out2


@pytest.mark.parametrize("method,cfg", METHODS, ids=[m for m, _ in METHODS])
def test_fullgraph_capture_equals_eager_without_recompiles(method, cfg):
    model = make_vit("deit_tiny_patch16_224", img_size=112)
    vitprune.patch(model, method, **cfg)
    x, x2 = torch.randn(2, 3, 112, 112), torch.randn(2, 3, 112, 112)
    out, eager, out2 = compiled_twice(model, x, x2, backend="aot_eager")
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(out2, model(x2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,cfg", METHODS, ids=[m for m, _ in METHODS])
def test_first_forward_compiles_to_one_graph(method, cfg):
    """No eager call first (as `vitprune bench --runtime compile` compiles a fresh copy): whatever a method plans
    lazily must already be planned, or its first trace breaks the graph (ToGo's group layout did)."""
    torch._dynamo.reset()
    model = vitprune.patch(make_vit("deit_tiny_patch16_224", img_size=112), method, **cfg)
    with torch.inference_mode():
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 112, 112))


def ppt_with_mixed_batch(model, x):
    """PPT at one block with the threshold between the images' statistics: one image pools, the other prunes."""
    vitprune.patch(model, "ppt", r=4, blocks=(1,))
    with torch.inference_mode():
        model(x)
    stat = vitprune.last_trace(model).notes["ppt_var"][1]
    assert stat[0] != stat[1]
    model._vitprune.method.threshold = float(stat.mean())
    with torch.inference_mode():
        model(x)
    assert vitprune.last_trace(model).notes["ppt_policy"][1].tolist() in ([True, False], [False, True])


@pytest.mark.parametrize("method", ["tome", "ppt"])
def test_inductor_kernels_equal_eager(method):
    """Generated code (Inductor's C++ kernels, frozen pre-packed weights: the fast CPU path) on a 4-block model at
    64 px: same numbers, one graph, no recompile."""
    model = make_vit("deit_tiny_patch16_224", img_size=64, depth=4)
    x, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    if method == "tome":
        vitprune.patch(model, "tome", r=2)
    else:
        ppt_with_mixed_batch(model, x)
    out, eager, out2 = compiled_twice(model, x, x2, backend="inductor", freezing=True)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(out2, model(x2), atol=1e-4, rtol=0)


def test_ppt_mixed_batch_compiles_to_both_branches():
    """Under compilation PPT cannot skip the branch no image takes (that reads the data): both run, each image
    takes its own, so a mixed batch gives the eager result."""
    model = make_vit("deit_tiny_patch16_224", img_size=112)
    x = torch.randn(2, 3, 112, 112)
    ppt_with_mixed_batch(model, x)
    out, eager, _ = compiled_twice(model, x, torch.randn_like(x), backend="aot_eager")
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("package,expected", [("append", 3), ("update", 1)])
def test_selector_package_count_comes_from_the_schedule(package, expected):
    """Fixed-count selectors find the package tokens from the schedule, not the data (no host sync, one graph):
    after three stages the packages are exactly the last tokens, one per stage or one in all."""
    model = make_vit("deit_tiny_patch16_224", img_size=112)
    vitprune.patch(model, "spvit", package=package, trace_source=True)
    with torch.inference_mode():
        model(torch.randn(2, 3, 112, 112))
    index = model._vitprune.last_state.index
    is_pkg = index == PACKAGE_INDEX
    assert torch.equal(is_pkg.sum(1), torch.full((2,), expected))
    assert bool(is_pkg[:, -expected:].all())


def test_workspace_fast_path_is_off_under_compile():
    """The eager workspace path (thread-local buffers written in place) stays out of compiled graphs: Inductor plans
    its own buffers, and a global buffer in the graph would break or re-guard it."""
    layer = nn.Linear(2, 2).eval()

    @torch.compile(fullgraph=True, backend="eager")
    def which(x):
        return x + 1 if fast_path_enabled(layer) else x - 1

    torch._dynamo.reset()
    with torch.no_grad():
        assert fast_path_enabled(layer)
        assert torch.equal(which(torch.zeros(1)), -torch.ones(1))
