"""Losses for (possibly imbalanced) classification."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FocalLoss(nn.Module):
    """Focal loss, FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t (Lin et al., "Focal Loss for Dense Object
    Detection", ICCV 2017): down-weights easy examples so rare, hard ones drive learning."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target``: class indices (N,) or class probabilities (N, C) from mixup/cutmix."""
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none",
                             label_smoothing=self.label_smoothing)
        probs = torch.softmax(logits, dim=1)
        p_t = (probs * target).sum(1) if target.dim() == 2 else probs.gather(1, target[:, None]).squeeze(1)
        return ((1 - p_t) ** self.gamma * ce).mean()


def build_loss(kind: str, weight: torch.Tensor | None, label_smoothing: float, focal_gamma: float) -> nn.Module:
    if kind == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
