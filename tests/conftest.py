from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_vit(name: str = "deit_tiny_patch16_224", **kwargs):
    """A random-init timm model in eval mode (no hub access needed)."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).eval()
