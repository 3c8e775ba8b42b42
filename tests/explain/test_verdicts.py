"""Verdicts in words on constructed curves: faithful, not better or worse than random; sanity; learning."""

import numpy as np
import pytest

from handlens.explain.verdicts import (
    FAITHFUL,
    NOT_BETTER,
    WORSE,
    faithfulness_verdict,
    image_verdict,
    sanity_verdict,
)
from handlens.train.sanity import DOES_NOT_LEARN, LEARNS, history_verdict, learning_verdict


def rows(deletion, insertion, random_deletion, random_insertion):
    return [{"deletion_auc": d, "insertion_auc": i, "random_deletion_auc": rd, "random_insertion_auc": ri}
            for d, i, rd, ri in zip(deletion, insertion, random_deletion, random_insertion, strict=True)]


def noisy(centre, n=20, seed=0, spread=0.02):
    return list(centre + np.random.default_rng(seed).normal(0, spread, n))


def test_a_map_better_than_random_on_both_curves_is_faithful():
    verdict = faithfulness_verdict(rows(noisy(0.2), noisy(0.8, seed=1), noisy(0.45, seed=2), noisy(0.5, seed=3)))
    assert verdict.verdict == FAITHFUL and verdict.p_deletion < 0.001 and verdict.p_insertion < 0.001
    assert verdict.deletion_gap == pytest.approx(0.25, abs=0.03)
    assert verdict.insertion_gap == pytest.approx(0.3, abs=0.03)
    assert verdict.sentence().startswith("faithful · deletion beats random on 20 of 20 images (median paired gap "
                                         "+0.25, p=<0.001), insertion on 20 of 20 (+0.30")


def test_a_map_as_good_as_random_is_not_better_than_random():
    # the flowers case: deletion 0.360 vs random 0.353, with noise around both
    same = faithfulness_verdict(rows(noisy(0.36, seed=4, spread=0.05), noisy(0.6, seed=5, spread=0.05),
                                     noisy(0.353, seed=6, spread=0.05), noisy(0.6, seed=7, spread=0.05)))
    assert same.verdict == NOT_BETTER
    mixed = faithfulness_verdict(rows(noisy(0.2), noisy(0.4, seed=1), noisy(0.45, seed=2), noisy(0.6, seed=3)))
    assert mixed.verdict == NOT_BETTER  # better on deletion, worse on insertion: not faithful


def test_a_map_worse_than_random_says_so():
    # the lithology case: insertion 0.286 against 0.935 for random
    verdict = faithfulness_verdict(rows(noisy(0.45), noisy(0.286, seed=1), noisy(0.45, seed=2), noisy(0.935, seed=3)))
    assert verdict.verdict == WORSE and "worse than random" in verdict.sentence()


def test_too_few_images_cannot_be_faithful_and_say_why():
    verdict = faithfulness_verdict(rows([0.1] * 3, [0.9] * 3, [0.5] * 3, [0.5] * 3))
    assert verdict.verdict == NOT_BETTER and "too few to tell" in verdict.sentence()
    five = faithfulness_verdict(rows([0.1] * 5, [0.9] * 5, [0.5, 0.51, 0.52, 0.53, 0.54], [0.5] * 5))
    assert five.verdict == FAITHFUL  # five images all better: p = 1/32
    assert faithfulness_verdict([]).verdict == NOT_BETTER


def test_per_image_verdicts():
    better, worse, mixed = rows([0.1, 0.6, 0.1], [0.9, 0.2, 0.2], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert (image_verdict(better), image_verdict(worse), image_verdict(mixed)) == (FAITHFUL, WORSE, NOT_BETTER)


def test_sanity_and_learning_verdicts():
    assert sanity_verdict({"passed": True, "final_spearman": 0.1, "threshold": 0.5}).startswith("sanity check passes")
    assert sanity_verdict({"passed": False, "final_spearman": 0.9, "threshold": 0.5}).startswith("sanity check fails")
    assert learning_verdict(1.1, 0.05) == f"{LEARNS}: train loss fell from 1.100 to 0.050"
    assert learning_verdict(1.1, 0.9).startswith(DOES_NOT_LEARN)
    assert learning_verdict(float("nan"), 0.1).startswith(DOES_NOT_LEARN)
    assert history_verdict([{"train_loss": 1.0}, {"train_loss": 0.2}]).startswith(LEARNS)
    assert history_verdict([]).startswith(DOES_NOT_LEARN)


def test_the_sentence_tells_the_paired_comparison_not_column_medians():
    """As on lithology: the maps beat the random ones on half the images, by as much as they lost on the other
    half: the words count the pairs and give the median paired gap, which the verdict is decided on."""
    random_deletion = np.linspace(0.2, 0.9, 24)
    deletion = random_deletion + np.tile([-0.05, 0.05], 12)  # 12 wins, 12 losses of the same size
    verdict = faithfulness_verdict(rows(deletion, noisy(0.6, n=24), random_deletion, noisy(0.6, n=24, seed=2)))
    assert verdict.verdict == NOT_BETTER and verdict.deletion_wins == 12
    assert "deletion beats random on 12 of 24 images (median paired gap +0.00" in verdict.sentence()


def test_agreement_is_judged_against_the_regions_share_by_chance():
    from handlens.explain.verdicts import AGREES, AWAY, CHANCE, agreement_verdict

    def images(inside, share=0.3, n=20):
        rng = np.random.default_rng(1)
        return [{"energy_inside": float(inside + rng.normal(0, 0.02)), "region_share": share, "pointing_hit": True}
                for _ in range(n)]

    assert agreement_verdict(images(0.7))["verdict"] == AGREES
    assert agreement_verdict(images(0.1))["verdict"] == AWAY
    assert agreement_verdict(images(0.3))["verdict"] == CHANCE
    few = agreement_verdict(images(0.9, n=3))
    assert few["verdict"] == CHANCE and "too few to tell" in few["sentence"]
    assert agreement_verdict(images(0.7))["sentence"].startswith("agrees with the experts · energy inside the regions")
