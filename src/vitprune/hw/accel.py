"""Analytical latency model of an FPGA ViT accelerator like HeatViT's (HPCA'23) and ViT-ToGo's (DATE'24).

Why: token reduction is sold on MACs and on GPU/CPU speedups, but the papers that build hardware (HeatViT on
Xilinx ZCU102/ZCU104, ViT-ToGo's accelerator) care about what the tokens cost on a PE array: GEMM tiling,
the quadratic attention terms, the non-linear units, weight traffic that does not shrink with the tokens, and
the price of deciding which tokens go (a selector network, a per-token sort, a group ranking, a bipartite
matching). This module turns the per-block token counts a method really produced (``Trace.tokens_attn`` /
``Trace.tokens_mlp``, recorded by ``vitprune bench``) into cycles on such an accelerator.

**The machine** (:class:`AcceleratorConfig`): an array of ``pe_rows × pe_cols`` int8 MACs holding a tile of
the weights (rows = input channels, columns = output channels; tokens stream through one per cycle, as in the
channel-tiled GEMM engines of FPGA ViT accelerators), a vector unit of
``vector_lanes`` lanes for softmax/GELU/LayerNorm/residual/gather, a comparator network of ``sorter_width``
compare-exchange units for top-k, an on-chip buffer and one DRAM port. Everything is 8-bit (weights and
activations, int32 accumulators kept on chip), as in HeatViT.

**Cycles of one op.**

* GEMM ``[m × k] · [k × n]`` on the array: ``m · ⌈k/pe_rows⌉ · ⌈n/pe_cols⌉`` cycles (every weight tile
  sees all m tokens) plus one pipeline fill ``pe_rows + pe_cols`` per GEMM. Exactly linear in the tokens m for
  QKV/proj/MLP; attention runs ``Q·Kᵀ`` (n = tokens) and ``A·V`` (k = tokens) per head, so it is quadratic
  (in steps of the array size).
* DRAM: weights (``k · n`` bytes) stream from DRAM for every GEMM (DeiT-T's ≈5.7 MB of int8 weights do not fit
  next to the activations in ZU9EG's 4 MB of BRAM, and a layer-by-layer engine reloads them anyway); input and
  output activations stay on chip unless they exceed half the buffer (the other half double-buffers weights),
  then they go through DRAM too. **Choice: ``max(compute, memory)``** per op (double buffering overlaps the
  transfer of the next weight tile with compute — HeatViT-style designs are built that way);
  ``overlap_dram=False`` gives the pessimistic ``compute + memory``.
* Vector ops: ``elements · cycles_per_element / vector_lanes`` — softmax ``H·N²`` elements, GELU ``N·hidden``,
  LayerNorm ``N·C``, residual adds ``N·C``. They run *after* the GEMM that feeds them (summed, not overlapped):
  softmax needs a whole row before A·V can start, and a conservative model should not hide them.
* Sorting: a bitonic network on ``P = 2^⌈log2 n⌉`` keys has ``log2P·(log2P+1)/2`` stages of ``P/2``
  compare-exchanges; with ``sorter_width`` comparators that is ``stages · ⌈P/2 / sorter_width⌉`` cycles —
  the ``N log² N`` work of a per-token top-k.

**What a method pays** (besides its smaller blocks):

* learned selectors (HeatViT, SPViT, DynamicViT), before the block's attention: the selector MLP on the
  PE array, ``5/8·N·C² + N·C/2`` MACs as DESIGN.md §3 counts it (``N·C·C/2 + N·C/2·C/4 + N·C/4·2``), its
  LayerNorm/GELUs on the vector unit, then a threshold compare (HeatViT keeps tokens with score ≥ 0.5: no sort)
  or a top-k sort (DynamicViT), the gather of kept tokens and the package/fused token (score-weighted sum).
* EViT: head-mean of the CLS attention row (already computed by attention), per-token top-k sort of the patch
  tokens, gather, fused token.
* ViT-ToGo: group scores (sum of ``g²`` token scores) and ranking of only ``N/g²`` groups; the gather of kept
  groups is the same as a gather of tokens. No per-token sort.
* ToMe: L2 norm of the head-averaged keys, the ``N/2 × N/2`` similarity (``N²/4 · head_dim`` MACs on the PE
  array), a row argmax, a sort of the ``N/2`` edge scores, the merge of ``r`` pairs.
* PPT: ``‖v‖`` and the score variance, then the costlier of its two branches (prune = top-k sort, pool = ToMe
  matching): the worst case per image, since hardware must provision for both.

**Defaults** — sized like HeatViT's ZCU102 design. From the device and board data sheets (Xilinx DS891,
UG1182): ZCU102 carries an XCZU9EG with 2,520 DSP48E2 slices and 32.1 Mb (≈4.0 MB) of block RAM; its PS DDR4
is 64-bit DDR4-2400, 19.2 GB/s peak. ZCU104 (XCZU7EV, UG1267): 1,728 DSP48E2, 11 Mb BRAM + 27 Mb UltraRAM
(≈4.75 MB), also a 64-bit PS DDR4. From the HeatViT paper (abstract): 8-bit fixed point, the selector reuses
the GEMM engine with "miniature control logic", ZCU102. **Our assumptions** (the HeatViT hardware tables were
not available to us; every one is a config field): a 150 MHz clock (a common clock for HLS designs on this
part); a 32 × 64 = 2,048-MAC array (1,024 DSPs at two int8 MACs per DSP48E2, Xilinx WP486 packing — ≈40% of
ZU9EG, leaving DSPs for the non-linear units and control); 9.6 GB/s sustained DRAM (half the 19.2 GB/s peak);
a 64-lane vector unit (one array output row per cycle);
softmax 3 cycles/element (max, exp+sum, scale passes of the I-BERT polynomial), GELU 1, LayerNorm 2; a 4-wide
comparator network (a small add-on, not a wide sorter). ZCU104 preset: a 32 × 48 array, 4.75 MB buffer.

**Calibration** (:func:`calibration_check`, ``vitprune hw --calibration``): HeatViT reports 1.8–2.6× from
token pruning alone on DeiT-T (ZCU102). We model HeatViT-like settings — selectors before blocks 4, 7, 10
(0-based, DESIGN.md §2), a package token, cumulative patch keep ratios ``(0.5, 0.25, 0.125)`` and
``(0.4, 0.16, 0.064)`` (per-stage keep 0.5 and 0.4: −45.5% and −50.8% MACs including the selectors, inside
the 28.4–65.3% reductions the paper quotes; the paper's exact DeiT-T keep rates were not available to us).
Why that end of the range: with four unpruned blocks, a speedup of 1.8× needs at least 44% fewer MACs on a
machine whose latency falls no faster than its MACs, which suggests HeatViT's 1.8–2.6× come from its aggressive
settings. The numeric defaults were set from the data sheets and the assumptions above and were not tuned to
the target. One modelling choice changed after the first run: the GEMM mapping went from token-tiled (a
TPU-style array that pads N to multiples of ``pe_rows``; it gave 1.76× and 1.88×) to channel-tiled with
streamed tokens, because that is how FPGA ViT GEMM engines are built. Now: 1.81× and 1.97× (MACs ratios
1.83× and 2.03×), inside the range (``tests/test_hw_accel.py`` holds the check). The check is loose — the lower
setting sits at the edge: sustained DRAM 4.8 GB/s gives 1.72×, ``overlap_dram=False`` 1.68×, a 16-lane vector
unit 1.86×, ZCU104 1.84× — so read the model's speedups to about ±10%.

Limits: one image (batch 1, HeatViT's latency setting); mean token counts from a batch are used as if every
image had them (tiling of a fractional count uses its ceiling); no inter-layer fusion; weights never cached
across images; the patch embedding and the head are modelled as GEMMs; control and host overheads are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

from ..methods.base import ModelInfo

__all__ = [
    "AcceleratorConfig",
    "AccelResult",
    "BlockCost",
    "HEATVIT_BLOCKS",
    "HEATVIT_LIKE_KEEPS",
    "HEATVIT_SPEEDUP_RANGE",
    "METHOD_COSTS",
    "OpCost",
    "PRESETS",
    "attention_ops",
    "bitonic_sort_cycles",
    "block_cost",
    "calibration_check",
    "gemm",
    "heatvit_like_tokens",
    "mlp_ops",
    "options_from_config",
    "predict",
    "reduction_ops",
    "selector_ops",
    "vector_op",
    "vit_info",
]


@dataclass(frozen=True)
class AcceleratorConfig:
    """An int8 ViT accelerator; defaults sized like HeatViT's ZCU102 design (sources in the module docstring)."""

    pe_rows: int = 32  # input channels of a weight tile
    pe_cols: int = 64  # output channels of a weight tile
    clock_mhz: float = 150.0
    buffer_bytes: int = 4_000_000  # on-chip SRAM (ZU9EG: 32.1 Mb BRAM)
    dram_gbps: float = 9.6  # sustained (ZCU102 PS DDR4-2400 x64: 19.2 GB/s peak)
    vector_lanes: int = 64  # softmax / GELU / LayerNorm / residual / gather unit
    softmax_cycles: float = 3.0  # per element per lane
    gelu_cycles: float = 1.0
    layernorm_cycles: float = 2.0
    sorter_width: int = 4  # compare-exchange units of the top-k network
    overlap_dram: bool = True  # max(compute, memory) per op; False: compute + memory
    name: str = "zcu102"

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("overlap_dram", "name"):
                continue
            if f.type in (int, "int"):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    problems.append(f"{f.name}={value!r} (a positive integer, e.g. {f.default})")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                problems.append(f"{f.name}={value!r} (a positive number, e.g. {f.default})")
        if not isinstance(self.overlap_dram, bool):
            problems.append(f"overlap_dram={self.overlap_dram!r} (True or False)")
        if problems:
            raise ValueError("bad AcceleratorConfig: " + "; ".join(problems)
                             + ". Set each to a positive value; the defaults describe a ZCU102-sized design.")

    @property
    def macs_per_cycle(self) -> int:
        return self.pe_rows * self.pe_cols

    @property
    def dram_bytes_per_cycle(self) -> float:
        return self.dram_gbps * 1e9 / (self.clock_mhz * 1e6)

    def cycles_to_ms(self, cycles: float) -> float:
        return cycles / (self.clock_mhz * 1e3)


PRESETS: dict[str, AcceleratorConfig] = {
    "zcu102": AcceleratorConfig(),
    "zcu104": AcceleratorConfig(pe_rows=32, pe_cols=48, buffer_bytes=4_750_000, name="zcu104"),
}


@dataclass(frozen=True)
class OpCost:
    """One op: where it runs (``unit``), which part of the block it belongs to (``part``), its cycles."""

    name: str
    part: str  # "attention", "mlp", "selector", "reduction", "stem"
    unit: str  # "pe", "vector", "sorter"
    macs: float
    compute_cycles: float
    memory_cycles: float
    cycles: float


# ---------------------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------------------
def _combine(compute: float, memory: float, cfg: AcceleratorConfig) -> float:
    return max(compute, memory) if cfg.overlap_dram else compute + memory


def gemm(name: str, part: str, m: float, k: float, n: float, cfg: AcceleratorConfig, *,
         weights_from_dram: bool = True, count: int = 1) -> OpCost:
    """``count`` GEMMs ``[m × k]·[k × n]``: a ``pe_rows × pe_cols`` tile of the weights at a time, the m tokens
    stream through it one per cycle; weights ``k·n`` bytes each from DRAM."""
    if m <= 0 or k <= 0 or n <= 0:
        return OpCost(name, part, "pe", 0.0, 0.0, 0.0, 0.0)
    tiles = math.ceil(k / cfg.pe_rows) * math.ceil(n / cfg.pe_cols)
    compute = count * (tiles * m + cfg.pe_rows + cfg.pe_cols)
    traffic = (k * n if weights_from_dram else 0.0)
    activations = m * k + m * n
    if activations > cfg.buffer_bytes / 2:  # does not fit beside the double-buffered weights: spill
        traffic += activations
    memory = count * traffic / cfg.dram_bytes_per_cycle
    return OpCost(name, part, "pe", count * m * k * n, compute, memory, _combine(compute, memory, cfg))


def vector_op(name: str, part: str, elements: float, cycles_per_element: float, cfg: AcceleratorConfig) -> OpCost:
    """Element-wise work on the vector unit (non-linear functions, adds, moves)."""
    compute = max(elements, 0.0) * cycles_per_element / cfg.vector_lanes
    return OpCost(name, part, "vector", 0.0, compute, 0.0, compute)


def bitonic_sort_cycles(n: float, width: int) -> float:
    """Cycles to sort ``n`` keys on a bitonic network with ``width`` comparators (``~ n/2 · log²n / width``)."""
    if n <= 1:
        return 0.0
    log_p = math.ceil(math.log2(n))
    stages = log_p * (log_p + 1) // 2
    return float(stages * math.ceil((2 ** log_p // 2) / width))


def _sort_op(name: str, part: str, n: float, cfg: AcceleratorConfig) -> OpCost:
    cycles = bitonic_sort_cycles(n, cfg.sorter_width)
    return OpCost(name, part, "sorter", 0.0, cycles, 0.0, cycles)


def _dims(info: ModelInfo) -> tuple[int, int, int, int]:
    c, h = info.dim, info.num_heads
    return c, h, c // h, round(c * info.mlp_ratio)


def attention_ops(info: ModelInfo, n: float, cfg: AcceleratorConfig) -> list[OpCost]:
    """LayerNorm, QKV, per-head Q·Kᵀ, softmax, A·V, projection, residual for ``n`` tokens."""
    c, h, d, _ = _dims(info)
    p = "attention"
    return [
        vector_op("norm1", p, n * c, cfg.layernorm_cycles, cfg),
        gemm("qkv", p, n, c, 3 * c, cfg),
        gemm("q·kᵀ", p, n, d, n, cfg, weights_from_dram=False, count=h),
        vector_op("softmax", p, h * n * n, cfg.softmax_cycles, cfg),
        gemm("a·v", p, n, n, d, cfg, weights_from_dram=False, count=h),
        gemm("proj", p, n, c, c, cfg),
        vector_op("residual1", p, n * c, 1.0, cfg),
    ]


def mlp_ops(info: ModelInfo, n: float, cfg: AcceleratorConfig) -> list[OpCost]:
    """LayerNorm, fc1, GELU, fc2, residual for ``n`` tokens."""
    c, _, _, hidden = _dims(info)
    p = "mlp"
    return [
        vector_op("norm2", p, n * c, cfg.layernorm_cycles, cfg),
        gemm("fc1", p, n, c, hidden, cfg),
        vector_op("gelu", p, n * hidden, cfg.gelu_cycles, cfg),
        gemm("fc2", p, n, hidden, c, cfg),
        vector_op("residual2", p, n * c, 1.0, cfg),
    ]


def selector_ops(info: ModelInfo, n: float, cfg: AcceleratorConfig) -> list[OpCost]:
    """A HeatViT/SPViT-style selector on ``n`` tokens: 5/8·n·C² + n·C/2 MACs (DESIGN.md §3) on the PE array."""
    c = info.dim
    p = "selector"
    return [
        vector_op("sel.norm", p, n * c, cfg.layernorm_cycles, cfg),
        gemm("sel.fc1", p, n, c, c / 2, cfg),
        vector_op("sel.gelu1", p, n * c / 2, cfg.gelu_cycles, cfg),
        gemm("sel.fc2", p, n, c / 2, c / 4, cfg),
        vector_op("sel.gelu2", p, n * c / 4, cfg.gelu_cycles, cfg),
        gemm("sel.fc3", p, n, c / 4, 2, cfg),
        vector_op("sel.logsoftmax", p, 2 * n, cfg.softmax_cycles, cfg),
    ]


# method name -> (how it selects, learned selector before attention?, fuses dropped tokens into one?)
METHOD_COSTS: dict[str, tuple[str, bool, bool]] = {
    "none": ("none", False, False),
    "tome": ("match", False, False),
    "evit": ("topk", False, True),
    "ppt": ("adaptive", False, False),
    "togo": ("group", False, False),
    "heatvit": ("threshold", True, True),
    "spvit": ("threshold", True, True),
    "dynamicvit": ("topk", True, False),
}
SELECTIONS = ("none", "topk", "group", "match", "threshold", "adaptive")


def reduction_ops(selection: str, info: ModelInfo, n_in: float, n_out: float, cfg: AcceleratorConfig, *,
                  group: int = 2, fuse: bool = False, part: str = "reduction") -> list[OpCost]:
    """What deciding and applying ``n_in → n_out`` costs for one kind of selection (see module docstring)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; use one of {', '.join(SELECTIONS)}")
    if selection == "none":
        return []
    c, h, d, _ = _dims(info)
    p = part
    patches = max(n_in - info.num_prefix, 0.0)
    dropped = max(n_in - n_out, 0.0)
    gather = vector_op("gather", p, n_out * c, 1.0, cfg)
    fused = [vector_op("fuse", p, dropped * c, 1.0, cfg)] if fuse else []
    if selection == "threshold":
        return [vector_op("threshold", p, n_in, 1.0, cfg), gather, *fused]
    if selection == "topk":
        return [vector_op("score", p, h * n_in, 1.0, cfg), _sort_op("sort", p, patches, cfg), gather, *fused]
    if selection == "group":
        groups = patches / (group * group)
        return [vector_op("score", p, h * n_in + patches, 1.0, cfg), _sort_op("sort groups", p, groups, cfg),
                gather, *fused]
    if selection == "match":
        return _match_ops(info, n_in, n_out, cfg, p)
    # adaptive (PPT): score = CLS attention · ‖v‖, its variance, then the costlier branch
    score = [vector_op("score", p, h * n_in + n_in * c, 1.0, cfg), vector_op("variance", p, 2 * patches, 1.0, cfg)]
    prune = [_sort_op("sort", p, patches, cfg), gather]
    pool = _match_ops(info, n_in, n_out, cfg, p)
    return score + max(prune, pool, key=lambda ops: sum(o.cycles for o in ops))


def _match_ops(info: ModelInfo, n_in: float, n_out: float, cfg: AcceleratorConfig, p: str) -> list[OpCost]:
    """ToMe's bipartite soft matching on head-averaged keys: A (⌈P/2⌉) against B (⌊P/2⌋) patch tokens."""
    c, h, d, _ = _dims(info)
    patches = max(n_in - info.num_prefix, 0.0)
    a, b = math.ceil(patches / 2), math.floor(patches / 2)
    r = max(n_in - n_out, 0.0)
    return [
        vector_op("mean keys + norm", p, n_in * c + 2 * patches * d, 1.0, cfg),
        gemm("similarity", p, a, d, b, cfg, weights_from_dram=False),
        vector_op("argmax", p, a * b, 1.0, cfg),
        _sort_op("sort edges", p, a, cfg),
        vector_op("merge", p, r * c, 1.0, cfg),
        vector_op("gather", p, n_out * c, 1.0, cfg),
    ]


def stem_ops(info: ModelInfo, n_last: float, cfg: AcceleratorConfig) -> list[OpCost]:
    """Patch embedding (a GEMM), final LayerNorm and the classifier head (one token)."""
    c = info.dim
    patch_dim = info.patch_embed_macs / (info.num_patches * c) if info.patch_embed_macs else 0.0
    classes = info.head_macs / c if info.head_macs else 0.0
    return [
        gemm("patch embed", "stem", info.num_patches, patch_dim, c, cfg),
        vector_op("norm", "stem", n_last * c, cfg.layernorm_cycles, cfg),
        gemm("head", "stem", 1, c, classes, cfg),
    ]


# ---------------------------------------------------------------------------------------------------------
# blocks and whole models
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockCost:
    """One block's ops; ``tokens_attn``/``tokens_mlp`` are the tokens entering its attention and MLP."""

    layer: int
    tokens_attn: float
    tokens_mlp: float
    ops: tuple[OpCost, ...]

    @property
    def cycles(self) -> float:
        return sum(o.cycles for o in self.ops)

    @property
    def macs(self) -> float:
        return sum(o.macs for o in self.ops)

    def part_cycles(self, part: str) -> float:
        return sum(o.cycles for o in self.ops if o.part == part)


def block_cost(info: ModelInfo, layer: int, n_attn: float, n_mlp: float, cfg: AcceleratorConfig, *,
               selector: Sequence[OpCost] = (), reduction: Sequence[OpCost] = ()) -> BlockCost:
    """[selector] → attention on ``n_attn`` tokens → [reduction] → MLP on ``n_mlp`` tokens, ops run in turn."""
    ops = (*selector, *attention_ops(info, n_attn, cfg), *reduction, *mlp_ops(info, n_mlp, cfg))
    return BlockCost(layer, float(n_attn), float(n_mlp), ops)


@dataclass(frozen=True)
class AccelResult:
    """Predicted cycles of one forward (batch 1) and the speedup against the same model with every token."""

    method: str
    config: AcceleratorConfig
    blocks: tuple[BlockCost, ...]
    stem: tuple[OpCost, ...]
    baseline_cycles: float

    @property
    def cycles(self) -> float:
        return sum(b.cycles for b in self.blocks) + sum(o.cycles for o in self.stem)

    @property
    def latency_ms(self) -> float:
        return self.config.cycles_to_ms(self.cycles)

    @property
    def baseline_ms(self) -> float:
        return self.config.cycles_to_ms(self.baseline_cycles)

    @property
    def speedup(self) -> float:
        return self.baseline_cycles / self.cycles

    @property
    def macs(self) -> float:
        return sum(b.macs for b in self.blocks) + sum(o.macs for o in self.stem)

    def part_cycles(self, part: str) -> float:
        """Cycles of one part over all blocks: "attention", "mlp", "selector", "reduction" (or "stem")."""
        if part == "stem":
            return sum(o.cycles for o in self.stem)
        return sum(b.part_cycles(part) for b in self.blocks)

    @property
    def overhead(self) -> float:
        """Share of the cycles spent choosing tokens (selectors + reduction ops)."""
        return (self.part_cycles("selector") + self.part_cycles("reduction")) / self.cycles


def _method_costs(method: str, selection: str | None) -> tuple[str, bool, bool]:
    if selection is not None:
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; use one of {', '.join(SELECTIONS)}")
        base = METHOD_COSTS.get(method, (selection, False, False))
        return selection, base[1], base[2]
    if method not in METHOD_COSTS:
        raise ValueError(f"no cost model for method {method!r}; known: {', '.join(METHOD_COSTS)}. "
                         f"Pass selection= one of {', '.join(SELECTIONS)} to say how it chooses tokens")
    return METHOD_COSTS[method]


def _check_tokens(name: str, tokens: Sequence[float], depth: int) -> list[float]:
    values = [float(t) for t in tokens]
    if len(values) != depth:
        raise ValueError(f"{name} has {len(values)} entries for a {depth}-block model; give one count per block")
    bad = [t for t in values if not math.isfinite(t) or t <= 0]
    if bad:
        raise ValueError(f"{name} has non-positive or non-finite counts {bad[:3]}; counts are tokens per block")
    return values


def predict(info: ModelInfo, tokens_attn: Sequence[float], tokens_mlp: Sequence[float] | None = None,
            method: str = "none", cfg: AcceleratorConfig | None = None, *, selection: str | None = None,
            reduce_blocks: Sequence[int] | None = None, group: int = 2) -> AccelResult:
    """Predicted accelerator latency of ``method`` from its per-block token counts.

    ``tokens_mlp`` defaults to what the attention counts imply (the next block's count for methods that reduce
    between attention and MLP; the same count for selectors before attention). ``reduce_blocks`` are the blocks
    whose selector/reduction runs; by default the blocks where the count drops (a selector that kept every
    token is then not charged — pass the blocks to charge it). ``selection`` overrides the method's table entry.
    """
    cfg = cfg or AcceleratorConfig()
    kind, has_selector, fuse = _method_costs(method, selection)
    attn = _check_tokens("tokens_attn", tokens_attn, info.depth)
    if tokens_mlp is None or len(tokens_mlp) == 0:
        mlp = list(attn) if has_selector else attn[1:] + attn[-1:]
    else:
        mlp = _check_tokens("tokens_mlp", tokens_mlp, info.depth)
    arriving = [float(info.num_tokens)] + mlp[:-1]  # tokens reaching each block
    if reduce_blocks is None:
        if kind == "none":
            reduce_blocks = []
        elif has_selector:
            reduce_blocks = [i for i in range(info.depth) if attn[i] < arriving[i]]
        else:
            reduce_blocks = [i for i in range(info.depth) if mlp[i] < attn[i]]
    bad = [b for b in reduce_blocks if not 0 <= int(b) < info.depth]
    if bad:
        raise ValueError(f"reduce_blocks {bad} do not exist; this model has blocks 0..{info.depth - 1}")
    chosen = {int(b) for b in reduce_blocks}

    blocks = []
    for i in range(info.depth):
        selector: list[OpCost] = []
        reduction: list[OpCost] = []
        if i in chosen and has_selector:
            selector = selector_ops(info, arriving[i], cfg) + reduction_ops(
                kind, info, arriving[i], attn[i], cfg, group=group, fuse=fuse, part="selector")
        elif i in chosen:
            reduction = reduction_ops(kind, info, attn[i], mlp[i], cfg, group=group, fuse=fuse)
        blocks.append(block_cost(info, i, attn[i], mlp[i], cfg, selector=selector, reduction=reduction))
    stem = tuple(stem_ops(info, mlp[-1], cfg))
    return AccelResult(method, cfg, tuple(blocks), stem, _baseline_cycles(info, cfg))


def options_from_config(config: dict) -> dict:
    """:func:`predict` keywords a method's config implies: the blocks it acts at (so a selector that dropped
    nothing there is still charged) and ViT-ToGo's group size."""
    options: dict = {}
    blocks = config.get("blocks")
    if isinstance(blocks, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        options["reduce_blocks"] = tuple(blocks)
    group = config.get("group")
    if isinstance(group, int) and not isinstance(group, bool) and group > 0:
        options["group"] = group
    return options


def _baseline_cycles(info: ModelInfo, cfg: AcceleratorConfig) -> float:
    n = float(info.num_tokens)
    blocks = sum(block_cost(info, i, n, n, cfg).cycles for i in range(info.depth))
    return blocks + sum(o.cycles for o in stem_ops(info, n, cfg))


# ---------------------------------------------------------------------------------------------------------
# model descriptions and the HeatViT calibration
# ---------------------------------------------------------------------------------------------------------
def vit_info(depth: int = 12, dim: int = 192, num_heads: int = 3, *, img_size: int = 224, patch_size: int = 16,
             in_chans: int = 3, num_classes: int = 1000, num_prefix: int = 1, mlp_ratio: float = 4.0) -> ModelInfo:
    """A :class:`ModelInfo` without building the model (defaults: DeiT-T; DeiT-S is ``dim=384, num_heads=6``)."""
    side = img_size // patch_size
    return ModelInfo(depth=depth, dim=dim, num_heads=num_heads, num_prefix=num_prefix, grid=(side, side),
                     mlp_ratio=mlp_ratio, patch_embed_macs=side * side * in_chans * patch_size ** 2 * dim,
                     head_macs=dim * num_classes)


HEATVIT_BLOCKS = (4, 7, 10)  # DeiT-T selector positions, 0-based (DESIGN.md §2)
# Cumulative patch keep ratios for the calibration: per-stage keep 0.5 and 0.4 (−45.5% / −50.8% MACs on DeiT-T).
HEATVIT_LIKE_KEEPS = ((0.5, 0.25, 0.125), (0.4, 0.16, 0.064))
HEATVIT_SPEEDUP_RANGE = (1.8, 2.6)  # HeatViT, DeiT-T on ZCU102, token pruning only


def heatvit_like_tokens(info: ModelInfo, keeps: Sequence[float], blocks: Sequence[int] = HEATVIT_BLOCKS,
                        package: bool = True) -> tuple[list[float], list[float]]:
    """Token counts of selectors before ``blocks`` keeping ``keeps`` (cumulative, of the original patches),
    plus one package token after the first selector. Returns (tokens_attn, tokens_mlp)."""
    if len(keeps) != len(blocks):
        raise ValueError(f"{len(keeps)} keep ratios for {len(blocks)} selector blocks; give one per block")
    n = float(info.num_tokens)
    attn = []
    for i in range(info.depth):
        for b, keep in zip(blocks, keeps):
            if i == b:
                n = info.num_prefix + round(keep * info.num_patches) + (1 if package else 0)
        attn.append(float(n))
    return attn, list(attn)


def calibration_check(cfg: AcceleratorConfig | None = None,
                      keeps: Sequence[Sequence[float]] = HEATVIT_LIKE_KEEPS) -> list[AccelResult]:
    """HeatViT-like settings on DeiT-T; their speedups should land in :data:`HEATVIT_SPEEDUP_RANGE`."""
    info = vit_info()
    results = []
    for k in keeps:
        attn, mlp = heatvit_like_tokens(info, k)
        results.append(predict(info, attn, mlp, "heatvit", cfg))
    return results
