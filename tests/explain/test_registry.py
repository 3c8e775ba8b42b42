"""Explainer parameters (one pydantic model per method) and costs (model evaluations per image)."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.explain import EXPLAINERS, explain
from handlens.explain.registry import (
    ExplainBudget,
    ExplainCost,
    ExplainParams,
    OcclusionParams,
    ScoreCamParams,
    check_budget,
    occlusion_windows,
    parse_params,
)
from handlens.models.classifier import create_classifier

CLASSES = ["a", "b", "c"]

#: the defaults the methods used before they declared models (registry.py, cam.py, attribution.py)
OLD_DEFAULTS = {
    "gradcam": {"class_chunk": 256}, "gradcam++": {"class_chunk": 256}, "hirescam": {"class_chunk": 256},
    "xgradcam": {"class_chunk": 256}, "layercam": {"class_chunk": 256},
    "scorecam": {"max_channels": None, "batch_size": 64},
    "cam": {},
    "integrated_gradients": {"steps": 50, "baseline": "black", "memory_budget_mb": 500, "internal_batch": None},
    "saliency": {},
    "smoothgrad": {"samples": 20, "noise": 0.15},
    "gradient_shap": {"samples": 20},
    "occlusion": {"window": None, "stride": None, "batch_size": 64},  # None: from the input width, as 0 was
}

#: cheap settings per method, for tests that run every method
CHEAP = {"integrated_gradients": {"steps": 4, "internal_batch": 3}, "smoothgrad": {"samples": 3},
         "gradient_shap": {"samples": 3}, "occlusion": {"window": 8, "stride": 8}, "scorecam": {"max_channels": 4}}

#: the JSON Schema keywords pydantic may write for these models (plus our own "tuning" mark)
SCHEMA_WORDS = {"type", "title", "description", "default", "minimum", "maximum", "exclusiveMinimum",
                "exclusiveMaximum", "enum", "anyOf", "const", "tuning"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_classifier("tiny_cnn", 3).eval()


def test_a_typo_is_refused_with_the_allowed_names():
    with pytest.raises(InputError, match=r"unknown parameter 'stpes' for integrated_gradients \(did you mean "
                                         r"'steps'\?\); allowed: steps, baseline, memory_budget_mb, internal_batch"):
        parse_params("integrated_gradients", {"stpes": 2})
    with pytest.raises(InputError, match="allowed: window, stride, batch_size"):
        parse_params("occlusion", {"size": 8})
    with pytest.raises(InputError, match="unknown parameter 'steps': saliency takes no parameters"):
        parse_params("saliency", {"steps": 2})


def test_a_typo_in_a_library_call_raises_before_any_work(tiny):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(InputError, match="did you mean 'steps'"):
        explain(tiny, x, CLASSES, "integrated_gradients", stpes=2)  # silently 50 steps before
    with pytest.raises(InputError, match="did you mean 'samples'"):
        explain(tiny, x, CLASSES, "smoothgrad", params={"sample": 2})
    with pytest.raises(InputError, match="unknown parameter 'noise' for gradient_shap"):
        explain(tiny, x, CLASSES, "gradient_shap", noise=0.2)  # GradientSHAP has no noise knob


def test_params_as_a_dict_a_model_or_keywords_are_the_same(tiny):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    by_keyword = explain(tiny, x, CLASSES, "occlusion", window=8, stride=4)
    by_dict = explain(tiny, x, CLASSES, "occlusion", params={"window": 8, "stride": 4})
    by_model = explain(tiny, x, CLASSES, "occlusion", params=parse_params("occlusion", {"window": "8", "stride": 4}))
    np.testing.assert_array_equal(by_keyword.maps, by_dict.maps)
    np.testing.assert_array_equal(by_keyword.maps, by_model.maps)
    with pytest.raises(InputError, match="window given both"):
        explain(tiny, x, CLASSES, "occlusion", params={"window": 8}, window=4)
    with pytest.raises(InputError, match="occlusion takes OcclusionParams"):
        explain(tiny, x, CLASSES, "occlusion", params=ScoreCamParams())


def test_tuning_knobs_are_refused_where_tuning_is_off():
    assert parse_params("scorecam", {"batch_size": 8}).batch_size == 8  # a library call may tune memory
    with pytest.raises(InputError, match=r"unknown parameter 'batch_size' for scorecam; allowed: max_channels$"):
        parse_params("scorecam", {"batch_size": 8}, tuning=False)
    with pytest.raises(InputError, match="gradcam takes no parameters"):
        parse_params("gradcam", {"class_chunk": 8}, tuning=False)
    with pytest.raises(InputError, match="memory_budget_mb"):
        parse_params("integrated_gradients", parse_params("integrated_gradients", {"memory_budget_mb": 1e6}),
                     tuning=False)


@pytest.mark.parametrize(("method", "raw", "words"), [
    ("integrated_gradients", {"steps": 0}, "steps=0: Input should be greater than or equal to 1"),
    ("integrated_gradients", {"steps": 2.5}, "steps=2.5"),
    ("integrated_gradients", {"steps": True}, "give a number, not true/false"),
    ("integrated_gradients", {"baseline": "purple"}, "Input should be 'black', 'blur' or 'noise'"),
    ("integrated_gradients", {"memory_budget_mb": 0}, "memory_budget_mb=0"),
    ("smoothgrad", {"noise": 0}, "noise=0: Input should be greater than 0"),
    ("smoothgrad", {"noise": 1.5}, "noise=1.5: Input should be less than or equal to 1"),
    ("smoothgrad", {"noise": "lots"}, "noise='lots'"),
    ("gradient_shap", {"samples": -1}, "samples=-1"),
    ("scorecam", {"max_channels": 0}, "max_channels=0"),
    ("occlusion", {"window": 0}, "window=0"),
    ("occlusion", {"window": 8, "stride": 16}, "stride <= window"),
])
def test_bounds_are_enforced(method, raw, words):
    with pytest.raises(InputError) as error:
        parse_params(method, raw)
    assert words in str(error.value) and str(error.value).startswith(f"{method} parameters: ")


def test_the_description_tells_what_a_refused_value_means():
    with pytest.raises(InputError, match=r"\(points on the straight path from the baseline to the image\)"):
        parse_params("integrated_gradients", {"steps": -3})


def test_command_line_strings_are_coerced():
    ig = parse_params("integrated_gradients", {"steps": "32", "baseline": "blur"})
    assert ig.steps == 32 and isinstance(ig.steps, int) and ig.baseline == "blur"
    assert parse_params("smoothgrad", {"noise": "0.2", "samples": "5"}).noise == 0.2
    assert parse_params("occlusion", {"window": "8"}).window == 8
    with pytest.raises(InputError, match="steps='many'"):
        parse_params("integrated_gradients", {"steps": "many"})


def test_params_must_be_an_object():
    with pytest.raises(InputError, match="must be an object of name: value"):
        parse_params("integrated_gradients", ["steps", 3])  # type: ignore[arg-type]


def test_an_unknown_method_is_an_input_error_with_a_suggestion():
    with pytest.raises(InputError, match="unknown explanation method 'gradcamm' \\(did you mean 'gradcam'\\?\\)"):
        parse_params("gradcamm")


def test_defaults_are_the_ones_the_methods_used_before():
    assert sorted(OLD_DEFAULTS) == EXPLAINERS.names()
    for name, defaults in OLD_DEFAULTS.items():
        assert parse_params(name).model_dump() == defaults, name


def test_the_functions_defaults_agree_with_the_models():
    """A direct call of ``attribution.*`` or ``cam.*`` and a registry call use the same defaults."""
    from handlens.explain import attribution, cam

    functions = {"integrated_gradients": attribution.integrated_gradients, "smoothgrad": attribution.smoothgrad,
                 "gradient_shap": attribution.gradient_shap, "occlusion": attribution.occlusion,
                 "scorecam": cam.score_cam, "gradcam": cam.gradient_cam}
    for name, function in functions.items():
        signature = inspect.signature(function).parameters
        for field, value in parse_params(name).model_dump().items():
            assert signature[field].default == value, (name, field)


def test_occlusion_defaults_are_the_old_geometry(tiny):
    """Unset window/stride give what window=0/stride=0 gave: max(4, width // 8) and max(2, window // 2)."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    unset = explain(tiny, x, CLASSES, "occlusion")
    old = explain(tiny, x, CLASSES, "occlusion", window=4, stride=2)
    assert unset.params == {"window": 4, "stride": 2}
    np.testing.assert_array_equal(unset.maps, old.maps)
    assert occlusion_windows(OcclusionParams(), input_size=224) == 15 * 15  # window 28, stride 14


def test_occlusion_refuses_a_window_larger_than_the_input(tiny):
    with pytest.raises(InputError, match=r"window <= the input size \(32\)"):
        explain(tiny, torch.randn(1, 3, 32, 32), CLASSES, "occlusion", window=40)
    with pytest.raises(InputError, match="window <= the input size"):
        EXPLAINERS.get("occlusion").cost(OcclusionParams(window=300), input_size=224)


def _counting(model):
    """Images evaluated forward, and gradients taken through the model's output, per call."""
    counts = {"forward": 0, "backward": 0}

    def hook(_module, _inputs, output):
        counts["forward"] += output.shape[0]
        if output.requires_grad:
            output.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + grad.shape[0]))

    return counts, model.register_forward_hook(hook)


@pytest.mark.parametrize("name", EXPLAINERS.names())
def test_each_cost_is_the_model_evaluations_the_method_makes(tiny, name):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    counts, handle = _counting(tiny)
    try:
        params = parse_params(name, CHEAP.get(name, {}))
        explain(tiny, x, CLASSES, name, params=params)
    finally:
        handle.remove()
    cost = EXPLAINERS.get(name).cost(params, input_size=32)
    assert (counts["forward"] / 2, counts["backward"] / 2) == (cost.forward_passes, cost.backward_passes)


@pytest.mark.parametrize("raw", [{}, {"window": 7, "stride": 3}, {"window": 32, "stride": 5}])
def test_occlusion_cost_counts_windows_as_captum_does_on_any_shape(tiny, raw):
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    counts, handle = _counting(tiny)
    try:
        explain(tiny, x, CLASSES, "occlusion", **raw)
    finally:
        handle.remove()
    cost = EXPLAINERS.get("occlusion").cost(parse_params("occlusion", raw), input_size=(32, 48))
    assert counts["forward"] == cost.forward_passes


def test_cost_examples():
    cost = {name: EXPLAINERS.get(name).cost for name in EXPLAINERS.names()}
    assert cost["gradcam"](parse_params("gradcam"), input_size=224) == ExplainCost(1, 1)
    assert cost["cam"](parse_params("cam"), input_size=224) == ExplainCost(1, 0)
    ig = cost["integrated_gradients"](parse_params("integrated_gradients", {"steps": 32}), input_size=224)
    assert (ig.forward_passes, ig.backward_passes, ig.passes) == (35, 32, 67)
    assert cost["smoothgrad"](parse_params("smoothgrad", {"samples": 8}), input_size=224) == ExplainCost(9, 8)
    assert cost["occlusion"](parse_params("occlusion"), input_size=224) == ExplainCost(227, 0)
    assert cost["scorecam"](parse_params("scorecam", {"max_channels": 16}), input_size=224) == ExplainCost(17, 0)
    assert not cost["scorecam"](parse_params("scorecam"), input_size=224).bounded  # every channel: the model's


def test_every_method_declares_a_params_model_a_cost_and_a_schema():
    for name in EXPLAINERS.names():
        spec = EXPLAINERS.get(name)
        assert issubclass(spec.params, ExplainParams), name
        assert spec.params.model_config.get("extra") == "forbid", name
        cost = spec.cost(parse_params(name), input_size=224)
        assert isinstance(cost, ExplainCost) and cost.forward_passes >= 1 and cost.backward_passes >= 0, name
        for tuning in (True, False):
            schema = json.loads(json.dumps(spec.params_schema(tuning=tuning)))
            assert schema["type"] == "object" and schema["additionalProperties"] is False, name
            for field, about in schema["properties"].items():
                assert set(about) <= SCHEMA_WORDS, (name, field, set(about) - SCHEMA_WORDS)
                assert about.get("description"), (name, field)
                assert tuning or not about.get("tuning"), (name, field)
        assert spec.params.model_json_schema()["additionalProperties"] is False


def test_published_schemas_carry_the_bounds():
    steps = EXPLAINERS.get("integrated_gradients").params_schema()["properties"]["steps"]
    assert (steps["type"], steps["minimum"], steps["default"]) == ("integer", 1, 50)
    noise = EXPLAINERS.get("smoothgrad").params_schema(tuning=False)["properties"]["noise"]
    assert (noise["exclusiveMinimum"], noise["maximum"]) == (0, 1)
    assert list(EXPLAINERS.get("scorecam").params_schema(tuning=False)["properties"]) == ["max_channels"]


def test_check_budget_refuses_naming_the_limit():
    budget = ExplainBudget(forward_passes=4096, backward_passes=128)
    with pytest.raises(InputError, match=r"integrated_gradients with steps=129, baseline=black needs about 129 "
                                         r"backward passes per image, over the limit of 128; ask for fewer steps"):
        check_budget("integrated_gradients", {"steps": 129}, input_size=224, budget=budget)
    assert check_budget("integrated_gradients", {"steps": 128}, input_size=224, budget=budget).steps == 128
    with pytest.raises(InputError, match="over the limit of 4096; use a larger window or stride"):
        check_budget("occlusion", {"window": 4, "stride": 2}, input_size=224, budget=budget)
    with pytest.raises(InputError, match="passes in all per image, over the limit of 10"):
        check_budget("smoothgrad", {"samples": 5}, input_size=224, budget=ExplainBudget(passes=10))
    assert check_budget("gradcam", None, input_size=224, budget=budget) == parse_params("gradcam")


def test_check_budget_bounds_what_the_model_would_decide():
    budget = ExplainBudget(forward_passes=513)
    assert check_budget("scorecam", {}, input_size=224, budget=budget).max_channels == 512
    assert check_budget("scorecam", {"max_channels": 8}, input_size=224, budget=budget).max_channels == 8
    with pytest.raises(InputError, match="ask for fewer max_channels"):
        check_budget("scorecam", {"max_channels": 600}, input_size=224, budget=budget)
    assert check_budget("scorecam", {}, input_size=224, budget=ExplainBudget()).max_channels is None


def test_check_budget_refuses_tuning_unless_asked():
    with pytest.raises(InputError, match="unknown parameter 'internal_batch'"):
        check_budget("integrated_gradients", {"internal_batch": 4}, input_size=224, budget=ExplainBudget())
    assert check_budget("integrated_gradients", {"internal_batch": 4}, input_size=224, budget=ExplainBudget(),
                        tuning=True).internal_batch == 4


def test_the_registry_imports_no_torch():
    code = ("import sys, handlens.explain.registry as r; r.parse_params('occlusion', {'window': '8'}); "
            "r.EXPLAINERS.get('scorecam').params_schema(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_write_explanations_checks_params_before_writing(tmp_path):
    from handlens.explain.output import write_explanations

    out = tmp_path / "maps"
    with pytest.raises(InputError, match="did you mean 'steps'"):
        write_explanations(object(), ["a.png"], out, "integrated_gradients", layer=None, target="pred",
                           params={"stpes": 2})
    assert not out.exists()


def test_tiled_explain_checks_params_before_reading_the_image():
    from handlens.explain.tiles import tiled_explain

    with pytest.raises(InputError, match="did you mean 'window'"):
        tiled_explain(object(), "no-such-image.png", method="occlusion", windw=8)
    with pytest.raises(InputError, match="did you mean 'stride'"):
        tiled_explain(object(), "no-such-image.png", method="occlusion", params={"strid": 8})
