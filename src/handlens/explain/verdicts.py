"""Verdicts in words on the checks that can fail a user's trust, the same words in the CLI, JSON, API and viewer.

* **Faithfulness** (deletion and insertion curves, Petsiuk et al., "RISE", BMVC 2018), judged against a random
  map on the same images by a paired one-sided Wilcoxon signed-rank test (Wilcoxon, 1945) on the per-image
  AUC gaps: ``faithful`` when the map deletes the class faster *and* inserts it faster than random (both
  p < alpha); ``worse than random`` when either is significantly slower and neither faster; otherwise
  ``not better than random`` (which includes too few images to tell: with fewer than 5 images no one-sided
  p can fall below 0.05).
* **Sanity** (cascading model-parameter randomisation, Adebayo et al., NeurIPS 2018): ``passes`` when the
  maps of the randomised model no longer resemble the trained model's, ``fails`` when they still do (the
  map shows the image, not what the model learned).
* **Agreement with experts**: the share of each map's energy inside the expert region against the region's
  share of the image (what a uniform map would put there), by the same paired one-sided test: ``agrees with
  the experts`` when the maps put significantly more energy inside, ``looks away from the experts``
  when significantly less, else ``no better than chance``.
* **Mirror consistency** (``trust --consistency``, :mod:`handlens.explain.consistency`): the share of images
  whose mirror image is predicted as expected (the swapped class for a chiral pair, else the same class):
  ``consistent`` at :data:`CONSISTENCY_THRESHOLD` (0.95) or more, else ``not consistent``. A fixed share
  rather than a test: the claim is exact (a mirror changes the truth in a known way), so every miss counts;
  with fewer than :data:`CONSISTENCY_MIN_IMAGES` images one miss is more than 5 points and the sentence says so.
* **Learning** (``--overfit-batches``) is judged where training is: :mod:`handlens.train.sanity`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FAITHFUL = "faithful"
NOT_BETTER = "not better than random"
WORSE = "worse than random"
AGREES = "agrees with the experts"
CHANCE = "no better than chance"
AWAY = "looks away from the experts"
SANITY_PASSES = "passes"
SANITY_FAILS = "fails"
CONSISTENT = "consistent"
NOT_CONSISTENT = "not consistent"
CONSISTENCY_THRESHOLD = 0.95  # the share of images whose mirror image must be predicted as expected
CONSISTENCY_MIN_IMAGES = 20  # below it a single disagreement moves the share by more than 1 - threshold
ALPHA = 0.05
MIN_IMAGES = 5  # the fewest pairs for which a one-sided Wilcoxon p can fall below 0.05 (1/32)


@dataclass(frozen=True)
class FaithfulnessVerdict:
    verdict: str  # FAITHFUL, NOT_BETTER or WORSE
    n: int
    deletion: float  # median deletion AUC of the maps (lower is better)
    random_deletion: float
    insertion: float  # median insertion AUC (higher is better)
    random_insertion: float
    deletion_gap: float  # median of (random - map) deletion AUC per image: > 0 means better than random
    insertion_gap: float  # median of (map - random) insertion AUC per image: > 0 means better than random
    p_deletion: float  # one-sided: the map deletes faster than random
    p_insertion: float  # one-sided: the map inserts faster than random
    alpha: float = ALPHA
    deletion_wins: int = 0  # images whose map deletes the class faster than the random map
    insertion_wins: int = 0  # images whose map inserts it faster

    def sentence(self) -> str:
        """e.g. ``faithful · deletion beats random on 18 of 20 images (median paired gap +0.21, p=0.002),
        insertion on 17 of 20 (+0.16, p=0.01)``: the per-image comparison the test decides on (medians of
        each column alone can look better than random while the map wins on half the images)."""
        n = f"{self.n} image{'s' if self.n != 1 else ''}"
        text = (f"{self.verdict} · deletion beats random on {self.deletion_wins} of {n} (median paired gap "
                f"{self.deletion_gap:+.2f}, p={_p(self.p_deletion)}), insertion on {self.insertion_wins} of "
                f"{self.n} ({self.insertion_gap:+.2f}, p={_p(self.p_insertion)})")
        if self.n < MIN_IMAGES:
            text += f": too few to tell (a paired test needs at least {MIN_IMAGES})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sentence": self.sentence()}


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _one_sided(gaps: np.ndarray, alternative: str) -> float:
    """Wilcoxon signed-rank p that the gaps are above (``greater``) or below (``less``) zero; 1 when every gap is
    zero (nothing to rank) and NaN for no images."""
    if len(gaps) == 0:
        return float("nan")
    if not np.any(gaps != 0):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(gaps, alternative=alternative, zero_method="wilcox").pvalue)


def image_verdict(row: dict[str, Any]) -> str:
    """One image's words: both curves better than its random map's, both worse, or neither."""
    deletion_better = row["deletion_auc"] < row["random_deletion_auc"]
    insertion_better = row["insertion_auc"] > row["random_insertion_auc"]
    if deletion_better and insertion_better:
        return FAITHFUL
    if not deletion_better and not insertion_better:
        return WORSE
    return NOT_BETTER


def faithfulness_verdict(rows: list[dict[str, Any]], *, alpha: float = ALPHA) -> FaithfulnessVerdict:
    """The verdict over images from per-image rows of ``deletion_auc``, ``insertion_auc`` and their random maps'."""
    deletion = np.array([r["deletion_auc"] for r in rows], dtype=np.float64)
    insertion = np.array([r["insertion_auc"] for r in rows], dtype=np.float64)
    random_deletion = np.array([r["random_deletion_auc"] for r in rows], dtype=np.float64)
    random_insertion = np.array([r["random_insertion_auc"] for r in rows], dtype=np.float64)
    deletion_gaps, insertion_gaps = random_deletion - deletion, insertion - random_insertion
    better = (_one_sided(deletion_gaps, "greater"), _one_sided(insertion_gaps, "greater"))
    worse = (_one_sided(deletion_gaps, "less"), _one_sided(insertion_gaps, "less"))
    if better[0] < alpha and better[1] < alpha:
        verdict = FAITHFUL
    elif (worse[0] < alpha or worse[1] < alpha) and not (better[0] < alpha or better[1] < alpha):
        verdict = WORSE
    else:
        verdict = NOT_BETTER

    def median(values: np.ndarray) -> float:
        return float(np.median(values)) if len(values) else float("nan")

    return FaithfulnessVerdict(verdict=verdict, n=len(rows), deletion=median(deletion),
                               random_deletion=median(random_deletion), insertion=median(insertion),
                               random_insertion=median(random_insertion), deletion_gap=median(deletion_gaps),
                               insertion_gap=median(insertion_gaps), p_deletion=better[0], p_insertion=better[1],
                               alpha=alpha, deletion_wins=int((deletion_gaps > 0).sum()),
                               insertion_wins=int((insertion_gaps > 0).sum()))


def sanity_verdict(sanity: dict[str, Any]) -> str:
    """``passes`` or ``fails``, with the rank correlation that decided it."""
    words = SANITY_PASSES if sanity.get("passed") else SANITY_FAILS
    return (f"sanity check {words}: after randomising the model, its maps' rank correlation with the trained "
            f"model's is {sanity.get('final_spearman', float('nan')):.2f} (threshold "
            f"{sanity.get('threshold', 0.5):g}; above it, the map shows the image rather than what the model "
            "learned)")



def agreement_verdict(images: list[dict[str, Any]], *, alpha: float = ALPHA) -> dict[str, Any]:
    """The words for maps against expert regions, from per-image ``energy_inside``, ``region_share`` and
    ``pointing_hit``: the verdict, the median paired gap, its p-value and a sentence."""
    empty = [i for i in images if i.get("empty")]
    images = [i for i in images if not i.get("empty")]  # an empty map points nowhere: neither in nor away
    inside = np.array([i["energy_inside"] for i in images], dtype=np.float64)
    chance = np.array([i["region_share"] for i in images], dtype=np.float64)
    gaps = inside - chance
    more, less = _one_sided(gaps, "greater"), _one_sided(gaps, "less")
    words = AGREES if more < alpha else (AWAY if less < alpha else CHANCE)
    decided = less if words == AWAY else more  # the p of the side the words are about
    n = len(images)
    median = float(np.median(gaps)) if n else float("nan")
    hits = float(np.mean([i["pointing_hit"] for i in images])) if n else float("nan")
    sentence = (f"{words} · energy inside the regions {float(np.mean(inside)) if n else float('nan'):.2f} vs "
                f"{float(np.mean(chance)) if n else float('nan'):.2f} by chance (median paired gap {median:+.2f}, "
                f"p={_p(decided)}), pointing game {hits:.2f}, {n} image{'s' if n != 1 else ''}")
    if empty:
        sentence += f" ({len(empty)} empty map{'s' if len(empty) != 1 else ''} left out)"
    if n < MIN_IMAGES:
        sentence += f": too few to tell (a paired test needs at least {MIN_IMAGES})"
    return {"verdict": words, "gap": median, "p": decided, "sentence": sentence, "empty_maps": len(empty)}


def consistency_verdict(agreeing: int, n: int, *, mirror: str, swapped: bool,
                        threshold: float = CONSISTENCY_THRESHOLD) -> dict[str, Any]:
    """``consistent`` / ``not consistent`` and a sentence, from how many of ``n`` images' mirror images
    (``mirror`` in words, e.g. "a left-right mirror") were predicted as expected; ``swapped``: whether the
    expectation is the swapped class (else the same class: mirror invariance)."""
    share = agreeing / n if n else float("nan")
    words = CONSISTENT if n and share >= threshold else NOT_CONSISTENT
    rule = "the swapped class" if swapped else "the same class (mirror-invariant)"
    sentence = (f"{words} · {agreeing} of {n} image{'s' if n != 1 else ''} ({share:.2f}) predicted as {rule} after "
                f"{mirror} (threshold {threshold:g})")
    if n < CONSISTENCY_MIN_IMAGES:
        sentence += f": few images (with under {CONSISTENCY_MIN_IMAGES}, one disagreement decides)"
    return {"verdict": words, "agreement": share, "sentence": sentence}
