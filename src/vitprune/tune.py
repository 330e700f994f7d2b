"""``vitprune tune``: a budget in, the best training-free reduction for this model and data out.

How it searches, and why this way:

1. **Cost first, from the token counts alone.** A candidate's MACs are the DESIGN §3 formula over the token counts a
   one-image forward records (milliseconds), so a candidate that misses the budget is never evaluated for accuracy.
2. **Schedule shapes × bisection.** Each method has a few schedule shapes (ToMe: r constant, decreasing or
   increasing over depth, or only in the second half; EViT/ToGo: keep at blocks ¼, ½, ¾ of the depth or spread over
   them; PPT: r at those blocks). Each shape has one level knob whose cost rises monotonically, so bisection on the
   cost finds the mildest level that meets the budget: one accuracy evaluation per shape.
3. **Greedy per-block descent** (ToMe, DiffRate-like non-uniform schedules): from no reduction, repeatedly add merges
   in the group of blocks where they cost the least quality per MAC saved, until the budget is met. It finds
   schedules no single shape expresses.
4. The best few candidates on the search subset are evaluated on the whole calibration split; the best of those is
   the recipe, then scored once on the **held-out** split. Both figures are reported, so over-fitting shows.

``tests/test_tune.py`` measures the search against exhaustive enumeration on a small space.
Speed budgets (``speedup``, ``latency_ms``) become a MACs budget per method through a short interleaved measurement of
that method's efficiency (speedup / MACs ratio); the chosen recipe's own speedup is then measured and reported.
Every evaluation is appended to ``DIR/evaluations.jsonl``: an interrupted tune resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import patching
from .measure.accuracy import compare_outputs
from .measure.flops import count_macs, paper_vit_macs
from .specs import format_method_spec

RECIPE_KEY = "vitprune_recipe"
METHODS = ("tome", "evit", "ppt", "togo")


# ---- budget and candidates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """Exactly one of: ``macs`` (fraction of the unpatched MACs), ``speedup`` (× the unpatched throughput at the
    batch size), ``latency_ms`` (per batch)."""

    macs: float | None = None
    speedup: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "speedup", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: --macs (fraction of MACs), --speedup or --latency-ms")
        if self.macs is not None and not 0 < self.macs <= 1:
            raise ValueError(f"--macs is a fraction of the unpatched model's MACs in (0, 1], got {self.macs}")
        if self.speedup is not None and self.speedup < 1:
            raise ValueError(f"--speedup must be >= 1, got {self.speedup}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise ValueError(f"--latency-ms must be positive, got {self.latency_ms}")

    def describe(self) -> str:
        if self.macs is not None:
            return f"macs <= {self.macs:g} of unpatched"
        if self.speedup is not None:
            return f"speedup >= {self.speedup:g}x"
        return f"latency <= {self.latency_ms:g} ms per batch"


@dataclass
class Candidate:
    method: str
    config: dict[str, Any]
    shape: str  # how the search found it, e.g. "tome/constant", "tome/greedy"
    macs_fraction: float
    quality: dict[str, float] = field(default_factory=dict)  # on the split it was last evaluated on
    score: float | None = None
    split: str = ""

    @property
    def spec(self) -> str:
        return format_method_spec(self.method, self.config)


# ---- schedules -------------------------------------------------------------------------------------------------

def anchor_blocks(depth: int) -> tuple[int, ...]:
    """EViT's blocks (3, 6, 9) of 12, scaled to the depth: ¼, ½ and ¾ of the way."""
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)}))


def tome_shapes(depth: int) -> dict[str, list[float]]:
    """Per-block weights; r_b = round(level · w_b)."""
    lin = [i / max(1, depth - 1) for i in range(depth)]
    return {
        "constant": [1.0] * depth,
        "decreasing": [1.5 - t for t in lin],
        "increasing": [0.5 + t for t in lin],
        "second-half": [0.0 if i < depth // 2 else 2.0 for i in range(depth)],
    }


def shaped_config(method: str, shape: str, level: float, depth: int, patches: int) -> dict[str, Any]:
    """The config of ``method``'s schedule ``shape`` at ``level`` ∈ [0, 1] (0: no reduction, 1: the most)."""
    anchors = anchor_blocks(depth)
    if method == "tome":
        cap = max(1, patches // (2 * max(1, depth // 2)))  # at most about half the patches over half the blocks
        return {"r": [int(round(level * cap * w)) for w in tome_shapes(depth)[shape]]}
    if method in ("evit", "togo"):
        blocks = anchors if shape == "anchors" else tuple(range(anchors[0], anchors[-1] + 1))
        keep = round(1.0 - 0.9 * level, 4) if shape == "anchors" else round((1.0 - 0.9 * level) ** (len(anchors) / len(blocks)), 4)
        config = {"keep": keep, "blocks": blocks}
        return config
    if method == "ppt":
        r = int(round(level * patches / (len(anchors) + 1)))
        return {"r": r, "blocks": anchors} if shape == "anchors" else {"r": r, "blocks": anchors, "policy": "pool"}
    raise ValueError(f"tune does not search {method!r}; choose from {', '.join(METHODS)}")


SHAPES = {"tome": tuple(tome_shapes(12)), "evit": ("anchors", "spread"), "togo": ("anchors", "spread"),
          "ppt": ("anchors", "pool")}


# ---- cost ------------------------------------------------------------------------------------------------------

class CostModel:
    """MACs per image of a configuration: the DESIGN §3 formula over the token counts of a one-image forward."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model
        self.example = example[:1]
        self.base = count_macs(model, self.example).macs  # unpatched, from the executed ops
        self._cache: dict[str, float] = {}

    def fraction(self, method: str, config: dict[str, Any]) -> float:
        key = format_method_spec(method, config)
        if key not in self._cache:
            patching.patch(self.model, method, **config)
            try:
                with torch.inference_mode():
                    self.model(self.example)
                info = self.model._vitprune.info
                trace = patching.last_trace(self.model)
                macs = paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, info.dim, info.patch_embed_macs,
                                      info.head_macs, info.mlp_ratio)
                full = paper_vit_macs([info.num_tokens] * info.depth, [info.num_tokens] * info.depth, info.dim,
                                      info.patch_embed_macs, info.head_macs, info.mlp_ratio)
            finally:
                patching.unpatch(self.model)
            self._cache[key] = macs / full
        return self._cache[key]


def bisect_level(cost: Callable[[float], float], target: float, steps: int = 14) -> float | None:
    """The smallest level in [0, 1] whose cost (a fraction, falling with the level) is <= target; None if even 1 is
    not enough."""
    if cost(1.0) > target:
        return None
    lo, hi = 0.0, 1.0
    if cost(lo) <= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# ---- quality ---------------------------------------------------------------------------------------------------

class Judge:
    """Scores a configuration on fixed images against the unpatched model's outputs.

    The score the search ranks by is fidelity, in every mode: for classifiers minus the mean KL(unpatched ‖ patched)
    of the class distributions, for feature models (DINOv2, CLIP towers) the mean cosine of the features. It is
    smooth and has little variance, where top-1 on a few hundred images moves by whole images. With labels, top-1 is
    measured too and decides the final choice where it is significant (see :func:`choose`). Top-1 agreement and
    cosine are reported in every mode.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256):
        self.model, self.images, self.labels, self.batch_size = model, images, labels, batch_size
        self.reference = self._outputs()
        self.classifier = self.reference.shape[1] > 1 and bool(getattr(model, "num_classes", 1))
        if labels is not None and not self.classifier:
            raise ValueError("labels were given but the model outputs features, not class logits; drop the labels "
                             "(fidelity mode) or pass a classifier")

    def _outputs(self) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.model(self.images[i:i + self.batch_size]).float().flatten(1)
                              for i in range(0, len(self.images), self.batch_size)])

    @property
    def perfect(self) -> float:
        """The unpatched model's own score."""
        return 0.0 if self.classifier else 1.0

    @property
    def mode(self) -> str:
        kind = "KL to unpatched" if self.classifier else "feature cosine to unpatched"
        return f"top-1, ties on {kind}" if self.labels is not None else kind

    def __call__(self) -> tuple[float, dict[str, float]]:
        out = self._outputs()
        same = compare_outputs(out, self.reference)
        q: dict[str, float] = {"cosine": same.cosine_mean}
        if self.classifier:
            q["agreement"] = same.top1_agreement
            q["kl"] = F.kl_div(out.log_softmax(1), self.reference.log_softmax(1), log_target=True,
                               reduction="batchmean").item()
        if self.labels is not None:
            q["top1"] = (out.argmax(1) == self.labels).float().mean().item()
        return (-q["kl"], q) if self.classifier else (q["cosine"], q)


def choose(finals: list["Candidate"], n: int) -> "Candidate":
    """The recipe among the finalists (scored on ``n`` calibration images). Without labels: the best fidelity. With
    labels: the best top-1, except that finalists within one standard error of it are tied and the best fidelity of
    those wins. The error is that of a paired comparison with the unpatched model, ``sqrt(disagreement / n)``: only
    images whose prediction changed can move top-1."""
    if not all("top1" in c.quality for c in finals):
        return max(finals, key=lambda c: c.score)
    top = max(finals, key=lambda c: c.quality["top1"])
    se = math.sqrt(max(1.0 - top.quality.get("agreement", 1.0), 1.0 / n) / n)
    tied = [c for c in finals if c.quality["top1"] >= top.quality["top1"] - se]
    return max(tied, key=lambda c: c.score)


def reference_quality(judge: Judge) -> dict[str, float]:
    """The unpatched model's own figures on a judge's images (top-1 when labelled)."""
    q = {"cosine": 1.0}
    if judge.classifier:
        q.update(agreement=1.0, kl=0.0)
    if judge.labels is not None:
        q["top1"] = (judge.reference.argmax(1) == judge.labels).float().mean().item()
    return q


# ---- the search -----------------------------------------------------------------------------------------------

@dataclass
class TuneResult:
    recipe: dict[str, Any]
    candidates: list[Candidate]
    front: list[Candidate]
    chosen: Candidate
    wall_s: float
    evaluations: int


class Evaluations:
    """Evaluated configurations, appended to a JSONL file as they finish, so a rerun resumes (no re-evaluation)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seen: dict[str, dict[str, Any]] = {}
        self.new = 0
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.seen[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.seen.get(key)

    def add(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, **row}
        self.seen[key] = row
        self.new += 1
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def tune(
    model: nn.Module,
    budget: Budget,
    search_images: tuple[torch.Tensor, torch.Tensor | None],
    calib_images: tuple[torch.Tensor, torch.Tensor | None],
    holdout_images: tuple[torch.Tensor, torch.Tensor | None],
    *,
    methods: Iterable[str] = METHODS,
    batch_size: int = 32,
    threads: int = 2,
    model_name: str = "",
    out: Path | None = None,
    finalists: int = 3,
    greedy_groups: int = 6,
    on_step: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search every method's schedules for the best quality within ``budget``; see the module docstring."""
    step = on_step or (lambda _m: None)
    start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"tune searches {', '.join(METHODS)}; got {m!r}")
    if patching.is_patched(model):
        raise ValueError("tune takes the unpatched model; vitprune.unpatch(model) first")
    model.eval()
    info = patching._backend(model).model_info(model)
    depth, patches = info.depth, info.num_patches
    cost = CostModel(model, search_images[0])
    evals = Evaluations(None if out is None else out / "evaluations.jsonl")
    judges = {"search": Judge(model, *search_images), "calibration": Judge(model, *calib_images)}

    def evaluate(cand: Candidate, split: str) -> Candidate:
        key = f"{split}|{judges[split].mode}|{cand.spec}"
        row = evals.get(key)
        if row is None:
            patching.patch(model, cand.method, **cand.config)
            try:
                score, quality = judges[split]()
            finally:
                patching.unpatch(model)
            row = {"score": score, "quality": quality}
            evals.add(key, {**row, "shape": cand.shape, "macs_fraction": cand.macs_fraction})
        cand.score, cand.quality, cand.split = row["score"], row["quality"], split
        return cand

    targets, wanted = macs_targets(model, budget, methods, cost, depth, patches, batch_size, threads,
                                   search_images[0], step)
    strongest = {m: min((shaped_config(m, s, 1.0, depth, patches) for s in SHAPES[m]),
                        key=lambda c, m=m: cost.fraction(m, c)) for m in methods}
    smallest = {m: cost.fraction(m, strongest[m]) for m in methods}
    feasible_methods = [m for m in methods if smallest[m] <= targets[m]]
    if not feasible_methods:
        best = min(methods, key=lambda m: smallest[m] / targets[m])
        spec = format_method_spec(best, strongest[best])
        if budget.macs is not None:
            reach = f"the smallest reachable is {smallest[best]:.3f} of the MACs ({spec})"
        else:  # the measured efficiency turns the fewest MACs into the most speed
            reach = f"the fastest reachable is about {targets[best] * wanted / smallest[best]:.2f}x ({spec})"
        raise ValueError(f"budget {budget.describe()} cannot be reached: {reach}; relax the budget")

    candidates: list[Candidate] = []
    for m in feasible_methods:
        for shape in SHAPES[m]:
            level = bisect_level(lambda t, m=m, s=shape: cost.fraction(m, shaped_config(m, s, t, depth, patches)),
                                 targets[m])
            if level is None:
                continue
            config = shaped_config(m, shape, level, depth, patches)
            step(f"search: {format_method_spec(m, config)}")
            candidates.append(evaluate(Candidate(m, config, f"{m}/{shape}", cost.fraction(m, config)), "search"))
    if "tome" in feasible_methods and greedy_groups > 0:
        candidates += greedy_tome(model, cost, targets["tome"], depth, patches, greedy_groups, evaluate, step,
                                  start_score=judges["search"].perfect)

    within = [c for c in candidates if c.score is not None and c.macs_fraction <= targets[c.method]]
    ranked = sorted(within, key=lambda c: -c.score)
    finals = []
    for c in ranked[:finalists]:
        step(f"calibration: {c.spec}")
        finals.append(evaluate(Candidate(c.method, c.config, c.shape, c.macs_fraction), "calibration"))
    chosen = choose(finals, len(calib_images[0]))
    judges["holdout"] = Judge(model, *holdout_images)
    step(f"held-out: {chosen.spec}")
    holdout = evaluate(Candidate(chosen.method, chosen.config, chosen.shape, chosen.macs_fraction), "holdout")
    recipe = {
        RECIPE_KEY: 1,
        "method": chosen.method,
        "config": chosen.config,
        "spec": chosen.spec,
        "model": model_name,
        "budget": {k: v for k, v in asdict(budget).items() if v is not None},
        "macs_fraction": chosen.macs_fraction,
        "gmacs": cost.base * chosen.macs_fraction / 1e9,
        "gmacs_unpatched": cost.base / 1e9,
        "quality_mode": judges["calibration"].mode,
        "calibration": {"n": len(calib_images[0]), **chosen.quality,
                        "unpatched": reference_quality(judges["calibration"])},
        "holdout": {"n": len(holdout_images[0]), **holdout.quality,
                    "unpatched": reference_quality(judges["holdout"])},
        "search": {"evaluations": len(evals.seen), "new_evaluations": evals.new, "shape": chosen.shape,
                   "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__},
    }
    if budget.macs is None:
        recipe["macs_target"] = targets[chosen.method]
        step(f"speed: measuring {chosen.spec}")
        recipe["speed"] = measure_speedup(model, chosen.method, chosen.config, search_images[0], batch_size, threads)
    return TuneResult(recipe=recipe, candidates=candidates + finals, front=pareto_front(within), chosen=chosen,
                      wall_s=time.perf_counter() - start, evaluations=len(evals.seen))


def greedy_tome(model: nn.Module, cost: CostModel, target: float, depth: int, patches: int, groups: int,
                evaluate: Callable[[Candidate, str], Candidate], step: Callable[[str], None],
                start_score: float = 0.0, max_swaps: int = 8) -> list[Candidate]:
    """Per-block-group descent, then swaps. Descent: add merges to every block of the group whose step loses the
    least score per MAC saved, until the budget holds. A step is one merge per block per 64 patches (1 on the
    64-patch testbed, 4 on DINOv2's 256), so the descent takes a similar number of steps on every model. Swaps: move
    a step's merges from one group to another while the budget holds and the score improves (the descent alone can
    stop at a schedule whose merges sit in the wrong blocks), or take merges back where the budget has room.
    ``start_score``: the unpatched model's score. Returns
    every candidate evaluated (for the plot; only the last ones meet the budget)."""
    bounds = [round(i * depth / groups) for i in range(groups + 1)]
    spans = [range(bounds[i], bounds[i + 1]) for i in range(groups) if bounds[i + 1] > bounds[i]]
    r = [0] * depth
    inc = max(1, round(patches / 64))
    current_score, current_cost = start_score, 1.0
    seen: list[Candidate] = []

    def trial_of(give: range | None, take: range | None) -> list[int] | None:
        trial = list(r)
        if give is not None:
            if any(trial[b] < inc for b in give):
                return None
            for b in give:
                trial[b] -= inc
        for b in take or ():
            trial[b] += inc
        return trial

    while current_cost > target:
        options = []
        for span in spans:
            trial = trial_of(None, span)
            frac = cost.fraction("tome", {"r": trial})
            if frac >= current_cost:  # nothing left to merge there
                continue
            cand = evaluate(Candidate("tome", {"r": trial}, "tome/greedy", frac), "search")
            seen.append(cand)
            loss = max(0.0, current_score - cand.score)
            options.append(((loss / (current_cost - frac), frac), cand))  # ties: the bigger saving
        if not options:
            return seen
        _, best = min(options, key=lambda o: o[0])
        r, current_score, current_cost = list(best.config["r"]), best.score, best.macs_fraction
        step(f"greedy: {best.spec} at {current_cost:.3f} MACs")
    for _ in range(max_swaps):
        moves = []
        for give in spans:
            for take in [*spans, None]:  # None: give merges back where the budget has room
                trial = None if give is take else trial_of(give, take)
                if trial is None or cost.fraction("tome", {"r": trial}) > target:
                    continue
                cand = evaluate(Candidate("tome", {"r": trial}, "tome/greedy+swap",
                                          cost.fraction("tome", {"r": trial})), "search")
                seen.append(cand)
                moves.append(cand)
        best = max(moves, key=lambda c: c.score, default=None)
        if best is None or best.score <= current_score:
            break
        r, current_score = list(best.config["r"]), best.score
        step(f"swap: {best.spec} at {best.macs_fraction:.3f} MACs")
    return seen


def macs_targets(model: nn.Module, budget: Budget, methods: list[str], cost: CostModel, depth: int, patches: int,
                 batch_size: int, threads: int, images: torch.Tensor, step: Callable[[str], None]
                 ) -> tuple[dict[str, float], float]:
    """The MACs fraction each method may use, and the speedup wanted (1 for a MACs budget). A MACs budget is that
    fraction for all; a speed budget becomes each method's measured efficiency (speedup / MACs ratio, at a middle
    level, timed interleaved with the unpatched model at ``batch_size``) divided by the speedup wanted."""
    if budget.macs is not None:
        return {m: budget.macs for m in methods}, 1.0
    probes = {m: shaped_config(m, SHAPES[m][0], 0.5, depth, patches) for m in methods}
    step(f"speed: measuring each method's efficiency at batch {batch_size}")
    base, timed = _interleaved(model, [(m, probes[m]) for m in methods], images, batch_size, threads, rounds=3)
    wanted = budget.speedup if budget.speedup is not None else base.latency_ms_median / budget.latency_ms
    targets = {}
    for m, sp in zip(methods, timed):
        efficiency = (sp.img_per_s / base.img_per_s) * cost.fraction(m, probes[m])  # speedup / MACs ratio
        targets[m] = min(1.0, efficiency / wanted)
        step(f"speed: {m} at {cost.fraction(m, probes[m]):.2f} of the MACs runs {sp.img_per_s / base.img_per_s:.2f}x "
             f"(efficiency {efficiency:.2f}): MACs target {targets[m]:.3f}")
    return targets, wanted


def _interleaved(model: nn.Module, configs: list[tuple[str, dict[str, Any]]], images: torch.Tensor, batch_size: int,
                 threads: int, rounds: int) -> tuple[Any, list[Any]]:
    """Speed of the unpatched model and of each (method, config), timed round-robin on one image repeated to
    ``batch_size``; the model is left unpatched."""
    from .measure.speed import interleaved_throughput

    batch = images[:1].expand(batch_size, *images.shape[1:]).contiguous()

    def unpatched() -> None:
        if patching.is_patched(model):
            patching.unpatch(model)

    setups = [unpatched] + [lambda m=m, c=c: patching.patch(model, m, **c) for m, c in configs]
    speeds = interleaved_throughput(model, batch, setups, threads=threads, rounds=rounds)
    unpatched()
    return speeds[0], speeds[1:]


def measure_speedup(model: nn.Module, method: str, config: dict[str, Any], images: torch.Tensor, batch_size: int,
                    threads: int, rounds: int = 5) -> dict[str, float]:
    """The recipe's speedup over the unpatched model, timed interleaved at ``batch_size`` (short: a check, not a
    benchmark; ``vitprune bench -m recipe:...`` times it properly)."""
    base, (tuned,) = _interleaved(model, [(method, config)], images, batch_size, threads, rounds)
    return {"measured_speedup": tuned.img_per_s / base.img_per_s, "latency_ms": tuned.latency_ms_median,
            "latency_ms_unpatched": base.latency_ms_median, "batch_size": batch_size, "threads": threads,
            "rounds": rounds}


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both cost and score (search split)."""
    pts = sorted((c for c in candidates if c.score is not None and c.split == "search"),
                 key=lambda c: (c.macs_fraction, -c.score))
    front, best = [], -math.inf
    for c in pts:
        if c.score > best:
            front.append(c)
            best = c.score
    return front


# ---- recipes -------------------------------------------------------------------------------------------------

def read_recipe(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(method, config) of a recipe written by ``vitprune tune``; one clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"recipe {path} not found; write one with `vitprune tune ... --out DIR` (DIR/recipe.json)")
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {path} is not valid JSON ({e})") from None
    if not isinstance(recipe, dict) or recipe.get(RECIPE_KEY) != 1 or "method" not in recipe:
        raise ValueError(f"{path} is not a vitprune recipe (no '{RECIPE_KEY}: 1' and 'method'); "
                         "recipes come from `vitprune tune`")
    config = recipe.get("config", {})
    return recipe["method"], {k: tuple(v) if k == "blocks" else v for k, v in config.items()}


def write_outputs(result: TuneResult, out: Path) -> dict[str, Path]:
    """``recipe.json``, ``candidates.csv`` and ``pareto.png`` in ``out``."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = {"recipe": out / "recipe.json", "csv": out / "candidates.csv", "plot": out / "pareto.png"}
    paths["recipe"].write_text(json.dumps(result.recipe, indent=2) + "\n")
    front = {id(c) for c in result.front}
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "method", "shape", "spec", "macs_fraction", "score", "top1", "kl", "agreement",
                    "cosine", "on_front", "chosen"])
        for c in result.candidates:
            q = c.quality
            w.writerow([c.split, c.method, c.shape, c.spec, f"{c.macs_fraction:.4f}", f"{c.score:.6f}",
                        q.get("top1", ""), q.get("kl", ""), q.get("agreement", ""), q.get("cosine", ""),
                        id(c) in front, c.spec == result.chosen.spec and c.split == "calibration"])
    _plot(result, paths["plot"])
    return paths


def _plot(result: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    search = [c for c in result.candidates if c.split == "search"]
    for method in dict.fromkeys(c.method for c in search):
        pts = [c for c in search if c.method == method]
        ax.scatter([c.macs_fraction for c in pts], [c.score for c in pts], s=18, alpha=0.7, label=method)
    ax.plot([c.macs_fraction for c in result.front], [c.score for c in result.front], "k--", lw=1, label="front")
    chosen = next((c for c in search if c.spec == result.chosen.spec), None)
    if chosen is not None:
        ax.scatter([chosen.macs_fraction], [chosen.score], s=120, facecolors="none", edgecolors="red", lw=2,
                   label=f"chosen: {result.chosen.spec}"[:60])
    target = result.recipe.get("budget", {}).get("macs", result.recipe.get("macs_target"))
    if target:
        ax.axvline(target, color="grey", lw=1, ls=":", label="budget")
    ax.set_xlabel("MACs (fraction of unpatched)")
    ax.set_ylabel("fidelity on the search images (-KL or cosine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- data ------------------------------------------------------------------------------------------------------

Split = tuple[torch.Tensor, "torch.Tensor | None"]


def _stack(dataset: Any, indices: list[int], labelled: bool) -> Split:
    xs, ys = [], []
    for i in indices:
        x, y = dataset[i]
        xs.append(x)
        ys.append(int(y))
    y = torch.tensor(ys) if labelled else None
    if y is not None and bool((y < 0).any()):
        raise ValueError("some images have no label (-1); pass --fidelity to tune against the unpatched model instead")
    return torch.stack(xs), y


def make_splits(data: Any, holdout: Any | None, calib_limit: int, holdout_limit: int, search_limit: int,
                labelled: bool) -> tuple[Split, Split, Split]:
    """(search, calibration, held-out) images. Calibration: an evenly strided ``calib_limit`` of ``data``; search: an
    evenly strided part of those; held-out: ``holdout_limit`` of ``holdout`` or, without it, of the images of
    ``data`` that calibration did not take (never the same image twice)."""
    from .measure.data import strided_indices

    n = len(data)
    if n == 0:
        raise ValueError("the dataset is empty")
    calib_idx = strided_indices(n, min(calib_limit, n if holdout is not None else max(1, n // 2)))
    calib = _stack(data, calib_idx, labelled)
    pick = strided_indices(len(calib_idx), min(search_limit, len(calib_idx)))
    search = (calib[0][pick], None if calib[1] is None else calib[1][pick])
    if holdout is not None:
        rest_ds, rest = holdout, list(range(len(holdout)))
    else:
        taken = set(calib_idx)
        rest_ds, rest = data, [i for i in range(n) if i not in taken]
    if not rest:
        raise ValueError("no images left for the held-out split; give more data or --holdout-data")
    held = [rest[i] for i in strided_indices(len(rest), min(holdout_limit, len(rest)))]
    return search, calib, _stack(rest_ds, held, labelled)
