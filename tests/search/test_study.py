"""Studies end to end on tiny synthetic data: honest CV, shared features, refit, resume, workers, ensembles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from handlens.core.errors import ConflictError, HandlensError, InputError
from handlens.data.catalog import open_catalog
from handlens.search.study import StudyConfig, open_storage, run_study, show_study
from handlens.train.data import load_split_data
from handlens.train.head import C_GRID

FROZEN = {"model.backbone": "tiny_cnn", "model.weights": "none", "model.freeze": "frozen", "train.epochs": 3,
          "train.batch_size": 8}


def write_space(path: Path, space: dict, fixed: dict | None = None) -> str:
    base = {key: value for key, value in FROZEN.items() if key not in space}  # a searched key is not fixed
    path.write_text(json.dumps({"space": space, "fixed": {**base, **(fixed or {})}}))  # JSON is YAML
    return str(path)


def study_cfg(tmp_path: Path, space: dict, *, fixed: dict | None = None, **kwargs) -> StudyConfig:
    values = {"dataset": "colours", "space": write_space(tmp_path / "space.yaml", space, fixed), "cv": 3,
              "tracking": "none", "name": "s1", **kwargs}
    return StudyConfig(**values)


def split_ids(ws) -> dict[str, set[int]]:
    catalog = open_catalog(ws.db_url)
    try:
        data = load_split_data(catalog, "colours")
    finally:
        catalog.close()
    return {name: set(s.ids) for name, s in data.subsets.items()}


def stored(ws, name: str = "s1"):
    return optuna.load_study(study_name=name, storage=open_storage(ws.db_url))


def test_frozen_grid_study_shares_features_refits_on_train_val_and_never_sees_test(trained_workspace, tmp_path,
                                                                                     capsys):
    from handlens.models.bundle import load_bundle
    from handlens.train import features

    ws = trained_workspace
    before = features.FEATURE_IMAGES
    cfg = study_cfg(tmp_path, {"model.head": ["logistic", "linear"], "train.lr": [0.01, 0.003]}, sampler="grid")
    result = run_study(cfg, ws)
    assert "epoch 1/" not in capsys.readouterr().err  # the refit of a head on features prints no epoch lines
    assert [t.status for t in result.trials] == ["complete"] * 4
    assert all(t.folds == 3 and t.cv_mean is not None for t in result.trials)
    # a logistic head ignores train.lr: its second lr is the same model, scored once
    logistic = [t for t in result.trials if t.params["model.head"] == "logistic"]
    assert logistic[1].note == f"same as trial {logistic[0].number}" and logistic[1].cv_mean == logistic[0].cv_mean
    # its C is chosen on the study's folds (no nested search per fold); the folds are scored at that C
    chosen = logistic[0].refit_set["model.logistic_c"]
    assert chosen in C_GRID and logistic[0].note == f"C={chosen:g} chosen on the folds"
    assert logistic[1].refit_set == logistic[0].refit_set
    # each pool image went through the backbone once for 4 trials x 3 folds, and the refit reused the rows
    ids = split_ids(ws)
    assert result.feature_passes == 1
    assert features.FEATURE_IMAGES - before == len(ids["train"] | ids["val"])
    folds = stored(ws).user_attrs["folds"]
    assert len(folds) == 3
    for _, _, train_ids, val_ids in folds:
        assert not (set(train_ids) | set(val_ids)) & ids["test"]
        assert set(train_ids) | set(val_ids) == ids["train"] | ids["val"]
    bundle = load_bundle(result.bundle)
    membership = bundle.manifest["split_membership"]
    assert set(membership["train"]) == ids["train"] | ids["val"]
    assert not set(membership.get("test", [])) - ids["test"] and not set(membership.get("val", []))
    study = bundle.manifest["study"]
    assert study["refitted"] is True and study["name"] == "s1" and study["trial"] == result.winner.number
    assert study["images_seen"] == len(ids["train"] | ids["val"]) and study["cv"] == 3
    assert study["cv_mean"] == pytest.approx(result.winner.cv_mean)
    assert result.winner.cv_mean == max(t.cv_mean for t in result.trials)
    assert "winner trial" in result.verdict
    shown = show_study("s1", ws)
    assert [t.number for t in shown.trials] == [0, 1, 2, 3] and shown.bundle == result.bundle


def test_a_second_study_on_one_workspace_reads_its_features_without_decoding_or_a_backbone(trained_workspace,
                                                                                            tmp_path, monkeypatch):
    from handlens.search.trial import PoolFeatures
    from handlens.train import features

    ws = trained_workspace
    space = {"model.head": ["linear"], "train.lr": [0.01]}
    first = run_study(study_cfg(tmp_path, space, sampler="grid"), ws)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded the pool although its features are stored")

    monkeypatch.setattr(PoolFeatures, "_images_for", no_decode)
    images = features.FEATURE_IMAGES
    second = run_study(study_cfg(tmp_path, space, sampler="grid", name="s2"), ws)
    assert images == features.FEATURE_IMAGES and second.feature_passes == 1  # loaded, not computed
    assert second.trials[0].cv_mean == pytest.approx(first.trials[0].cv_mean)  # the same rows, the same score


def test_existing_name_refused_and_resume_keeps_trials(trained_workspace, tmp_path):
    ws = trained_workspace
    space = {"train.lr": {"float": [1e-3, 1e-1], "log": True}}
    first = run_study(study_cfg(tmp_path, space, fixed={"model.head": "linear"}, sampler="random", trials=2), ws)
    values = {t.number: t.cv_mean for t in first.trials}
    with pytest.raises(ConflictError, match="--resume s1"):
        run_study(study_cfg(tmp_path, space, sampler="random", trials=2), ws)
    # a killed process leaves a RUNNING trial behind: resume marks it failed and keeps the others
    study = stored(ws)
    ghost = study.ask()
    study._storage.set_trial_user_attr(ghost._trial_id, "worker", f"{os.uname().nodename}:999999")
    resumed = run_study(StudyConfig(name="s1", resume=True, trials=4, tracking="none"), ws)
    by_number = {t.number: t for t in resumed.trials}
    assert {n: by_number[n].cv_mean for n in values} == values
    assert by_number[ghost.number].status == "failed" and "interrupted" in by_number[ghost.number].note
    assert sum(t.status == "complete" for t in resumed.trials) >= 3


def test_all_trials_failing_ends_with_the_first_error(trained_workspace, tmp_path):
    cfg = study_cfg(tmp_path, {"train.lr": [0.01, 0.02]}, fixed={"model.weights": str(tmp_path / "none.pth")},
                    sampler="grid")
    with pytest.raises(HandlensError, match=r"every trial failed; the first \(trial 0\).*none\.pth"):
        run_study(cfg, trained_workspace)


def test_cv_larger_than_the_smallest_class_is_refused_before_any_trial(trained_workspace, tmp_path):
    with pytest.raises(InputError, match=r"class '\w+' has only \d+ images"):
        run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, cv=50), trained_workspace)


def test_two_workers_on_one_grid_study_never_run_a_point_twice(trained_workspace, tmp_path):
    ws = trained_workspace
    grid = {"train.weight_decay": [0.0, 0.01], "train.lr": [0.03, 0.01, 0.003]}
    # trials of a few seconds, so that the second process (spawned: it imports torch first) gets its share
    result = run_study(study_cfg(tmp_path, grid, fixed={"model.head": "linear", "train.epochs": 150},
                                 sampler="grid", workers=2, pruner="none"), ws)
    ran = [t for t in result.trials if t.status in ("complete", "pruned") and not t.note.startswith("same as")]
    points = [tuple(sorted(t.params.items())) for t in ran]
    assert len(points) == len(set(points)) == 6
    workers = {t.user_attrs.get("worker") for t in stored(ws).get_trials() if t.state.name in ("COMPLETE", "PRUNED")}
    assert len(workers) == 2  # both processes took trials, and no point twice


def test_ensemble_bundle_loads_and_averages_its_members(trained_workspace, tmp_path, capsys):
    from handlens.models.bundle import load_bundle

    cfg = study_cfg(tmp_path, {"train.lr": [0.03, 0.01, 0.003]}, fixed={"model.head": "linear"}, sampler="grid",
                    ensemble=2)
    result = run_study(cfg, trained_workspace)
    assert len(result.members) == 2 and result.members[0] == result.winner.number
    bundle = load_bundle(result.bundle)
    members = [load_bundle(m["bundle"]) for m in bundle.manifest["ensemble"]["members"]]
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    probs = bundle.predict_proba([image])
    expected = np.mean([m.predict_proba([image]) for m in members], axis=0)
    assert np.allclose(probs, expected, atol=1e-5)
    assert bundle.predict([image])[0].top[0][0] in bundle.classes
    assert bundle.layer("stage3") is bundle.module.members[0].layer("stage3")
    # explanations work on it: a CAM at the winner's layer, saliency through every member
    import handlens

    explainable = handlens.load_bundle(result.bundle)
    for method in ("gradcam", "saliency"):
        explanation = explainable.explain([image], method=method)
        maps = np.asarray(explanation.maps)
        assert maps.shape[-2:] == (32, 32) and np.isfinite(maps).all() and maps.max() > 0
    # a resume may refit otherwise: show and list then describe that refit, not the first one
    from handlens.search.records import list_studies, show_study

    again = run_study(StudyConfig(name="s1", resume=True, ensemble=1, one_se=True, tracking="none"), trained_workspace)
    assert again.members == [again.winner.number]
    assert "study s1: nothing left to run (3 trial(s) finished" in capsys.readouterr().err
    (listed,) = list_studies(trained_workspace)
    assert (listed["ensemble"], listed["one_se"]) == (1, True)
    assert "--one-se" in show_study("s1", trained_workspace).verdict


def test_fine_tuning_trials_train_a_run_per_fold_and_drop_fold_weights(trained_workspace, tmp_path):
    ws = trained_workspace
    cfg = study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.freeze": "full", "train.epochs": 1}, cv=2,
                    sampler="grid")
    result = run_study(cfg, ws)
    trial = stored(ws).trials[0]
    fold_runs = trial.user_attrs["fold_runs"]
    assert len(fold_runs) == 2 and trial.user_attrs["kind"] == "train"
    for run_id in fold_runs:
        assert (ws.runs_dir / run_id / "metrics.json").is_file()
        assert not (ws.runs_dir / run_id / "bundle").exists()
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    # the refit has no validation images: it keeps its last epoch, the one the folds chose
    assert manifest["metrics"]["best_epoch"] == manifest["study"]["refit_epochs"] == result.refit["epochs"]


def test_two_study_work_processes_share_one_grid_study_on_postgresql(tmp_path, postgres_url):
    """Two `handlens study work` processes on a PostgreSQL catalog split the grid between them."""
    import subprocess
    import sys

    from handlens.core.workspace import Workspace
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split
    from handlens.search.study import create_study
    from tests.conftest import colour_tree

    ws = Workspace.open(tmp_path / "ws", db_url=postgres_url)
    catalog = open_catalog(ws.db_url)
    import_path(catalog, colour_tree(tmp_path / "colours"), "colours", workers=1)
    make_split(catalog, "colours", ratios="0.5,0.25,0.25", seed=0)
    catalog.close()
    grid = {"train.weight_decay": [0.0, 0.01], "train.lr": [0.03, 0.01, 0.003]}
    create_study(study_cfg(tmp_path, grid, fixed={"model.head": "linear"}, sampler="grid", name="team"), ws)
    command = [sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "--db", postgres_url,
               "study", "work", "team"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = stored(ws, "team").get_trials()
    # a worker that finds the grid taken records one "grid is done" trial (pruned, no parameters): not a point
    ran = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and not t.user_attrs.get("skipped")]
    points = [tuple(sorted(t.params.items())) for t in ran]
    assert len(points) == len(set(points)) == 6
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    result = run_study(StudyConfig(name="team", resume=True, tracking="none"), ws)
    assert result.bundle is not None and (result.bundle / "bundle.json").is_file()


def test_one_standard_error_rule_picks_the_cheaper_config_near_the_best():
    from handlens.search.records import verdict
    from handlens.search.study import TrialRow, choose

    def row(number, mean, std, *, freeze, seconds):
        return TrialRow(number, "complete", {"model.freeze": freeze}, mean, std, 5, 3, seconds, None, "frozen")

    rows = [row(0, 0.90, 0.05, freeze="full", seconds=900.0), row(1, 0.88, 0.04, freeze="frozen", seconds=10.0),
            row(2, 0.80, 0.01, freeze="frozen", seconds=5.0)]
    assert choose(rows).number == 0
    assert choose(rows, one_se=True).number == 1  # within 0.05/sqrt(5) = 0.022 of the best, and frozen
    assert verdict(choose(rows, one_se=True), rows, one_se=True) == (
        "winner trial 1: CV 0.880 ± 0.040, the cheapest configuration within one standard error (0.022) of the "
        "best, trial 0 (0.900; --one-se)")
    rows[1] = row(1, 0.85, 0.04, freeze="frozen", seconds=10.0)
    assert choose(rows, one_se=True).number == 0  # 0.05 below: outside one standard error
    assert verdict(rows[0], rows, one_se=True).endswith(
        "; --one-se kept it: no cheaper configuration is within one standard error (0.022)")
    assert "--one-se" not in verdict(rows[0], rows)


def test_killed_study_run_resumes_with_its_finished_trials(trained_workspace, tmp_path):
    """SIGKILL of a real `handlens study run`: finished trials are kept, the running one is marked failed."""
    import signal
    import subprocess
    import sys
    import time

    ws = trained_workspace
    space = write_space(tmp_path / "space.yaml", {"train.lr": {"float": [1e-3, 1e-1], "log": True}},
                        {"model.head": "linear", "train.epochs": 500})  # long trials: the kill seldom lands between two
    command = [sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "study", "run",
               "--dataset", "colours", "--space", space, "--sampler", "random", "--trials", "40", "--cv", "3",
               "--pruner", "none", "--tracking", "none", "--name", "killed"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = open_storage(ws.db_url)  # one storage for the polling: re-opening it each time races the writer
    deadline = time.time() + 180
    try:
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
            try:
                trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
            except Exception:  # the study is not made yet, or the catalog is busy this instant
                continue
            states = [t.state.name for t in trials]
            begun = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("worker")]
            if states.count("COMPLETE") >= 2 and begun:  # a trial made but not begun is the next test's
                break
        assert process.poll() is None, "the study ended before it could be killed mid-trial"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    before = {t.number: t.value for t in stored(ws, "killed").get_trials() if t.state.name == "COMPLETE"}
    assert len(before) >= 2
    done = len(stored(ws, "killed").get_trials())
    resumed = run_study(StudyConfig(name="killed", resume=True, trials=done + 1, tracking="none"), ws)
    rows = {t.number: t for t in resumed.trials}
    assert {n: rows[n].cv_mean for n in before} == pytest.approx(before)
    interrupted = [t for t in resumed.trials if "interrupted" in t.note]
    assert len(interrupted) == 1 and interrupted[0].status == "failed"
    assert resumed.bundle is not None


def test_user_settings_win_over_the_spaces_fixed_values_and_resume_keeps_the_study_settings(trained_workspace,
                                                                                             tmp_path):
    ws = trained_workspace
    cfg = study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.head": "linear"}, sampler="grid",
                    overrides=["train.epochs=2"])
    result = run_study(cfg, ws)
    assert stored(ws).user_attrs["user_config"] == {"train": {"epochs": 2}}
    from handlens.train.config import load_config

    run_cfg = load_config(ws.runs_dir / result.trials[0].run_id / "config.yaml")
    assert run_cfg.train.epochs == 2  # the space fixes 3; the user's own key=value wins
    with pytest.raises(InputError, match=r"train\.lr is searched"):
        run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, name="s2", overrides=["train.lr=0.1"]), ws)
    with pytest.raises(InputError, match=r"made with its own --cv"):
        run_study(StudyConfig(name="s1", resume=True, cv=4), ws)


def test_a_fine_tuning_trial_that_cannot_fit_the_budget_stops_after_its_first_epoch(trained_workspace, tmp_path):
    cfg = study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.freeze": "full", "train.epochs": 400}, cv=2,
                    sampler="grid", budget=20)
    with pytest.raises(HandlensError, match="no trial finished"):
        run_study(cfg, trained_workspace)
    trial = stored(trained_workspace).trials[0]
    assert trial.state.name == "PRUNED" and trial.user_attrs["pruned_by"].startswith("budget: ")
    assert trial.user_attrs["epoch_seconds"] > 0


def test_a_space_mixing_frozen_and_fine_tuning_runs_frozen_trials_first(trained_workspace, tmp_path):
    """Frozen trials first (half of --trials here), their other keys still sampled; a grid puts its frozen points
    first. The median pruner then has finished trials to judge a fine-tuning trial against."""
    ws = trained_workspace
    space = {"model.freeze": ["full", "frozen"], "train.lr": [0.01, 0.003]}
    run_study(study_cfg(tmp_path, space, fixed={"train.epochs": 1}, sampler="random", trials=4, cv=2), ws)
    trials = stored(ws).trials
    assert [t.params["model.freeze"] for t in trials[:3]] == ["frozen", "frozen", "full"]
    assert [t.user_attrs["kind"] for t in trials[:3]] == ["frozen", "frozen", "train"]
    run_study(study_cfg(tmp_path, space, fixed={"train.epochs": 1}, sampler="grid", cv=2, name="g"), ws)
    assert [t.params["model.freeze"] for t in stored(ws, "g").trials] == ["frozen", "frozen", "full", "full"]
    # a space that does not search the freeze enqueues nothing
    run_study(study_cfg(tmp_path, {"train.lr": [0.01, 0.003]}, sampler="random", trials=2, cv=2, name="r"), ws)
    storage = open_storage(ws.db_url)
    assert not any(storage.get_trial_system_attrs(t._trial_id).get("fixed_params") for t in stored(ws, "r").trials)


def test_the_cheapest_fine_tuning_config_follows_the_frozen_trials():
    """After the frozen trials: the cheapest freeze with the space's lowest epochs and input size (the rest
    sampled); a grid is ordered the same way, cheapest first."""
    from handlens.search.space import parse_space
    from handlens.search.study import FROZEN_FIRST, _cheap_first, _cost_key

    space = parse_space({"space": {"model.freeze": ["full", "frozen", "partial:3"], "preprocess.size": [288, 224],
                                   "train.epochs": {"int": [6, 18], "step": 6}, "train.lr": [0.01, 0.001]}})
    queue = _cheap_first(space, None)
    assert queue[:FROZEN_FIRST] == [{"model.freeze": "frozen"}] * FROZEN_FIRST
    assert queue[FROZEN_FIRST:] == [{"model.freeze": "partial:3", "train.epochs": 6, "preprocess.size": 224}]
    # a short study: at most half of it frozen first, and the fine-tune only when a sampled trial is left after it
    assert [q["model.freeze"] for q in _cheap_first(space, 5)] == ["frozen", "frozen", "partial:3"]
    assert _cheap_first(space, 2) == [{"model.freeze": "frozen"}]
    order = sorted(space.grid(), key=_cost_key)
    assert [(p["model.freeze"], p["train.epochs"], p["preprocess.size"]) for p in order[:2]] == [
        ("frozen", 6, 224), ("frozen", 6, 224)]
    assert order[-1]["model.freeze"] == "full" and order[-1]["train.epochs"] == 18
    assert _cheap_first(parse_space({"space": {"train.lr": [0.01]}}), None) == []


def test_once_a_trial_finished_no_trial_may_take_more_than_half_the_budget(trained_workspace, tmp_path):
    """A fine-tuning trial that would fit in what is left, but would take more than half of the budget, stops after
    its first epoch once a frozen trial (a logistic head: no epochs) has finished; the frozen trial wins."""
    cfg = study_cfg(tmp_path, {"model.freeze": ["frozen", "full"]}, fixed={"train.epochs": 100_000}, cv=2,
                    sampler="grid", budget=600)
    result = run_study(cfg, trained_workspace)
    frozen, tuned = stored(trained_workspace).trials[:2]
    assert frozen.state.name == "COMPLETE" and frozen.params["model.freeze"] == "frozen"
    assert tuned.state.name == "PRUNED"
    assert "more than 50% of the study's 10.0 min" in tuned.user_attrs["pruned_by"]
    assert result.winner.number == frozen.number


def test_folds_of_a_grouped_split_keep_its_groups_together(trained_workspace, tmp_path):
    """Files named red_07.png grouped by their last digit (10 groups across the classes): no group is split."""
    from handlens.data.splits import make_split

    ws = trained_workspace
    catalog = open_catalog(ws.db_url)
    try:
        make_split(catalog, "colours", ratios="0.75,0,0.25", seed=0, group_regex=r"_\d(\d)\.png$", name="grouped")
    finally:
        catalog.close()
    cfg = study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.head": "logistic"}, sampler="grid",
                    split="grouped", cv=2)
    result = run_study(cfg, ws)
    study = stored(ws)
    pool = study.user_attrs["pool"]
    group_of = dict(zip(pool["ids"], pool["groups"], strict=True))
    assert len(set(pool["groups"])) < len(pool["ids"])  # the split is grouped
    for _, _, train_ids, val_ids in study.user_attrs["folds"]:
        assert not {group_of[i] for i in train_ids} & {group_of[i] for i in val_ids}
    assert result.bundle is not None and json.loads((result.bundle / "bundle.json").read_text())["study"]["grouped"]


def test_a_logistic_winner_is_refitted_at_the_c_its_folds_chose(trained_workspace, tmp_path):
    from handlens.models.bundle import load_bundle

    cfg = study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.head": "logistic"}, sampler="grid", cv=2)
    result = run_study(cfg, trained_workspace)
    chosen = result.winner.refit_set["model.logistic_c"]
    run_dir = load_bundle(result.bundle).path.parent
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["logistic_c"] == chosen
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["head_fit"]["C"] == chosen and metrics["head_fit"]["cv"]["folds"] == 0


class _Trial:
    """What the epoch pruner asks of an Optuna trial: reports, a verdict, attributes."""

    def __init__(self, prune: bool) -> None:
        self.reports: list[tuple[float, int]] = []
        self.asked: list[int] = []
        self.user_attrs: dict = {}
        self.prune = prune

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        self.asked.append(self.reports[-1][1])
        return self.prune

    def set_user_attr(self, key: str, value) -> None:
        self.user_attrs[key] = value


@pytest.mark.parametrize(("epochs", "warmup"), [(8, 3), (30, 8)])
def test_the_first_folds_epochs_are_reported_best_so_far_and_judged_after_the_warmup(epochs, warmup):
    from types import SimpleNamespace

    from handlens.search.study import _Objective

    objective = _Objective.__new__(_Objective)
    objective.ctx = SimpleNamespace(metric="macro_f1")
    objective.finished = None  # judged by the trial's own should_prune
    cfg = SimpleNamespace(train=SimpleNamespace(epochs=epochs))
    kept = _Trial(prune=False)
    report = objective._epoch_pruner(kept, cfg)
    for epoch, value in enumerate([0.5, 0.7, 0.6, 0.65, 0.8], start=1):
        report({"epoch": epoch, "val_macro_f1": value})
    assert kept.reports == [(0.5, 1), (0.7, 2), (0.7, 3), (0.7, 4), (0.8, 5)]  # monotone: the best so far
    assert kept.asked == [e for e in range(1, 6) if e >= warmup]
    pruned = _Trial(prune=True)
    report = objective._epoch_pruner(pruned, cfg)
    with pytest.raises(optuna.TrialPruned):
        for epoch in range(1, epochs + 1):
            report({"epoch": epoch, "val_macro_f1": 0.5})
    assert pruned.reports[-1][1] == warmup
    assert pruned.user_attrs["pruned_by"] == f"median pruner at epoch {warmup} of fold 1"


def _median_study(finished_curves: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                                          n_warmup_steps=1))
    for curve in finished_curves:
        trial = study.ask()
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
        study.tell(trial, max(curve))
    return study


def test_the_median_pruner_judged_on_the_trials_finished_at_start_agrees_with_optunas():
    from handlens.search.study import _Finished, should_prune

    study = _median_study([[0.5, 0.6, 0.7, 0.7], [0.4, 0.5, 0.6, 0.65], [0.6, 0.7, 0.8, 0.8]])
    trial = study.ask()
    finished = _Finished(study, study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    decisions = []
    for step, value in enumerate([0.55, 0.58, 0.75, 0.69], 1):
        trial.report(value, step)
        ours, optunas = should_prune(trial, finished), trial.should_prune()
        assert ours == optunas
        decisions.append(ours)
    assert decisions == [False, True, False, False]  # both answers occur: the comparison could fail
    # a trial finished after the snapshot is not judged against (one read per trial, not one per report)
    late = study.ask()
    late.report(0.9, 1)
    study.tell(late, 0.9)
    complete = (optuna.trial.TrialState.COMPLETE,)
    assert len(finished.get_trials(deepcopy=False, states=complete)) == 3
    assert len(study.get_trials(deepcopy=False, states=complete)) == 4
    assert finished.direction == study.direction  # the rest is the study's own


def test_a_trial_made_but_never_begun_by_a_killed_process_is_marked_failed_on_resume(monkeypatch):
    """A kill between Optuna making a trial and the objective claiming it (its worker attribute) leaves a running
    trial with no worker: once UNCLAIMED_AFTER_S has passed it is failed; a claimed trial of a live process is not."""
    from handlens.search import study as study_module

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    unclaimed, claimed = study.ask(), study.ask()
    claimed.set_user_attr("worker", f"{study_module.socket.gethostname()}:{os.getpid()}")
    assert study_module._interrupted_trials(storage, study) == 0  # just made: a worker may still claim it
    monkeypatch.setattr(study_module, "UNCLAIMED_AFTER_S", 0.0)
    assert study_module._interrupted_trials(storage, study) == 1
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {unclaimed.number: "FAIL", claimed.number: "RUNNING"}
    assert "before the trial began" in study.get_trials()[unclaimed.number].user_attrs["error"]


def test_ctrl_c_while_optuna_records_a_trial_stops_the_study_after_it():
    """Ctrl-C outside a trial's training (Optuna recording a trial) only asks the study to stop: the step goes on
    and KeyboardInterrupt comes once optimize returns; inside training it is raised at once. The handler is put
    back after."""
    import signal

    from handlens.search.study import _deferred_interrupts

    class Study:
        stopped = 0

        def stop(self):
            self.stopped += 1

    class Objective:
        training = False

    study, objective, went_on = Study(), Objective(), []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _deferred_interrupts(study, objective):
        signal.raise_signal(signal.SIGINT)
        went_on.append("the step after the signal ran")
    assert went_on and study.stopped == 1 and signal.getsignal(signal.SIGINT) is before
    objective.training = True
    with pytest.raises(KeyboardInterrupt), _deferred_interrupts(study, objective):
        signal.raise_signal(signal.SIGINT)
        went_on.append("not reached")
    assert len(went_on) == 1 and study.stopped == 1 and signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_of_study_run_says_how_to_resume_and_keeps_the_trials(trained_workspace, tmp_path):
    """SIGINT of a real `handlens study run` mid-trial: exit 130, one line naming --resume, no traceback; the
    finished trials are kept and none is left running."""
    import signal
    import subprocess
    import sys
    import time

    ws = trained_workspace
    space = write_space(tmp_path / "space.yaml", {"train.lr": {"float": [1e-3, 1e-1], "log": True}},
                        {"model.head": "linear", "train.epochs": 500})
    command = [sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "study", "run",
               "--dataset", "colours", "--space", space, "--sampler", "random", "--trials", "40", "--cv", "3",
               "--pruner", "none", "--tracking", "none", "--name", "ctrl"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = open_storage(ws.db_url)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
            try:
                trials = optuna.load_study(study_name="ctrl", storage=storage).get_trials()
            except Exception:
                continue
            states = [t.state.name for t in trials]
            if states.count("COMPLETE") >= 2 and any(t.state.name == "RUNNING" and t.user_attrs.get("worker")
                                                     for t in trials):
                break
        assert process.poll() is None, "the study ended before it could be interrupted mid-trial"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err and "handlens study run --resume ctrl" in err
    trials = stored(ws, "ctrl").get_trials()
    assert sum(t.state.name == "COMPLETE" for t in trials) >= 2
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_an_unknown_backbone_or_weights_it_lacks_is_one_error_before_any_trial(trained_workspace, tmp_path):
    """A misspelt backbone (searched, fixed or overridden) or packaged weights for a backbone that has none: one
    error naming the fix, and no study is made."""
    from handlens.search.study import study_names

    ws = trained_workspace
    with pytest.raises(InputError, match=r"'model\.backbone' = 'tiny_cnnn'.*did you mean 'tiny_cnn'"):
        run_study(study_cfg(tmp_path, {"model.backbone": ["tiny_cnn", "tiny_cnnn"]}, sampler="grid"), ws)
    with pytest.raises(InputError, match=r"model\.backbone=resnt18.*did you mean 'resnet18'"):
        run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, overrides=["model.backbone=resnt18"]), ws)
    with pytest.raises(InputError, match=r"no packaged weights ship for resnet18.*set model\.weights=imagenet"):
        run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.backbone": "resnet18",
                                                                   "model.weights": "packaged"}), ws)
    with pytest.raises(InputError, match=r"augment\.vflip=True has no effect on a frozen backbone's cached"):
        run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, overrides=["augment.vflip=true"]), ws)
    assert study_names(open_storage(ws.db_url)) == []


def test_a_model_based_sampler_with_too_few_trials_is_said_to_be_a_random_search(trained_workspace, tmp_path,
                                                                                 capsys):
    from handlens.search.study import _note_random_start

    assert _note_random_start("tpe", 20) is None and _note_random_start("random", 2) is None
    assert _note_random_start("gp", None) is None  # a budget: how many trials is not known
    assert "--sampler gp draws its first 10 trials at random: with 10 trial(s)" in _note_random_start("gp", 10)
    run_study(study_cfg(tmp_path, {"train.lr": [0.01, 0.1]}, fixed={"model.head": "logistic"}, sampler="tpe",
                        trials=1), trained_workspace)
    assert ("warning: --sampler tpe draws its first 8 trials at random: with 1 trial(s) this study is a random "
            "search; give --trials 20 or more") in capsys.readouterr().err


def test_importances_leave_out_trials_that_copied_an_earlier_score():
    """A logistic trial's lr is unused: its 'same as trial N' copies, counted again, would weigh lr by how often
    it was drawn. Importances are those of the trials scored themselves."""
    from handlens.search.records import importances

    dist = {"x": optuna.distributions.FloatDistribution(0, 1), "lr": optuna.distributions.FloatDistribution(0, 1)}

    def trial(x, lr, value, **attrs):
        return optuna.trial.create_trial(params={"x": x, "lr": lr}, distributions=dist, value=value, user_attrs=attrs)

    scored = [trial(0.1, 0.5, 0.1), trial(0.5, 0.6, 0.5), trial(0.9, 0.4, 0.9), trial(0.3, 0.7, 0.3)]
    copies = [trial(0.9, lr, 0.9, duplicate_of=2) for lr in (0.05, 0.15, 0.25, 0.35, 0.85, 0.95)]
    full = optuna.create_study(direction="maximize")
    full.add_trials(scored + copies)
    alone = optuna.create_study(direction="maximize")
    alone.add_trials(scored)
    expected = {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(alone).items()}
    assert importances(full) == expected
    counted = {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(full).items()}
    assert counted != expected  # the copies would have changed them


def test_a_policy_that_samples_patches_makes_a_frozen_trial_train_as_train_would(trained_workspace, tmp_path):
    """thin-section turns patch sampling on: a frozen trial then trains on patches (as its refit and `train` do),
    not on whole-image cached features, and is not refused as a policy that changes nothing."""
    patches = ["augment.policy=thin-section", "preprocess.patches.size=24", "preprocess.patches.max_side=0",
               "preprocess.size=24", "preprocess.patches.per_image=1"]
    result = run_study(study_cfg(tmp_path, {"train.lr": [0.01]}, fixed={"model.head": "linear", "train.epochs": 1},
                                 cv=2, sampler="grid", overrides=patches), trained_workspace)
    (trial,) = result.trials
    assert trial.status == "complete" and trial.kind != "frozen", trial
    from handlens.models.bundle import load_bundle

    assert load_bundle(result.bundle).patch_trained
    # the base pins every default (a worker of another version trains the same trials), but of preprocess only
    # the keys set, which the policy's recommendations then fill
    base = stored(trained_workspace).user_attrs["base_config"]
    assert base["train"]["progress"] is False and base["train"]["lr"] == 1e-3
    assert base["preprocess"] == {"size": 24, "patches": {"size": 24, "max_side": 0, "per_image": 1}}
    assert base["train"]["batch_size"] == 32 and base["model"]["freeze"] == "frozen"


def test_a_frozen_trial_that_needs_a_new_feature_pass_has_it_estimated_for_the_budget(trained_workspace):
    """The budget counted only a frozen trial's fold work: a trial with a new input size started a feature pass
    minutes long at the budget's end. The pass is estimated per pixel from the study's passes so far."""
    from handlens.search.trial import PoolFeatures
    from handlens.train.config import load_config

    catalog = open_catalog(trained_workspace.db_url)
    try:
        pool = load_split_data(catalog, "colours").subsets["train"]
    finally:
        catalog.close()
    features = PoolFeatures(trained_workspace, pool)

    def cfg(size):
        return load_config(None, ["data.dataset=colours", "model.backbone=tiny_cnn", "model.weights=none",
                                  "model.freeze=frozen", f"preprocess.size={size}"])

    assert features.missing_seconds(cfg(28)) is None  # no pass to go by yet
    features.rows(cfg(28))
    assert features.missing_seconds(cfg(28)) == 0.0
    (rate,) = features._rates
    assert features.missing_seconds(cfg(56)) == pytest.approx(rate * len(pool.sha256s) * 56 ** 2)  # 4x the pass


def test_trials_count_configs_scored_not_copies_and_an_exhausted_space_stops(trained_workspace, tmp_path):
    """--trials 3 over a space with 3 distinct configs (a logistic head ignores train.lr) scores all 3, however
    many copies the sampler draws; a space with one distinct config stops after MAX_BUDGET_SKIPS copies."""
    from handlens.search.study import MAX_BUDGET_SKIPS, scored_trials

    space = {"model.head": ["logistic", "linear"], "train.lr": [0.01, 0.03]}
    result = run_study(study_cfg(tmp_path, space, sampler="random", trials=3), trained_workspace)
    assert len(scored_trials(result.trials)) == 3
    one = run_study(study_cfg(tmp_path, {"train.lr": [0.01, 0.1]}, fixed={"model.head": "logistic"}, name="s2",
                              sampler="random", trials=3), trained_workspace)
    assert len(scored_trials(one.trials)) == 1 and len(one.trials) == 1 + MAX_BUDGET_SKIPS
