"""Can a method's maps be trusted? Faithfulness beside a random map and the randomisation sanity check.

``trust_report`` measures on what the model sees: whole images resized to its input, or for a
patch-trained model the grid patches of each image at its patch scale. With a ROI (``threshold``: the
model's own threshold rule, else Otsu; ``annotations``: the expert regions in the catalog) the
deletion/insertion curves only move specimen pixels, so a map is not rewarded for the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError
from handlens.core.workspace import Workspace
from handlens.explain.shortcuts import shares_summary
from handlens.explain.verdicts import (
    SANITY_FAILS,
    SANITY_PASSES,
    FaithfulnessVerdict,
    faithfulness_verdict,
    image_verdict,
    sanity_verdict,
)

#: where ROI masks for the trust check come from
ROI_SOURCES = ("none", "threshold", "annotations")


@dataclass(frozen=True)
class TrustReport:
    """What ``handlens trust`` prints: the faithfulness curves' AUCs and the sanity check, and what they were
    measured on (``images`` expanded from folders; ``n_inputs`` model inputs: images or grid patches)."""

    method: str
    layer: str | None
    images: list[str]
    patch_trained: bool
    n_inputs: int
    faithfulness: dict[str, Any]
    sanity: dict[str, Any]
    verdict: FaithfulnessVerdict | None = None  # over the inputs, by a paired test against the random map
    sanity_verdict: str = ""
    shortcuts: dict[str, Any] | None = None  # explain.shortcuts.shares_summary over the maps (whole images)

    @property
    def inputs(self) -> str:
        return "grid patches" if self.patch_trained else "whole images"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "images": self.images, "inputs": self.inputs,
                "n_inputs": self.n_inputs, "verdict": self.verdict.to_dict() if self.verdict else None,
                "sanity_verdict": self.sanity_verdict, "shortcuts": self.shortcuts,
                "faithfulness": self.faithfulness, "sanity": self.sanity}


def trust_report(bundle_path: str | Path, images: Sequence[str | Path], *, workspace: Workspace,
                 method: str = "gradcam", layer: str | None = None, baseline: str = "blur", steps: int = 20,
                 sanity_steps: int | None = None, roi: str = "none") -> TrustReport:
    """Deletion/insertion AUCs of ``method``'s maps (for the predicted class) beside a random map's, and the
    cascading parameter-randomisation check, on ``images`` (files or folders) with the bundle at
    ``bundle_path``. ``roi`` (none, threshold, annotations) restricts the curves to the specimen; expert
    regions are read from ``workspace``'s catalog."""
    from handlens.explain.api import explain, load_bundle
    from handlens.explain.metrics import deletion_insertion, parameter_randomisation
    from handlens.models.bundle import iter_images

    loaded = load_bundle(bundle_path)
    files = iter_images(images)
    if loaded.patch_trained:
        inputs, rois = patch_inputs_and_rois(loaded, files, roi=roi, workspace=workspace)
    else:
        inputs, rois = loaded.transform_many(files), input_rois(loaded.preprocess, files, roi=roi,
                                                                  workspace=workspace)
    mean, std = loaded.preprocess.affine()
    result = explain(loaded.module, inputs, loaded.classes, method, layer=layer, target="pred", mean=mean, std=std)
    maps = result.maps if result.maps.ndim == 3 else result.maps[:, 0]
    faithfulness = deletion_insertion(loaded.module, inputs, maps, result.targets, baseline=baseline, steps=steps,
                                      rois=rois)
    sanity = parameter_randomisation(loaded.module, inputs, loaded.classes, method, layer=layer, max_steps=sanity_steps,
                                     mean=mean, std=std)
    shares = map_shares(loaded, files, maps, rois)
    for row, share in zip(faithfulness["images"], shares or [None] * len(maps), strict=True):
        row["verdict"] = image_verdict(row)
        if share is not None:
            row["shortcuts"] = share.to_dict()
    sanity["verdict"] = SANITY_PASSES if sanity["passed"] else SANITY_FAILS
    return TrustReport(method=method, layer=result.layer, images=files, patch_trained=loaded.patch_trained,
                       n_inputs=len(inputs), faithfulness=faithfulness, sanity=sanity,
                       verdict=faithfulness_verdict(faithfulness["images"]), sanity_verdict=sanity_verdict(sanity),
                       shortcuts=shares_summary(shares) if shares else None)


def map_shares(bundle: Any, files: list[str], maps: np.ndarray, rois: np.ndarray | None) -> list[Any] | None:
    """Where each whole-image map's energy sits (:mod:`handlens.explain.shortcuts`), on the model input with its
    ROI; None for a patch-trained model, whose grid patches have no image border of their own (``explain``
    and the viewer measure its stitched map over the whole image)."""
    from PIL import Image

    from handlens.data.imaging import exif_orientation
    from handlens.explain.shortcuts import model_input_shares

    if bundle.patch_trained:
        return None
    out = []
    for i, f in enumerate(files):
        with Image.open(f) as header:  # the size as shown (upright), from the header: no second decode
            width, height = header.size
            if exif_orientation(header) in (5, 6, 7, 8):
                width, height = height, width
        out.append(model_input_shares(maps[i], width=width, height=height, preprocess=bundle.preprocess,
                                      roi=None if rois is None else rois[i]))
    return out


def input_rois(preprocess: Any, files: list[str], *, roi: str, workspace: Workspace) -> np.ndarray | None:
    """ROI masks (N, S, S) on the model input grid for ``files`` (None for ``roi="none"``)."""
    from handlens.transforms.preprocess import preprocess_image
    from handlens.transforms.roi import mask_for_input, threshold_roi

    rule = _roi_rule(preprocess, roi)
    if roi == "none":
        return None
    if roi == "threshold":
        return np.stack([threshold_roi(preprocess_image(f, preprocess), rule) for f in files])
    return np.stack([mask_for_input(mask, preprocess.size, preprocess.resize)
                     for mask in expert_masks(workspace, files)])


def patch_inputs_and_rois(bundle: Any, files: list[str], *, roi: str,
                          workspace: Workspace) -> tuple[Any, np.ndarray | None]:
    """A patch-trained model's normalised grid patches of ``files`` (cut from their working images, as it
    predicts) and their ROI masks (None for ``roi="none"``)."""
    from handlens.transforms.preprocess import decode_working
    from handlens.transforms.roi import resize_mask, threshold_roi

    preprocess = bundle.preprocess
    rule = _roi_rule(preprocess, roi)
    working = [decode_working(f, preprocess.working_side, preprocess.morphology) for f in files]
    patches, owners, boxes = bundle.grid_patches(working)
    inputs = preprocess.normalize_batch(patches)
    if roi == "none":
        return inputs, None
    if roi == "threshold":
        # on the whole working image, as training does: Otsu on one patch would split even an all-specimen patch
        masks = [threshold_roi(image, rule) for image in working]
    else:
        masks = [resize_mask(mask, image.shape[0], image.shape[1])
                 for mask, image in zip(expert_masks(workspace, files), working, strict=True)]
    size = preprocess.size
    return inputs, np.stack([resize_mask(masks[owner][top:top + side, left:left + side], size, size)
                             for owner, (top, left, side) in zip(owners, boxes, strict=True)])


def expert_masks(workspace: Workspace, files: list[str]) -> list[np.ndarray]:
    """Each file's expert regions as a mask at the image's resolution (an error names a file without any)."""
    from sqlalchemy import select

    from handlens.data.annotations import annotated_images_by_id, region_mask
    from handlens.data.catalog import Image, open_catalog

    catalog = open_catalog(workspace.db_url)
    masks = []
    try:
        with catalog.session() as session:
            for f in files:
                row = session.scalars(select(Image).where(Image.path == str(Path(f).resolve()))).first()
                found = annotated_images_by_id(session, [row.id]).get(row.id) if row is not None else None
                if not found:
                    raise InputError(f"{f} has no expert region in the catalog; import regions with "
                                     "`handlens annotate import` or use --roi threshold")
                masks.append(region_mask(found, int(row.width), int(row.height)))
    finally:
        catalog.close()
    return masks


def _roi_rule(preprocess: Any, source: str) -> Any:
    """The threshold rule ``roi="threshold"`` uses: the model's own, else Otsu (``source`` is checked)."""
    from handlens.transforms.roi import RoiRule

    if source not in ROI_SOURCES:
        raise InputError(f"--roi {source!r}: choose none, threshold or annotations")
    rule = RoiRule.from_dict((preprocess.patches or {}).get("roi"))
    return rule if rule.source == "threshold" else RoiRule(source="threshold")
