"""Does the model learn at all? The verdict of an ``--overfit-batches`` run, in the words every surface uses.

A network that cannot drive its training loss towards zero on a few repeated batches has a bug (labels,
learning rate, what is frozen) that no amount of data will fix (Karpathy, "A Recipe for Training Neural
Networks", 2019: "overfit one batch").
"""

from __future__ import annotations

import math
from typing import Any

LEARNS = "learns"
DOES_NOT_LEARN = "does not learn"


def learning_verdict(first_loss: float, last_loss: float) -> str:
    """``learns: train loss fell from X to Y`` when it at least halved, else ``does not learn: ...``."""
    if math.isfinite(first_loss) and math.isfinite(last_loss) and last_loss <= 0.5 * first_loss:
        return f"{LEARNS}: train loss fell from {first_loss:.3f} to {last_loss:.3f}"
    return (f"{DOES_NOT_LEARN}: train loss went from {first_loss:.3f} to {last_loss:.3f} on the same few batches "
            "(it should fall to near 0: check the labels, the learning rate and what is frozen)")


def history_verdict(history: list[dict[str, Any]]) -> str:
    """The learning verdict of a run's per-epoch history (its first and last training loss)."""
    losses = [float(r["train_loss"]) for r in history if r.get("train_loss") is not None]
    if not losses:
        return f"{DOES_NOT_LEARN}: no training loss was recorded"
    return learning_verdict(losses[0], losses[-1])
