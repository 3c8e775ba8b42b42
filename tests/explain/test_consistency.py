"""Mirror consistency (``trust --consistency``): predict(mirror(x)) == swap(predict(x)), on models whose
behaviour under a mirror is known by construction."""

import hashlib
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from handlens.cli.app import app
from handlens.core.errors import InputError
from handlens.explain.consistency import consistency_report, judge, mirror_consistency, parse_swap
from handlens.explain.verdicts import CONSISTENT, NOT_CONSISTENT
from handlens.train.run import train
from tests.conftest import tiny_config

CHIRAL = ["ccw", "cw"]
SWAP = {"cw": "ccw", "ccw": "cw"}


class HalfDifference(torch.nn.Module):
    """Logits (-s, s) with s = mean(one half) - mean(the other). Left minus right is exactly negated by a
    left-right mirror (an equivariant chirality model: cw <-> ccw); top minus bottom is unchanged by it (a
    model blind to the mirror)."""

    def __init__(self, halves: str) -> None:
        super().__init__()
        self.halves = halves

    def forward(self, x):
        half = x.shape[-1] // 2 if self.halves == "left-right" else x.shape[-2] // 2
        if self.halves == "left-right":
            s = x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3))
        else:
            s = x[..., :half, :].mean((1, 2, 3)) - x[..., half:, :].mean((1, 2, 3))
        return torch.stack([-s, s], dim=1)


def random_inputs(n=24, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_an_equivariant_model_is_consistent_with_its_swap_and_a_blind_one_is_not():
    inputs = random_inputs()
    equivariant = mirror_consistency(HalfDifference("left-right"), inputs, CHIRAL, swap=SWAP)
    assert equivariant.verdict == CONSISTENT and equivariant.agreement == 1.0 and equivariant.n == 24
    assert equivariant.disagreements == [] and equivariant.sentence.startswith("consistent · 24 of 24")
    blind = mirror_consistency(HalfDifference("top-bottom"), inputs, CHIRAL, swap=SWAP)
    assert blind.verdict == NOT_CONSISTENT and blind.agreement == 0.0 and len(blind.disagreements) == 24
    row = blind.disagreements[0]
    assert set(row) == {"image", "pred", "mirrored_pred", "expected"} and row["pred"] == row["mirrored_pred"]
    assert row["expected"] == SWAP[row["pred"]]


def test_without_a_swap_consistency_means_mirror_invariance():
    inputs = random_inputs()
    blind = mirror_consistency(HalfDifference("top-bottom"), inputs, CHIRAL, swap={})
    assert blind.verdict == CONSISTENT and "mirror-invariant" in blind.expects
    chiral = mirror_consistency(HalfDifference("left-right"), inputs, CHIRAL, swap={})
    assert chiral.verdict == NOT_CONSISTENT and chiral.agreement == 0.0
    # an up-down mirror: the left-right model is blind to it, the top-bottom one flips
    assert mirror_consistency(HalfDifference("left-right"), inputs, CHIRAL, swap={}, mirror="vflip").verdict \
        == CONSISTENT
    assert mirror_consistency(HalfDifference("top-bottom"), inputs, CHIRAL, swap=SWAP, mirror="vflip").verdict \
        == CONSISTENT


def test_the_threshold_is_95_percent_and_few_images_are_flagged():
    ok = judge([0] * 20, [1] + [0] * 19, CHIRAL, swap={}, mirror="hflip")
    assert ok.verdict == CONSISTENT and ok.agreement == 0.95 and "few images" not in ok.sentence
    low = judge([0] * 20, [1, 1] + [0] * 18, CHIRAL, swap={}, mirror="hflip")
    assert low.verdict == NOT_CONSISTENT and [d["image"] for d in low.disagreements] == ["0", "1"]
    few = judge([0] * 4, [0] * 4, CHIRAL, swap={}, mirror="hflip")
    assert few.verdict == CONSISTENT and "few images" in few.sentence
    with pytest.raises(InputError, match="no images"):
        judge([], [], CHIRAL, swap={}, mirror="hflip")
    with pytest.raises(InputError, match="--mirror 'rot90': choose hflip or vflip"):
        mirror_consistency(HalfDifference("top-bottom"), random_inputs(2), CHIRAL, swap={}, mirror="rot90")


def test_swap_pairs_are_checked_against_the_classes():
    assert parse_swap(["cw=ccw"], CHIRAL) == SWAP
    assert parse_swap(["a=b,c=d"], ["a", "b", "c", "d"]) == {"a": "b", "b": "a", "c": "d", "d": "c"}
    with pytest.raises(InputError, match=r"'cww' \(did you mean 'cw'\?\) is not a class of this model"):
        parse_swap(["cww=ccw"], CHIRAL)
    with pytest.raises(InputError, match="write two different classes as A=B"):
        parse_swap(["cw"], CHIRAL)
    with pytest.raises(InputError, match="already swapped"):
        parse_swap(["a=b", "b=c"], ["a", "b", "c"])


def rewrite_bundle(source, target, *, weights=None, augment=None):
    """A copy of a bundle with its weights changed by ``weights(state)`` and/or its recorded ``augment`` config
    replaced (the checksum kept right, as a bundle saved that way would have)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    manifest = json.loads((target / "bundle.json").read_text())
    if weights is not None:
        state = load_file(str(target / "weights.safetensors"))
        weights(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / "weights.safetensors"))
        manifest["weights_sha256"] = hashlib.sha256((target / "weights.safetensors").read_bytes()).hexdigest()
    if augment is not None:  # as a bundle of an older handlens, which recorded only the policy's name
        manifest["config"]["augment"] = augment
        manifest.pop("augment_policy", None)
    (target / "bundle.json").write_text(json.dumps(manifest))
    return target


def symmetric_kernels(state):
    """Every conv kernel made left-right symmetric: the CNN (convs, batch norm, ReLU, 2x2 max pools on even
    sizes, global pooling) is then exactly invariant to a left-right mirror."""
    for key, value in state.items():
        if value.dim() == 4:
            state[key] = (value + value.flip(-1)) / 2


def constant(index):
    """The head ignores the features and always says class ``index``: invariant to any mirror."""

    def change(state):
        state["head.0.weight"] = torch.zeros_like(state["head.0.weight"])
        bias = torch.zeros_like(state["head.0.bias"])
        bias[index] = 5.0
        state["head.0.bias"] = bias

    return change


@pytest.fixture
def bundles(trained_workspace, tmp_path):
    """A tiny colour model made exactly mirror-invariant, trained as usual first; and a policy file whose
    flips swap red and green."""
    trained = train(tiny_config(), trained_workspace).bundle
    policy = tmp_path / "swap.yaml"
    policy.write_text("name: swap\nsteps:\n  - {op: hflip, p: 0.5, labels: {red: green, green: red}}\n")
    return trained, policy


def test_a_mirror_invariant_bundle_is_consistent_without_a_map_and_judged_by_its_policy_map(
        trained_workspace, bundles, tmp_path):
    trained, policy = bundles
    images = sorted((tmp_path / "colours").rglob("*.png"))
    invariant = rewrite_bundle(trained, tmp_path / "invariant", weights=symmetric_kernels)
    report = consistency_report(invariant, images)
    assert report.verdict == CONSISTENT and report.n == 48 and not report.swap and report.agreement == 1.0
    assert report.swap_source == "policy 'basic' has no label map on hflip"  # the policy as the bundle records it
    # the same model, recorded as trained with a red<->green label map: every red or green prediction misses
    swapped = rewrite_bundle(trained, tmp_path / "swapped", weights=symmetric_kernels,
                             augment={"policy": str(policy)})
    report = consistency_report(swapped, images)
    assert report.swap == {"red": "green", "green": "red"} and "hflip step's labels" in report.swap_source
    missed = {d["image"] for d in report.disagreements}
    assert all(d["pred"] in ("red", "green") and d["expected"] == {"red": "green", "green": "red"}[d["pred"]]
               for d in report.disagreements)
    assert missed and report.agreeing == report.n - len(missed)  # it does predict red and green
    assert report.verdict == (CONSISTENT if report.agreement >= 0.95 else NOT_CONSISTENT)
    always_red = rewrite_bundle(trained, tmp_path / "red", weights=constant(load_classes(trained).index("red")),
                                augment={"policy": str(policy)})
    report = consistency_report(always_red, images)
    assert report.verdict == NOT_CONSISTENT and report.agreement == 0.0 and len(report.disagreements) == 48
    assert consistency_report(always_red, images, swap=["blue=green"]).verdict == CONSISTENT  # red stays red


def load_classes(bundle):
    return json.loads((bundle / "bundle.json").read_text())["classes"]


def test_trust_consistency_on_the_command_line(trained_workspace, bundles, tmp_path):
    trained, policy = bundles
    red = load_classes(trained).index("red")
    always_red = rewrite_bundle(trained, tmp_path / "red", weights=constant(red))
    recorded = rewrite_bundle(trained, tmp_path / "recorded", weights=constant(red), augment={"policy": str(policy)})
    folder = str(tmp_path / "colours" / "red")
    runner = CliRunner()

    def cli(bundle, *args):
        return runner.invoke(app, ["--workspace", str(trained_workspace.root), "trust", str(bundle), folder, *args])

    as_json = cli(always_red, "--consistency", "--swap", "red=green", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["verdict"] == NOT_CONSISTENT and data["n"] == 16 and data["agreement"] == 0.0
    assert data["swap"] == {"red": "green", "green": "red"} and data["swap_source"] == "--swap"
    assert data["disagreements"][0]["pred"] == "red" and data["disagreements"][0]["mirrored_pred"] == "red"
    assert data["sentence"].startswith("not consistent · 0 of 16")
    text = cli(recorded, "--consistency")  # the map the bundle's training policy records
    assert text.exit_code == 0 and "verdict: not consistent · 0 of 16" in text.stdout
    assert "mirrored pred" in text.stdout and "red_00.png" in text.stdout and "hflip step's labels" in text.stdout
    plain = cli(always_red, "--consistency")
    assert plain.exit_code == 0 and "verdict: consistent · 16 of 16" in plain.stdout
    assert "mirror-invariant" in plain.stdout
    typo = cli(always_red, "--consistency", "--swap", "red=gren")
    assert typo.exit_code == 2 and "did you mean 'green'" in typo.output
    alone = cli(always_red, "--swap", "red=green")
    assert alone.exit_code == 2 and "--swap and --mirror go with --consistency" in alone.output
