from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine: one thread avoids OpenMP spin-waits (much faster under load).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_padded_batch_equals_images_one_by_one(model, x: torch.Tensor, layer: int) -> None:
    """Adaptive selectors: the padded, masked batch gives what each image gives alone; ``layer``'s selector must
    keep different counts for different images, or the check proves nothing."""
    import vitprune

    with torch.no_grad():
        batch = model(x)
        counts = vitprune.last_trace(model).notes["selector_kept"][layer]
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert len(set(counts.tolist())) > 1, "the test needs images with different kept counts"
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)


def assert_unpatch_is_exact(model, x: torch.Tensor, method: str, **config) -> None:
    """Patch, run, unpatch: the same class, the same state dict bit for bit, and the same output as before."""
    import vitprune

    cls = type(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    vitprune.patch(model, method, **config)
    with torch.no_grad():
        model(x)
    vitprune.unpatch(model)
    assert type(model) is cls and not hasattr(model, "_vitprune")
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def make_vit(name: str = "deit_tiny_patch16_224", **kwargs):
    """A random-init timm model in eval mode (no hub access needed)."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def testbed_assets():
    """Skip (with the reason) when the shared assets are not beside the checkout."""
    from vitprune.assets import assets_dir

    try:
        assets_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def hf_outputs_off_and_reduced(model, x):
    """An HF model asked for hidden states and attentions: unpatched, with reduction off (asserted equal within
    1e-5), then with EViT keep=0.5 at block 1. Returns (reduced output, its trace); the model stays patched."""
    import vitprune

    with torch.no_grad():
        ref = model(x, output_hidden_states=True, output_attentions=True)
        vitprune.patch(model, "tome", r=0)
        off = model(x, output_hidden_states=True, output_attentions=True)
        vitprune.patch(model, "evit", keep=0.5, blocks=(1,))
        out = model(x, output_hidden_states=True, output_attentions=True)
    for a, b in zip(ref.hidden_states + ref.attentions, off.hidden_states + off.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    return out, vitprune.last_trace(model)
