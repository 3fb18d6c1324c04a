"""An exponential moving average of the weights, beside (not inside) the DeepSpeed engine.

The average is a plain fp32 copy of the model on every rank, made before the engine exists and
updated after every optimizer step from the engine's live weights: the module's own tensors under
ZeRO 0-2 (every rank holds them whole), and under ZeRO-3, where each rank holds a partition, the
whole tensors gathered for the update (`deepspeed.zero.GatheredParameters`, read-only, the same
all-gather the forward pass does). Every rank therefore holds the same average, evaluates it
without the engine (each rank its share of the val split) and rank 0 can write it. Its state goes
into the checkpoint's client state, so a resumed run continues the exact same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """ema = decay x ema + (1 - decay) x w for every parameter (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float, zero_stage: int, device: torch.device | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay}")
        self.decay = decay
        self.zero_stage = zero_stage
        # A copy of the module as it is now (before ZeRO partitions it), in fp32 whatever the
        # training precision: an average of bf16-rounded steps kept in bf16 would stall.
        self.module = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        """Fold the live weights of `live` (the engine's module) into the average; every rank calls."""
        named = list(live.named_parameters())
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                self._fold(named, live)
        else:
            self._fold(named, live)
        self.updates += 1

    def _fold(self, named, live: nn.Module) -> None:
        mine = dict(self.module.named_parameters())
        if set(mine) != {n for n, _ in named}:
            raise RuntimeError("EMA: the model's parameters changed after the average was made")
        for name, p in named:
            avg = mine[name]
            avg.lerp_(p.detach().to(device=avg.device, dtype=torch.float32), 1.0 - self.decay)
        for (name, b), (_, avg) in zip(live.named_buffers(), self.module.named_buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        """What a checkpoint stores to continue the same average (tensors on the CPU)."""
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the average saved by `state_dict`."""
        if float(state["decay"]) != self.decay:
            raise ValueError(f"EMA: the checkpoint's average uses decay {state['decay']}, this run {self.decay}")
        self.module.load_state_dict(state["weights"], strict=True)
        self.updates = int(state["updates"])

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged state dict (fp32, CPU): what model.safetensors holds when ema_weights is on."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
