"""The selector training objective (DynamicViT/SPViT), one term per function so each can be tested alone.

loss = CE(student, label)                                      (skipped in label-free mode)
     + λ_ratio · mean_stages (mean(keep_i) − ρ_i)²             (fixed target ratios), or
     + λ_latency · ((LUT latency at the soft keep counts − budget) / budget)²   (``lut.latency_sparsity_loss``)
     + λ_kl · KL(student ‖ teacher)                            (teacher = the same weights, unpatched, frozen)
     + λ_tok · MSE(kept final tokens, teacher's tokens at the same positions)
Defaults are SPViT's (DESIGN §2): λ_ratio = 2.0, λ_kl = 0.5, λ_tok = 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    ratio: float = 2.0
    kl: float = 0.5
    tokens: float = 0.5
    latency: float = 2.0


def ratio_loss(keeps: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """mean over stages of (batch-mean kept fraction − ρ_i)²; ``keeps``: [B, n] hard decisions per stage."""
    terms = [(k.float().mean(dim=1).mean() - t) ** 2 for k, t in zip(keeps, targets)]
    return torch.stack(terms).mean()


def distill_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL divergence pulling the student's class distribution to the teacher's (DynamicViT's form)."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="batchmean", log_target=True)


def token_mse(student_tokens: Tensor, teacher_tokens: Tensor, keep: Tensor | None) -> Tensor:
    """MSE between the student's final patch tokens and the teacher's at the same positions, over kept ones only.

    ``student_tokens``/``teacher_tokens``: [B, n, C] patch tokens (same positions, masked training keeps shapes);
    ``keep``: [B, n] final keep mask (None: all kept).
    """
    diff = (student_tokens.float() - teacher_tokens.float()).pow(2).mean(dim=-1)  # [B, n]
    if keep is None:
        return diff.mean()
    keep = keep.float()
    return (diff * keep).sum() / keep.sum().clamp_min(1.0)

