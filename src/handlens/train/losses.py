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


def stacked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                          mask: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """``nn.CrossEntropyLoss(weight, label_smoothing)`` (mean reduction) of K independent batches at once:
    ``logits`` (K, B, C), ``target`` (K, B), ``weight`` (K, C) per-batch class weights or None, ``mask`` (K, B)
    the rows that count. Returns the K losses; a batch with no counted row gets 0. PyTorch's definition with
    weights: (1 - e) * sum_i w_yi nll_i / sum_i w_yi + (e / C) * sum_i sum_c w_c (-log p_ic) / sum_i w_yi."""
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    keep = mask.to(logp.dtype)
    row_w = (weight.gather(1, target) if weight is not None else torch.ones_like(nll)) * keep
    denominator = row_w.sum(1).clamp_min(torch.finfo(logp.dtype).tiny)
    loss = (row_w * nll).sum(1) / denominator
    if label_smoothing:
        per_class = -logp if weight is None else -logp * weight.unsqueeze(1)
        smooth = (per_class.sum(-1) * keep).sum(1) / denominator
        loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / logits.shape[-1])
    return loss * (keep.sum(1) > 0)
