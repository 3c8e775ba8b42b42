"""Shortcut shares on constructed maps: energy in the border band, outside the ROI, on letterbox padding."""

import numpy as np
import pytest

from handlens.explain.shortcuts import (
    EMPTY_MAP,
    NO_SHORTCUT_SIGN,
    SHORTCUT_WARNING,
    border_band,
    energy_shares,
    input_content,
    model_input_shares,
    shares_summary,
)
from handlens.transforms.preprocess import Preprocess


def test_a_map_on_a_corner_mark_is_a_border_warning_and_a_central_one_is_not():
    corner = np.zeros((100, 100), dtype=np.float32)
    corner[92:98, 70:98] = 1.0  # a scale bar in the bottom-right corner
    shares = energy_shares(corner)
    assert shares.verdict == SHORTCUT_WARNING
    assert shares.border.energy > 0.5 and shares.border.flagged
    assert shares.border.area == pytest.approx(1 - 0.84 ** 2, abs=0.01)  # an 8 px band on each edge of 100
    assert "in the border band" in shares.sentence()
    centre = np.zeros((100, 100), dtype=np.float32)
    centre[30:70, 30:70] = 1.0
    assert energy_shares(centre).verdict == NO_SHORTCUT_SIGN
    assert energy_shares(centre).border.energy == 0.0


def test_an_evenly_spread_map_is_no_sign_anywhere():
    flat = np.random.default_rng(0).uniform(0.5, 1.0, (64, 64))
    roi = np.zeros((64, 64), dtype=bool)
    roi[:, :32] = True
    shares = energy_shares(flat, roi=roi)
    assert shares.verdict == NO_SHORTCUT_SIGN
    assert shares.outside_roi.energy == pytest.approx(shares.outside_roi.area, abs=0.05)


def test_energy_outside_the_roi_is_flagged_and_negative_evidence_does_not_count():
    heat = np.full((50, 50), -5.0, dtype=np.float32)  # against the class everywhere...
    heat[10:40, 35:45] = 1.0  # ...for it only off the specimen
    roi = np.zeros((50, 50), dtype=bool)
    roi[:, :30] = True
    shares = energy_shares(heat, roi=roi)
    assert shares.outside_roi.energy == 1.0 and shares.outside_roi.flagged
    assert shares.verdict == SHORTCUT_WARNING and "outside the specimen/ROI" in shares.warnings[0]


def test_a_flat_or_negative_map_is_an_empty_map():
    assert energy_shares(np.zeros((20, 20))).verdict == EMPTY_MAP
    assert energy_shares(-np.ones((20, 20))).sentence().startswith(EMPTY_MAP)


def test_letterbox_padding_is_measured_and_a_centre_crop_reports_what_it_never_saw():
    letterbox = Preprocess(size=100, resize="letterbox")
    content, unseen = input_content(200, 100, letterbox)  # a 2:1 image: bars above and below
    assert unseen == 0.0 and content[:25].sum() == 0 and content[25:75].all()
    heat = np.zeros((100, 100), dtype=np.float32)
    heat[:20, 40:60] = 1.0  # all on the top bar
    shares = model_input_shares(heat, width=200, height=100, preprocess=letterbox)
    assert shares.padding.energy == 1.0 and shares.padding.flagged
    assert shares.padding.area == pytest.approx(0.5, abs=0.01)
    crop = Preprocess(size=100, resize="shorter-crop")
    _, unseen = input_content(200, 100, crop)
    assert unseen == pytest.approx(0.5, abs=0.01)
    shares = model_input_shares(np.ones((100, 100)), width=200, height=100, preprocess=crop)
    assert shares.padding is None and "never seen" in shares.sentence()


def test_the_border_band_follows_the_image_inside_letterbox_padding():
    band = border_band(100, 100, box=(25, 0, 75, 100))
    assert not band[:25].any() and band[25:29].all() and not band[40, 10:90].any()


def test_a_summary_counts_flagged_maps():
    corner = np.zeros((40, 40))
    corner[:3, :3] = 1
    centre = np.zeros((40, 40))
    centre[15:25, 15:25] = 1
    summary = shares_summary([energy_shares(corner), energy_shares(centre), energy_shares(np.zeros((40, 40)))])
    assert summary["flagged"] == 1 and summary["empty"] == 1 and summary["maps"] == 3
    assert summary["verdict"] == f"{SHORTCUT_WARNING}: 1 of 2 maps"
    assert summary["border"]["maps"] == 2
