"""Latency look-up table (LUT): what one block costs on this device at each token count, for latency-aware training.

Learned selectors (SPViT's latency-sparsity loss, HeatViT's latency-aware stages) need the latency of a pruned
model as a differentiable function of how many tokens each block keeps. MACs are not that function (small matmuls,
memory traffic and per-call overheads do not scale with MACs), so the LUT is measured: ``profile_lut`` times
the attention half (norm1 → attention → residual) and the MLP half (norm2 → MLP → residual) of a block at a set of
token counts with exactly the code the engine runs (``TimmBlockOps``, eval mode, no autograd, the inference fast path),
plus the token-count independent rest of the model (patch/position embedding, final norm, head) and optionally a
token selector. ``LatencyLUT`` interpolates piecewise-linearly between the measured counts, so a soft (fractional,
tensor) keep count gets a latency with a gradient, and ``latency_sparsity_loss`` turns a latency budget into a loss.

Numbers are milliseconds per forward of one batch (``meta["batch_size"]``) with ``meta["threads"]`` threads on
``meta["device"]``: a LUT describes one device and setting, so profile it where the model will run.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

from ..backends.timm import TimmBlockOps, check_supported, is_timm_vit, model_info
from ..measure.speed import round_robin
from ..methods.base import ModelInfo

FORMAT = "vitprune.latency_lut"
VERSION = 1
GRID_STEPS = 16  # the default grid measures about every N/16 tokens
NOISY_SPREAD = 0.15  # the bench's noisy-timing threshold, here on the median over jobs of (IQR of rounds / median)

Count = Union[float, int, Tensor]
Progress = Callable[[int, int, str], None]  # (done, total, what is being timed)


def default_counts(num_tokens: int, steps: int = GRID_STEPS) -> list[int]:
    """1, every ``step = round(N/steps)`` tokens, and N itself (grid points closer than step/2 to N are dropped so
    the last segment is not a noisy sliver). N=65 → 1, 4, 8, …, 60, 65; N=197 → 1, 12, 24, …, 180, 197."""
    if num_tokens < 2:
        raise ValueError(f"a LUT needs a model with at least 2 tokens, got {num_tokens}")
    step = max(1, round(num_tokens / steps))
    grid = {1, num_tokens} | {k for k in range(step, num_tokens, step) if num_tokens - k >= step / 2}
    return sorted(grid)


def resolve_counts(counts: str | Sequence[int] | None, num_tokens: int) -> list[int]:
    """``None``/``"grid"`` → :func:`default_counts`; ``"all"`` → 1..N; a sequence → sorted, deduplicated, with N
    appended when missing (the table must reach the unpruned count)."""
    if counts is None or counts == "grid":
        return default_counts(num_tokens)
    if counts == "all":
        return list(range(1, num_tokens + 1))
    if isinstance(counts, str):
        raise ValueError(f"counts must be 'grid', 'all' or a list of token counts, got {counts!r}")
    items = list(counts)

    def whole(c: Any) -> bool:
        try:
            return not isinstance(c, bool) and int(c) == c
        except (TypeError, ValueError, OverflowError):
            return False

    if not items or not all(whole(c) for c in items):
        raise ValueError(f"counts must be whole token counts, got {items!r}; e.g. [1, 16, 32, {num_tokens}]")
    values = sorted({int(c) for c in items})
    bad = [c for c in values if not 1 <= c <= num_tokens]
    if bad:
        raise ValueError(f"token counts {bad} are outside 1..{num_tokens} (this model's full token count)")
    if values[-1] != num_tokens:
        values.append(num_tokens)
    if len(values) < 2:
        raise ValueError(f"give at least one token count below {num_tokens} to interpolate between")
    return values


def monotone_fit(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (isotonic regression, pool-adjacent-violators).

    More tokens never cost less, but medians of a noisy machine sometimes say so; a running maximum would carry
    one upward outlier to every larger count, the isotonic fit averages it with its neighbours instead.
    """
    pools: list[list[float]] = []  # [sum, count] of each pooled run
    for v in values:
        pools.append([float(v), 1.0])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            s, c = pools.pop()
            pools[-1][0] += s
            pools[-1][1] += c
    out: list[float] = []
    for s, c in pools:
        out += [s / c] * int(c)
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LatencyLUT:
    """Measured latency per block and token count; see the module docstring.

    ``attn_ms``/``mlp_ms``/``selector_ms`` are the monotone (isotonic) fits that interpolation uses; the per-count
    medians they were fitted to are kept in ``*_raw``. Interpolation is piecewise linear in the token count, exact
    at the measured counts, extrapolated linearly from the end segments outside them.
    """

    token_counts: list[int]
    attn_ms: list[list[float]]
    mlp_ms: list[list[float]]
    selector_ms: list[float] | None
    fixed_ms: float
    meta: dict[str, Any] = field(default_factory=dict)
    attn_ms_raw: list[list[float]] | None = None
    mlp_ms_raw: list[list[float]] | None = None
    selector_ms_raw: list[float] | None = None
    _tables: dict[Any, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ---- shape -------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.attn_ms)

    @property
    def num_tokens(self) -> int:
        """The full (unpruned) token count N the table ends at."""
        return self.token_counts[-1]

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid latency LUT: {msg}; re-create it with `vitprune lut` (or profile_lut)")

        counts = self.token_counts
        if not isinstance(counts, list) or len(counts) < 2 or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in counts):
            fail(f"token_counts must be a list of at least 2 whole numbers, got {counts!r}")
        if counts[0] < 1 or any(b <= a for a, b in zip(counts, counts[1:])):
            fail(f"token_counts must be strictly ascending and >= 1, got {counts}")

        def curve(values: Any, what: str) -> None:
            if not isinstance(values, list) or len(values) != len(counts) or not all(_is_number(v) for v in values):
                fail(f"{what} must be {len(counts)} finite numbers (one per token count)")
            if any(v < 0 for v in values):
                fail(f"{what} holds negative latencies")

        def table(rows: Any, what: str, monotone: bool) -> None:
            if not isinstance(rows, list) or not rows:
                fail(f"{what} must be a non-empty list with one row per block")
            for i, row in enumerate(rows):
                curve(row, f"{what}[{i}]")
                if monotone and any(b < a for a, b in zip(row, row[1:])):
                    fail(f"{what}[{i}] decreases with the token count (the stored curve must be non-decreasing)")

        table(self.attn_ms, "attn_ms", True)
        table(self.mlp_ms, "mlp_ms", True)
        if len(self.mlp_ms) != len(self.attn_ms):
            fail(f"attn_ms has {len(self.attn_ms)} blocks but mlp_ms has {len(self.mlp_ms)}")
        if self.selector_ms is not None:
            table([self.selector_ms], "selector_ms", True)
        for raw, name in ((self.attn_ms_raw, "attn_ms_raw"), (self.mlp_ms_raw, "mlp_ms_raw")):
            if raw is not None:
                table(raw, name, False)
                if len(raw) != self.depth:
                    fail(f"{name} has {len(raw)} blocks, expected {self.depth}")
        if self.selector_ms_raw is not None:
            curve(self.selector_ms_raw, "selector_ms_raw")
        if not _is_number(self.fixed_ms) or self.fixed_ms < 0:
            fail(f"fixed_ms must be a finite number >= 0, got {self.fixed_ms!r}")
        if not isinstance(self.meta, dict):
            fail("meta must be a JSON object")
        for key, expected in (("num_tokens", counts[-1]), ("depth", len(self.attn_ms))):
            if key in self.meta and self.meta[key] != expected:
                fail(f"meta[{key!r}] = {self.meta[key]!r} but the table says {expected}")

    # ---- interpolation -----------------------------------------------------------------------------------------
    def _table(self, key: str, device: torch.device) -> Tensor:
        """The counts ('counts') or one curve as a float64 tensor on ``device``, cached."""
        cache_key = (key, str(device))
        if cache_key not in self._tables:
            if key == "counts":
                data: list[float] = [float(c) for c in self.token_counts]
            elif key == "selector":
                data = self.selector_ms or []
            else:
                part, block = key.split(":")
                data = (self.attn_ms if part == "attn" else self.mlp_ms)[int(block)]
            self._tables[cache_key] = torch.tensor(data, dtype=torch.float64, device=device)
        return self._tables[cache_key]

    def _interp(self, key: str, n: Count, what: str) -> Tensor:
        if isinstance(n, Tensor):
            if not n.is_floating_point():
                n = n.to(torch.float64)
            if not bool(torch.isfinite(n.detach()).all()) or bool((n.detach() < 0).any()):
                raise ValueError(f"{what}: token counts must be finite and >= 0, got {n.detach().cpu().tolist()}")
            x = n.to(torch.float64)
        elif _is_number(n) and n >= 0:
            x = torch.tensor(float(n), dtype=torch.float64)
        else:
            raise ValueError(f"{what}: a token count must be a finite number >= 0 or a tensor, got {n!r}")
        counts, values = self._table("counts", x.device), self._table(key, x.device)
        i = (torch.searchsorted(counts, x.detach().contiguous(), right=True) - 1).clamp(0, len(counts) - 2)
        c0, c1 = counts[i], counts[i + 1]
        # lerp is exact at both ends (t = 0 and t = 1), so measured counts give back the stored values bit for bit
        return torch.lerp(values[i], values[i + 1], (x - c0) / (c1 - c0))

    def _check_block(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.depth:
            raise ValueError(f"block must be an int in 0..{self.depth - 1} (this LUT has {self.depth} blocks), "
                             f"got {block!r}")
        return block

    def attn_cost_ms(self, block: int, n: Count) -> Tensor:
        """Attention half of ``block`` (norm1 → attention → residual) with ``n`` tokens."""
        return self._interp(f"attn:{self._check_block(block)}", n, f"attention of block {block}")

    def mlp_cost_ms(self, block: int, n: Count) -> Tensor:
        """MLP half of ``block`` (norm2 → MLP → residual) with ``n`` tokens."""
        return self._interp(f"mlp:{self._check_block(block)}", n, f"MLP of block {block}")

    def block_ms(self, block: int, n_attn: Count, n_mlp: Count | None = None) -> Tensor:
        """One block with ``n_attn`` tokens entering attention and ``n_mlp`` (default: the same) entering the MLP
        (they differ when a method reduces between the two, like ToMe/EViT). float64, differentiable w.r.t. ``n``."""
        return self.attn_cost_ms(block, n_attn) + self.mlp_cost_ms(block, n_attn if n_mlp is None else n_mlp)

    def selector_cost_ms(self, n: Count) -> Tensor:
        """One token selector run on ``n`` tokens."""
        if self.selector_ms is None:
            raise ValueError("this LUT has no selector timings; profile it with profile_lut(..., selector=module)")
        return self._interp("selector", n, "selector")

    def _per_block(self, tokens: Any, what: str) -> list[Count]:
        if isinstance(tokens, Tensor):
            if tokens.dim() == 0 or tokens.shape[-1] != self.depth:
                raise ValueError(f"{what} as a tensor needs a last dimension of {self.depth} (one count per block), "
                                 f"got shape {tuple(tokens.shape)}")
            return list(tokens.unbind(-1))
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(tokens) != self.depth:
            raise ValueError(f"{what} needs one token count per block ({self.depth} blocks), got {tokens!r}")
        return list(tokens)

    def predict_ms(
        self, tokens_attn: Sequence[Count] | Tensor, tokens_mlp: Sequence[Count] | Tensor | None = None,
        selectors_at: Iterable[int] = (),
    ) -> Tensor:
        """Predicted latency of the whole forward: Σ_blocks block_ms + fixed_ms + one selector per block in
        ``selectors_at``, each costed at the tokens entering that block (``tokens_attn[b]``).

        ``tokens_attn``/``tokens_mlp``: one count per block (floats, 0-dim tensors, or a tensor [..., depth]);
        ``tokens_mlp`` defaults to ``tokens_attn``. Returns a float64 tensor, differentiable w.r.t. tensor counts.
        """
        n_attn = self._per_block(tokens_attn, "tokens_attn")
        n_mlp = n_attn if tokens_mlp is None else self._per_block(tokens_mlp, "tokens_mlp")
        total: Tensor = torch.tensor(float(self.fixed_ms), dtype=torch.float64)
        for b in range(self.depth):
            total = total + self.block_ms(b, n_attn[b], n_mlp[b])
        for b in selectors_at:
            total = total + self.selector_cost_ms(n_attn[self._check_block(b)])
        return total

    def full_ms(self) -> float:
        """The unpruned model: every block at N tokens, no selector."""
        return float(self.predict_ms([self.num_tokens] * self.depth))

    def predicted_speedup(self, tokens_attn: Sequence[Count] | Tensor, tokens_mlp: Any = None,
                          selectors_at: Iterable[int] = ()) -> Tensor:
        """``full_ms() / predict_ms(...)``."""
        return self.full_ms() / self.predict_ms(tokens_attn, tokens_mlp, selectors_at)

    # ---- model check -------------------------------------------------------------------------------------------
    def check_model(self, info: ModelInfo | nn.Module) -> None:
        """Raise ValueError when this LUT was profiled for a model of another shape (depth, width, heads, tokens):
        its latencies would silently be wrong for this one."""
        if isinstance(info, nn.Module):
            if not is_timm_vit(info):
                raise ValueError(f"check_model takes a ModelInfo or a timm VisionTransformer, "
                                 f"got {type(info).__name__}")
            info = model_info(info)
        have = {"depth": info.depth, "dim": info.dim, "num_heads": info.num_heads, "num_tokens": info.num_tokens}
        lut = {"depth": self.depth, "dim": self.meta.get("dim"), "num_heads": self.meta.get("num_heads"),
               "num_tokens": self.num_tokens}
        wrong = [f"{k} {lut[k]} vs model {v}" for k, v in have.items() if lut[k] is not None and lut[k] != v]
        if wrong:
            raise ValueError(
                f"this latency LUT was profiled for another model ({self.meta.get('model', 'unknown')}: "
                f"{'; '.join(wrong)}); profile one for this model with `vitprune lut --model <name>`"
            )

    # ---- files -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "units": "ms per forward of one batch",
            "token_counts": self.token_counts, "attn_ms": self.attn_ms, "mlp_ms": self.mlp_ms,
            "selector_ms": self.selector_ms, "fixed_ms": self.fixed_ms,
            "raw": {"attn_ms": self.attn_ms_raw, "mlp_ms": self.mlp_ms_raw, "selector_ms": self.selector_ms_raw},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "LUT") -> LatencyLUT:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{source} is not a vitprune latency LUT (no \"format\": \"{FORMAT}\"); "
                             "create one with `vitprune lut`")
        if doc.get("version") != VERSION:
            raise ValueError(f"{source} has LUT format version {doc.get('version')!r}, this vitprune reads version "
                             f"{VERSION}; re-create it with `vitprune lut`")
        missing = [k for k in ("token_counts", "attn_ms", "mlp_ms", "fixed_ms") if k not in doc]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}; re-create it with `vitprune lut`")
        raw = doc.get("raw") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: 'raw' must be an object; re-create it with `vitprune lut`")
        try:
            return cls(
                token_counts=doc["token_counts"], attn_ms=doc["attn_ms"], mlp_ms=doc["mlp_ms"],
                selector_ms=doc.get("selector_ms"), fixed_ms=doc["fixed_ms"], meta=doc.get("meta") or {},
                attn_ms_raw=raw.get("attn_ms"), mlp_ms_raw=raw.get("mlp_ms"), selector_ms_raw=raw.get("selector_ms"),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyLUT:
        """Read and validate a LUT written by :meth:`save`; a malformed or foreign file raises ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency LUT {path} not found; create it with `vitprune lut --out {path}`")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-create it with `vitprune lut`") from e
        return cls.from_dict(doc, source=str(path))


def latency_sparsity_loss(predicted_ms: Tensor, budget_ms: float) -> Tensor:
    """SPViT's latency-sparsity loss with a latency budget instead of fixed keep ratios: ((pred − budget)/budget)².

    The error is relative to the budget so the loss does not depend on the model's size or the device's speed
    (a 10% overshoot costs 0.01 whether a forward takes 2 ms on a GPU or 400 ms on two CPU cores): one loss weight
    works for every model and LUT, and it sits on the same scale as the keep-ratio loss (mean(keep) − ρ)² it
    replaces. Two-sided, as in SPViT: running faster than the budget is penalised too, so the selector does not
    prune more than asked. Average ``predicted_ms`` over the batch (or pass per-image predictions and take the mean
    of this loss) before adding it to the task loss.
    """
    if not isinstance(predicted_ms, Tensor):
        predicted_ms = torch.as_tensor(predicted_ms, dtype=torch.float64)
    if isinstance(budget_ms, bool) or not _is_number(budget_ms) or budget_ms <= 0:
        raise ValueError(f"budget_ms must be a positive latency in ms (e.g. 0.7 * lut.full_ms()), got {budget_ms!r}")
    return ((predicted_ms - budget_ms) / budget_ms) ** 2


# ---- profiling ---------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _same_shapes(blocks: Sequence[nn.Module]) -> bool:
    shapes = [[(n, tuple(p.shape)) for n, p in b.named_parameters()] + [type(b.attn), type(b.mlp)] for b in blocks]
    return all(s == shapes[0] for s in shapes[1:])


def _on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` itself when it already lives on device/dtype, else a converted copy (never moves the caller's)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def _eval_flags(module: nn.Module) -> dict[nn.Module, bool]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    return flags


def _restore(flags: dict[nn.Module, bool]) -> None:
    for m, training in flags.items():
        m.training = training


def profile_lut(
    model: nn.Module,
    *,
    batch_size: int = 32,
    threads: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    counts: str | Sequence[int] | None = None,
    per_block: bool = False,
    selector: nn.Module | None = None,
    rounds: int = 5,
    min_round_time: float = 0.1,
    warmup: int = 2,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> LatencyLUT:
    """Measure a :class:`LatencyLUT` for a timm ``VisionTransformer`` on ``device``.

    Times, on random inputs [batch_size, n, C] for every n in ``counts`` (default: :func:`default_counts`, about
    17 counts; ``"all"`` = 1..N, slow on CPU), the attention and MLP halves of block 0 — reused for every block,
    since a plain ViT's blocks have identical shapes — or of each block with ``per_block=True``; the ``selector``
    (called as ``selector(x)``), if given; and the fixed rest of the model once (patch + position embedding on
    images, final norm + head on N tokens). Everything is timed round-robin with ``measure.speed.round_robin``
    (``rounds`` rounds, each timed block ≥ ``min_round_time`` s, median per count) under
    ``torch.inference_mode()`` and eval mode — the conditions ``vitprune bench`` measures speed under, so the
    prediction is comparable with measured throughput. The stored curves are isotonic fits of the medians
    (:func:`monotone_fit`); the medians themselves are kept as ``*_raw``. The caller's model is neither moved nor
    left in another mode (a converted copy is profiled when it lives on another device/dtype).

    The blocks' rows cost only the blocks: what a method does between them (scoring, top-k, gathers, packing) is
    not in them. For a learned selector, pass as ``selector`` a module doing everything its inference does at a
    block (score, choose, gather) so that cost is in the table too. Where a device is launch-bound (a GPU at a
    small batch), the curve is flat at low counts: fewer tokens there buy no time, and the slope (the loss's
    gradient) is zero there.
    """
    if not is_timm_vit(model):
        raise ValueError(f"profile_lut needs a timm VisionTransformer, got {type(model).__name__}; "
                         "build one with vitprune.models.create_model or timm.create_model")
    try:
        check_supported(model)
    except ValueError as e:
        raise ValueError(f"cannot profile a latency LUT: {e}") from e
    for name, value in (("batch_size", batch_size), ("threads", threads), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if not (min_round_time > 0):
        raise ValueError(f"min_round_time must be > 0 seconds, got {min_round_time!r}")
    info = model_info(model)
    n_full = info.num_tokens
    token_counts = resolve_counts(counts, n_full)
    if not per_block and not _same_shapes(list(model.blocks)):
        raise ValueError("the blocks of this model differ in shape, so block 0 cannot stand for all of them; "
                         "pass per_block=True (CLI: --per-block)")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    net = _on(model, dev, dtype)
    sel = None if selector is None else _on(selector, dev, dtype)
    flags = _eval_flags(net)
    sel_flags = _eval_flags(sel) if sel is not None else {}
    timed_blocks = list(range(info.depth)) if per_block else [0]
    ops = TimmBlockOps
    b, c = batch_size, info.dim
    try:
        with torch.inference_mode():
            gen = torch.Generator(device="cpu").manual_seed(0)
            x_attn = torch.randn(b * n_full * c, generator=gen).to(device=dev, dtype=dtype)
            x_mlp = torch.randn(b * n_full * c, generator=gen).to(device=dev, dtype=dtype)
            x_sel = torch.randn(b * n_full * c, generator=gen).to(device=dev, dtype=dtype)
            in_chans = net.patch_embed.proj.in_channels
            images = torch.randn(b, in_chans, *net.patch_embed.img_size, generator=gen).to(device=dev, dtype=dtype)

            def view(buf: Tensor, n: int) -> Tensor:
                return buf[: b * n * c].view(b, n, c)  # contiguous, like the engine's gathered states

            def attn_fn(block: nn.Module, x: Tensor) -> Callable[[], object]:
                def fn() -> object:
                    y, _ = ops.attention(block, ops.norm1(block, x), None, None)
                    return ops.attn_residual(block, x, y)
                return fn

            def mlp_fn(block: nn.Module, x: Tensor) -> Callable[[], object]:
                return lambda: ops.mlp_residual(block, x)  # in place on x under the fast path, as in the engine

            def prefix_fn() -> object:
                return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images))))

            full = view(x_mlp, n_full)

            def suffix_fn() -> object:
                return net.forward_head(net.norm(full))

            jobs: list[tuple[str, Callable[[], object]]] = []
            for blk in timed_blocks:
                jobs += [(f"block {blk} attention, {n} tokens", attn_fn(net.blocks[blk], view(x_attn, n)))
                         for n in token_counts]
                jobs += [(f"block {blk} MLP, {n} tokens", mlp_fn(net.blocks[blk], view(x_mlp, n)))
                         for n in token_counts]
            if sel is not None:
                jobs += [(f"selector, {n} tokens", (lambda s=sel, x=view(x_sel, n): s(x))) for n in token_counts]
            jobs += [("patch + position embedding", prefix_fn), ("final norm + head", suffix_fn)]

            total = len(jobs) * (rounds + 1)  # one sizing pass + the timed rounds
            done = 0

            def tick(what: str) -> Callable[[], None]:
                def setup() -> None:  # round_robin calls it untimed, right before each timed block
                    nonlocal done
                    if progress is not None:
                        progress(done, total, what)
                    done += 1
                return setup

            times = round_robin([(tick(what), fn) for what, fn in jobs], threads=threads, rounds=rounds,
                                min_round_time=min_round_time, warmup=warmup).times
            if progress is not None:
                progress(total, total, "done")
    finally:
        _restore(flags)
        _restore(sel_flags)

    medians = [statistics.median(t) * 1e3 for t in times]
    spreads = []
    for t in times:
        if len(t) > 1:
            q = statistics.quantiles(t, n=4)
            spreads.append((q[2] - q[0]) / statistics.median(t))
    k = len(token_counts)
    attn_raw, mlp_raw = [], []
    for i in range(len(timed_blocks)):
        base = 2 * k * i
        attn_raw.append(medians[base: base + k])
        mlp_raw.append(medians[base + k: base + 2 * k])
    offset = 2 * k * len(timed_blocks)
    sel_raw = medians[offset: offset + k] if sel is not None else None
    prefix_ms, suffix_ms = medians[-2], medians[-1]
    if not per_block:  # one timed block stands for all
        attn_raw, mlp_raw = attn_raw * info.depth, mlp_raw * info.depth
    attn_raw = [list(r) for r in attn_raw]
    mlp_raw = [list(r) for r in mlp_raw]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    import timm

    typical_spread = statistics.median(spreads) if spreads else None
    meta: dict[str, Any] = {
        "model": model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        or type(model).__name__,
        "depth": info.depth, "dim": info.dim, "num_heads": info.num_heads, "num_prefix": info.num_prefix,
        "grid": list(info.grid), "num_tokens": n_full, "mlp_ratio": info.mlp_ratio,
        "device": str(dev), "device_name": device_name, "cpu": _cpu_name(),
        "threads": threads, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "timm": timm.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": rounds, "min_round_time_s": min_round_time,
        "per_block": per_block,
        "blocks_timed": "each" if per_block else f"block 0, reused for all {info.depth} blocks (identical shapes)",
        "counts": "all" if counts == "all" else ("grid" if counts in (None, "grid") else "custom"),
        "timed": "vitprune TimmBlockOps (the engine's block code) on random [batch, n, dim] inputs, "
                 "torch.inference_mode, eval mode, torch.utils.benchmark round-robin; median over rounds",
        "curve": "isotonic (least-squares non-decreasing) fit of the per-count medians; medians under 'raw'",
        "fixed_parts_ms": {"patch_pos_embed": prefix_ms, "final_norm_head_at_N": suffix_ms},
        "selector": None if sel is None else type(sel).__name__,
        "round_spread": {"median": typical_spread, "max": max(spreads) if spreads else None,
                         "what": "interquartile range of the rounds / median, over the timed (part, count) jobs"},
        "noisy": bool(typical_spread is not None and typical_spread > NOISY_SPREAD),
        "profile_seconds": round(time.perf_counter() - start, 1),
    }
    return LatencyLUT(
        token_counts=token_counts,
        attn_ms=[monotone_fit(r) for r in attn_raw], mlp_ms=[monotone_fit(r) for r in mlp_raw],
        selector_ms=None if sel_raw is None else monotone_fit(sel_raw),
        fixed_ms=prefix_ms + suffix_ms, meta=meta,
        attn_ms_raw=attn_raw, mlp_ms_raw=mlp_raw, selector_ms_raw=sel_raw,
    )


# ---- checking a LUT against real forwards ------------------------------------------------------------------------
@dataclass
class LUTCheck:
    """Predicted vs measured latency of one configuration of the model (ms per batch)."""

    spec: str  # "unpatched" (timm's own forward) or a method spec run by the engine
    tokens_attn: list[int]
    tokens_mlp: list[int]
    predicted_ms: float
    measured_ms: float
    predicted_speedup: float  # vs the engine baseline (first spec), from the LUT
    measured_speedup: float  # vs the engine baseline, measured

    @property
    def speedup_error(self) -> float:
        """measured / predicted speedup − 1 (the issue's acceptance: within ±10%)."""
        return self.measured_speedup / self.predicted_speedup - 1


def default_check_specs(depth: int) -> list[str]:
    """The engine without reduction (the baseline) and EViT at keep 0.7/0.5 at depth/4, depth/2, 3·depth/4
    (blocks 3, 6, 9 of a 12-block ViT): a pruning method whose own ops are cheap, like a learned selector's."""
    blocks = f"({depth // 4},{depth // 2},{3 * depth // 4})"
    return ["tome:r=0", f"evit:keep=0.7,blocks={blocks}", f"evit:keep=0.5,blocks={blocks}"]


def check_lut(
    lut: LatencyLUT,
    model: nn.Module,
    specs: Sequence[str] | None = None,
    *,
    rounds: int = 5,
    min_round_time: float = 0.5,
) -> list[LUTCheck]:
    """Time real forwards of ``model`` patched with each spec (round-robin, the LUT's batch/threads/dtype/device)
    and compare with the LUT's prediction at the token counts the engine actually ran (default specs:
    :func:`default_check_specs`). The first spec is the
    baseline for speedups (``tome:r=0``: the engine without reduction, which is what ``full_ms`` models); a last
    row ``unpatched`` is timm's own forward, for reference. The reduction ops themselves (top-k, gathers,
    matching) are not in the LUT, so methods with costly ones (ToMe) are predicted too fast.
    """
    from .. import patching
    from ..measure.speed import interleaved_throughput
    from ..specs import parse_method_spec

    specs = default_check_specs(lut.depth) if specs is None else list(specs)
    if not specs:
        raise ValueError("give at least one method spec (the first is the baseline, e.g. 'tome:r=0')")
    lut.check_model(model)
    meta = lut.meta
    dtype = getattr(torch, str(meta.get("dtype", "float32")))
    dev = torch.device(meta.get("device", "cpu"))
    net = _on(model, dev, dtype)
    flags = _eval_flags(net)
    configs = [parse_method_spec(s) for s in specs]
    was_patched = patching.is_patched(net)
    if was_patched:
        raise ValueError("check_lut needs an unpatched model; call vitprune.unpatch(model) first")
    images = torch.randn(int(meta.get("batch_size", 32)), net.patch_embed.proj.in_channels,
                         *net.patch_embed.img_size).to(device=dev, dtype=dtype)
    try:
        counts: list[tuple[list[int], list[int]]] = []
        with torch.inference_mode():
            for name, config in configs:
                patching.patch(net, name, **config)
                net(images)
                trace = patching.last_trace(net)
                counts.append((list(trace.tokens_attn), list(trace.tokens_mlp)))
            patching.unpatch(net)

        def setup(i: int) -> Callable[[], None]:
            def fn() -> None:
                if i < len(configs):
                    patching.patch(net, configs[i][0], **configs[i][1])
                elif patching.is_patched(net):
                    patching.unpatch(net)
            return fn

        speeds = interleaved_throughput(net, images, [setup(i) for i in range(len(configs) + 1)],
                                        threads=int(meta.get("threads", 2)), rounds=rounds,
                                        min_round_time=min_round_time)
    finally:
        if patching.is_patched(net):
            patching.unpatch(net)
        _restore(flags)
    n_full = [lut.num_tokens] * lut.depth
    counts.append((n_full, n_full))
    labels = list(specs) + ["unpatched"]
    predicted = [float(lut.predict_ms(a, m)) for a, m in counts]
    measured = [s.latency_ms_median for s in speeds]
    return [
        LUTCheck(spec=label, tokens_attn=a, tokens_mlp=m, predicted_ms=p, measured_ms=t,
                 predicted_speedup=predicted[0] / p, measured_speedup=measured[0] / t)
        for label, (a, m), p, t in zip(labels, counts, predicted, measured)
    ]
