"""One training loop for every method: learned selectors (HeatViT, SPViT) and fine-tuning a backbone under a
training-free reduction (PPT, ToMe, EViT, ToGo), single process or under ``torchrun`` (DDP).

* Teacher = the same weights, unpatched and frozen; the student is the patched model (DESIGN §2 losses).
* ``freeze_backbone``: only the method's own parameters train (selectors; fast, kilobyte checkpoints), and the
  backbone runs in eval mode. Otherwise everything trains (a full fine-tune; selectors at ``lr``, the backbone at
  ``backbone_lr``).
* Budget: fixed keep ratios (the ratio loss), or a latency budget read from a latency LUT (the latency-sparsity
  loss replaces the ratio loss).
* ``quantize``: quantization-aware training — the student runs HeatViT's simulated 8-bit fixed point
  (``hw.quant``: int8 Linear layers with power-of-two scales calibrated on the first training batches, rounding
  with a straight-through gradient; ``"int8+poly"`` adds the polynomial GELU and softmax) while the fp32 master
  weights train. The checkpoint holds those fp32 weights; quantize and calibrate them again to deploy
  (``vitprune quantize --checkpoint <out>/backbone.safetensors``), as post-training quantization would.
* Data order is a deterministic function of (seed, epoch), and the resume state holds the optimizer, scheduler and
  RNG states, so ``resume=True`` after a kill continues exactly where the last saved step left off.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import patching
from ..methods.base import ModelInfo
from ..methods.selector import TokenSelector
from . import checkpoint as ckpt
from .distributed import Distributed
from .losses import LossWeights, distill_kl, ratio_loss, token_mse
from .lut import LatencyLUT, latency_sparsity_loss


QUANTIZE = (None, "int8", "int8+poly")
CALIBRATION_BATCHES = 4


@dataclass
class TrainConfig:
    method: str = "heatvit"
    method_config: dict[str, Any] = field(default_factory=dict)
    model: str = "testbed"
    checkpoint: str | None = None  # base weights (default: the model's shared/timm weights)
    init_selectors: str | None = None  # a trained folder whose selectors start the ones at the same blocks
    data: str = "testbed-train"
    limit: int | None = None  # train on an evenly strided subset
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3  # the method's parameters (selectors)
    backbone_lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    freeze_backbone: bool = True
    label_free: bool = False
    loss: LossWeights = field(default_factory=LossWeights)
    lut: str | None = None
    quantize: str | None = None  # quantization-aware training: "int8" or "int8+poly"
    per_channel: bool = False  # per-channel weight scales under ``quantize``
    target_latency_ms: float | None = None
    target_speedup: float | None = None
    out: str = "results/train/run"
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    log_every: int = 10
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    last: dict[str, float]
    world_size: int = 1
    replicas_in_sync: bool | None = None


class Student(nn.Module):
    """The patched model as one module that returns (logits, final tokens), so DDP wraps a single forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), feats


def training_data(spec: str, limit: int | None) -> Dataset:
    """``"testbed-train"`` (the shared Fashion-MNIST train split) or anything ``load_dataset`` opens."""
    from ..measure.data import load_dataset

    if spec == "testbed-train":
        from ..assets import testbed_paths

        spec = str(testbed_paths().train)
    return load_dataset(spec, limit=limit)


def check_config(cfg: TrainConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1, got {cfg.steps}, {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.backbone_lr < 0:
        raise ValueError("learning rates must be positive")
    if cfg.target_latency_ms is not None and cfg.target_speedup is not None:
        raise ValueError("give either target_latency_ms or target_speedup, not both")
    if (cfg.target_latency_ms is not None or cfg.target_speedup is not None) and cfg.lut is None:
        raise ValueError("a latency budget needs a latency LUT: profile one with `vitprune lut` and pass --lut")
    if cfg.quantize not in QUANTIZE:
        choices = ", ".join(q for q in QUANTIZE if q)
        raise ValueError(f"quantize must be one of {choices} (or none), got {cfg.quantize!r}")
    if cfg.target_speedup is not None and not cfg.target_speedup > 1.0:
        raise ValueError(f"target_speedup must be > 1, got {cfg.target_speedup}")


def soft_tokens(method: TokenSelector, keeps: dict[int, Tensor], info: ModelInfo) -> list[Tensor]:
    """Tokens entering each block as (batch-mean, straight-through) soft counts from the training decisions."""
    tokens, n, packages = [], torch.tensor(float(info.num_patches)), 0
    for layer in range(info.depth):
        if layer in keeps:
            n = keeps[layer].float().sum(dim=1).mean()
            if method.package == "append" or (method.package == "update" and packages == 0):
                packages += 1
        tokens.append(n + info.num_prefix + packages)
    return tokens


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def train(cfg: TrainConfig, on_step: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run training as configured; see the module docstring. Rank 0 logs (``log.jsonl``) and checkpoints."""
    from ..models import create_model

    check_config(cfg)
    dist = Distributed.from_env(cfg.device)
    out = Path(cfg.out)
    device = dist.device
    torch.manual_seed(cfg.seed + dist.rank)

    base = create_model(cfg.model, checkpoint=cfg.checkpoint)
    teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    model = patching.patch(base, cfg.method, **cfg.method_config).to(device)
    method = model._vitprune.method
    info = model._vitprune.info
    selectors = isinstance(method, TokenSelector)
    if cfg.init_selectors is not None:
        ckpt.load_matching_selectors(getattr(model, patching.METHOD_MODULE), cfg.init_selectors)
    data = training_data(cfg.data, cfg.limit)
    if len(data) < cfg.batch_size * dist.world_size:
        raise ValueError(f"the training data has {len(data)} images, fewer than one batch per process")
    if cfg.quantize is not None:
        quantize_student(model, data, cfg, device)
    method_params = [p for n, p in model.named_parameters() if n.startswith(ckpt.METHOD_PREFIX)]
    if cfg.freeze_backbone:
        if not method_params:
            raise ValueError(f"{cfg.method} has nothing to train with a frozen backbone; use a full fine-tune "
                             "(--full) or a learned method (heatvit, spvit)")
        model.requires_grad_(False)
        for p in method_params:
            p.requires_grad_(True)
    groups = [{"params": method_params, "lr": cfg.lr}] if method_params else []
    if not cfg.freeze_backbone:
        backbone = [p for n, p in model.named_parameters() if not n.startswith(ckpt.METHOD_PREFIX)]
        groups.append({"params": backbone, "lr": cfg.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    student = dist.wrap(Student(model))

    lut = budget = None
    if cfg.lut is not None:
        if not selectors:
            raise ValueError("a latency budget trains selector keep rates; use --method heatvit or spvit with --lut")
        if method.decisions == "topk":
            raise ValueError("the latency loss learns keep rates, which top-k training fixes; use decisions=gumbel")
        method.decisions = "gumbel"  # counts must be sampled for the latency loss to move them
        lut = LatencyLUT.load(cfg.lut)
        lut.check_model(info)
        budget = cfg.target_latency_ms if cfg.target_latency_ms is not None else lut.full_ms() / cfg.target_speedup

    sampler = DistributedSampler(data, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size

    step = 0
    if cfg.resume:
        state = ckpt.load_resume(out / ckpt.RESUME)
        if state["config"] != _resumable(cfg):
            raise ValueError(f"{out / ckpt.RESUME} was written by a different configuration; resume with the same "
                             "options or start a new --out folder")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, t in state["params"].items():
                trainable[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][dist.rank % len(state["rng"])])
        step = state["step"]
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=1, default=str))
    log = (out / "log.jsonl").open("a") if dist.is_main else None

    def set_modes() -> None:
        if cfg.freeze_backbone:
            model.eval()
            getattr(model, patching.METHOD_MODULE).train()
        else:
            model.train()

    set_modes()
    start = time.perf_counter()
    last: dict[str, float] = {}
    p0 = info.num_prefix
    while step < cfg.steps:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * cfg.batch_size: per_epoch * cfg.batch_size]
        # its own generator: the loader must not draw from the global RNG (the Gumbel noise), or a resumed run
        # would see different noise than an uninterrupted one
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t_feats = teacher.forward_features(x)
                t_logits = teacher.forward_head(t_feats)
            logits, feats = student(x)
            trace = model._vitprune.last_trace
            terms: dict[str, Tensor] = {}
            if not cfg.label_free:
                terms["ce"] = cfg.loss.ce * nn.functional.cross_entropy(logits.float(), y.long())
            terms["kl"] = cfg.loss.kl * distill_kl(logits, t_logits)
            if selectors:
                keeps = trace.notes["selector_keep"]
                if lut is not None:
                    predicted = lut.predict_ms(soft_tokens(method, keeps, info), selectors_at=method.blocks)
                    terms["latency"] = cfg.loss.latency * latency_sparsity_loss(predicted, budget).float()
                    last["predicted_ms"] = float(predicted.detach())
                elif method.train_decisions == "gumbel":  # top-k keeps the target counts by construction
                    targets = [method.keep_at[layer] for layer in keeps]
                    terms["ratio"] = cfg.loss.ratio * ratio_loss(list(keeps.values()), targets)
                # masked training keeps positions: compare token by token (hierarchical models such as PiT return
                # only their prefix tokens from forward_features, so they have no token term)
                if feats.shape[1] >= t_feats.shape[1] > p0:
                    keep = model._vitprune.final_keep
                    n = t_feats.shape[1] - p0
                    terms["tokens"] = cfg.loss.tokens * token_mse(
                        feats[:, p0:p0 + n], t_feats[:, p0:p0 + n], None if keep is None else keep[:, p0:p0 + n])
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            last.update({k: float(v.detach()) for k, v in terms.items()}, loss=float(loss.detach()))
            if selectors:
                for layer, k in trace.notes["selector_keep"].items():
                    last[f"keep@{layer}"] = float(k.detach().float().mean())
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                log.write(json.dumps({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                                      "seconds": round(time.perf_counter() - start, 3), **last}) + "\n")
                log.flush()
            if on_step is not None and dist.is_main:
                on_step(step, cfg.steps, last)
            if step % cfg.save_every == 0 or step == cfg.steps:
                _save(cfg, dist, model, optimizer, scheduler, step, out)
            if step >= cfg.steps:
                break
    if log is not None:
        log.close()
    in_sync = dist.replicas_in_sync(model) if dist.world_size > 1 else None
    dist.close()
    return TrainResult(out=out, steps=step, seconds=time.perf_counter() - start, last=last,
                       world_size=dist.world_size, replicas_in_sync=in_sync)


def quantize_student(model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device) -> None:
    """Swap in the fake-quant layers (QAT) and calibrate their activation scales on the first training images
    (the same on every rank and after a resume, so all replicas quantize alike)."""
    from ..hw.quant import calibrate, quantize

    quantize(model, per_channel=cfg.per_channel, poly=cfg.quantize == "int8+poly")
    n = min(len(data), CALIBRATION_BATCHES * cfg.batch_size)
    images = torch.stack([data[i][0] for i in range(n)]).to(device)
    model.eval()
    calibrate(model, list(images.split(cfg.batch_size)))


def _resumable(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields that must match for a resume to continue the same run."""
    d = cfg.to_json()
    for k in ("resume", "progress", "save_every", "log_every", "workers"):
        d.pop(k)
    return json.loads(json.dumps(d, default=str))


def _save(cfg: TrainConfig, dist: Distributed, model: nn.Module, optimizer, scheduler, step: int, out: Path) -> None:
    rngs = dist.gather_rng()
    if not dist.is_main:
        return
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt.save_resume(out / ckpt.RESUME, {"config": _resumable(cfg), "step": step, "params": params,
                                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                         "rng": rngs})
    ckpt.save_trained(model, out, model_name=cfg.model, backbone=not cfg.freeze_backbone,
                      base_checkpoint=cfg.checkpoint, extra={"step": step, "quantized": cfg.quantize})
