"""Layers shared by the models."""
from __future__ import annotations

import torch
from torch import nn


class FastDropout(nn.Module):
    """``nn.Dropout`` with the mask drawn by ``torch.rand_like``: the same function, several times faster
    on the CPU than torch's Bernoulli sampling (which took ~40% of a SASRec training step, and most of an
    NGCF step outside its SpMMs). The identity in eval mode, so exported graphs hold no trace of it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep
