"""Inference fast paths: same math as the modules, fewer fresh allocations.

On CPU, every new tens-of-MB activation costs page faults (glibc hands such blocks out with a fresh mmap), which
is a visible share of a ViT forward. Under no-grad, eval-mode execution the engine writes the two largest
activations of a block — the qkv projection and the MLP hidden layer — into a per-thread workspace that is
reused across blocks and forwards, and applies GELU and the MLP residual in place. Outputs are bit-identical to
the module path; training and autograd always take the module path.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

_local = threading.local()


def fast_path_enabled(module: nn.Module) -> bool:
    """The workspace path is for eager inference only. torch.export / the ONNX exporter cannot trace in-place writes
    into a reused buffer; under torch.compile a buffer kept outside the graph is one more thing to guard on (a regrown
    or re-strided buffer recompiles), and Inductor plans its own buffers and fuses GELU and the residual anyway."""
    return (
        not torch.is_grad_enabled() and not module.training
        and not torch.compiler.is_exporting() and not torch.compiler.is_compiling()
    )


def workspace(key: str, rows: int, cols: int, like: Tensor) -> Tensor:
    """A [rows, cols] buffer reused per thread (grown when too small). Valid until the next call with ``key``."""
    buffers: dict[str, Tensor] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    buf = buffers.get(key)
    n = rows * cols
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        with torch.inference_mode(False):  # a normal tensor, writable under no_grad and inference_mode alike
            buf = buffers[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(rows, cols)


def release_workspace() -> None:
    """Free this thread's buffers (e.g. after benchmarking a large batch)."""
    _local.buffers = {}


def linear_into(x: Tensor, layer: nn.Linear, key: str) -> Tensor:
    """``layer(x)`` for x [..., in] written into the workspace; returns [..., out]."""
    x2d = x.reshape(-1, x.shape[-1])
    out = workspace(key, x2d.shape[0], layer.out_features, x2d)
    if layer.bias is None:
        torch.mm(x2d, layer.weight.t(), out=out)
    else:
        torch.addmm(layer.bias, x2d, layer.weight.t(), out=out)
    return out.view(*x.shape[:-1], layer.out_features)


def gelu_mlp_inplace(fc1: nn.Linear, act: nn.GELU, fc2: nn.Linear, x: Tensor) -> Tensor:
    """fc2(GELU(fc1(x))) with the hidden layer in the workspace and GELU in place."""
    h = linear_into(x, fc1, "mlp_hidden")
    torch.ops.aten.gelu_(h, approximate=act.approximate)
    return fc2(h)
