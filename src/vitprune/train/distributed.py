"""torchrun support: one object that knows this process's rank and hides the single-process case.

Under ``torchrun`` (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on CUDA; the student is wrapped in
DistributedDataParallel, each rank reads its own shard (DistributedSampler) and rank 0 alone logs and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        dev = torch.device(f"cuda:{local}" if device.startswith("cuda") and world > 1 else device)
        if world > 1 and not torch_dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world, device=dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def gather_rng(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state (Gumbel noise), so a resumed run draws the same noise."""
        state = torch.get_rng_state()
        if self.world_size == 1:
            return [state]
        states: list = [None] * self.world_size
        torch_dist.all_gather_object(states, state)
        return states

    def replicas_in_sync(self, model: nn.Module) -> bool:
        """True when every rank holds the same trainable weights (DDP kept them in step)."""
        with torch.no_grad():
            mine = torch.stack([p.double().sum() for p in model.parameters() if p.requires_grad]).cpu()
        sums: list = [None] * self.world_size
        torch_dist.all_gather_object(sums, mine)
        return all(torch.equal(sums[0], s) for s in sums[1:])

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
