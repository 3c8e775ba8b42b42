"""Run names: the user's --name, else a study's trial, else the settings that differ among the runs."""

from handlens.core.names import run_names


def cfg(**sections):
    base = {"model": {"backbone": "efficientnet_lite0", "freeze": "frozen", "pool": "avg"},
            "preprocess": {"size": 224}, "train": {"epochs": 10, "lr": 0.001, "progress": True},
            "tracking": {"backend": "mlflow", "name": ""}}
    for section, values in sections.items():
        base[section] = {**base[section], **values}
    return base


def test_runs_are_told_apart_by_what_differs_and_a_given_name_wins():
    names = run_names({"r1": cfg(), "r2": cfg(model={"pool": "gem"}, preprocess={"size": 320}),
                       "r3": cfg(train={"epochs": 20, "progress": False}),
                       "r4": cfg(tracking={"name": "thin-section baseline"})})
    assert names["r1"] == "pool=avg · size=224 · epochs=10"
    assert names["r2"] == "pool=gem · size=320 · epochs=10"
    assert names["r3"] == "pool=avg · size=224 · epochs=20"  # progress differs too, but says nothing of the model
    assert names["r4"] == "thin-section baseline"
    assert len(set(names.values())) == 4


def test_a_study_winner_is_named_by_its_trial_and_a_lone_run_by_its_id():
    names = run_names({"r1": cfg(), "r2": cfg()}, {"r2": {"name": "lith-frozen", "trial": 7}})
    assert names == {"r1": "r1", "r2": "study lith-frozen · trial 7"}
    assert run_names({"only": cfg()}) == {"only": "only"}
