"""``Bundle.predict(..., runtime="onnx")``: the onnx runtime plugs into the bundle through an entry point."""

from __future__ import annotations

import numpy as np
import pytest

from handlens.core.errors import InputError
from handlens.models.bundle import load_bundle
from tests.conftest import colour_tree
from tests.export.test_onnx import save_tiny


def test_bundle_predict_on_onnxruntime_matches_torch(tmp_path):
    from handlens.export.runtime import OnnxPredictor

    bundle = load_bundle(save_tiny(tmp_path / "ws" / "runs" / "run-1" / "bundle"))
    (tmp_path / "ws" / "cache").mkdir()
    files = sorted(str(p) for p in colour_tree(tmp_path / "images", per_class=2, size=40).rglob("*.png"))
    torch_probs = bundle.predict_proba(files)
    onnx_probs = bundle.predict_proba(files, runtime="onnx")
    assert np.abs(onnx_probs - torch_probs).max() < 1e-5
    assert isinstance(bundle.runtime("onnx"), OnnxPredictor) and bundle.runtime("onnx") is bundle.runtime("onnx")
    assert [p.top[0][0] for p in bundle.predict(files, runtime="onnx")] == [p.top[0][0] for p in bundle.predict(files)]
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'; choose torch or onnx"):
        bundle.predict(files, runtime="tensorrt")
