"""File-attribute baselines: learnt on training facts, scored on judged ones, judged against the model."""

from handlens.data.baselines import FileFacts, attribute_baselines, baselines_verdict


def facts(label, size=(64, 64), mode="RGB", fmt="PNG"):
    return FileFacts(label=label, width=size[0], height=size[1], mode=mode, format=fmt)


def test_size_alone_telling_the_classes_apart_is_a_shortcut_beside_a_model_that_is_no_better():
    train = [facts("a", (100, 80)) for _ in range(8)] + [facts("b", (64, 64)) for _ in range(4)]
    judged = [facts("a", (100, 80)) for _ in range(4)] + [facts("b", (64, 64)) for _ in range(4)]
    found = {b.name: b for b in attribute_baselines(train, judged, ["a", "b"])}
    assert found["size only"].accuracy == 1.0 and found["majority class"].accuracy == 0.5
    assert found["mode only"].accuracy == 0.5 and found["size only"].values == 2
    assert baselines_verdict(list(found.values()), 0.95).startswith("shortcut: size only reaches accuracy 1.00")
    assert baselines_verdict([found["majority class"], found["mode only"]], 0.95).startswith("no shortcut")


def test_an_unseen_value_falls_back_to_the_majority_class():
    train = [facts("a", fmt="PNG") for _ in range(3)] + [facts("b", fmt="JPEG")]
    judged = [facts("b", fmt="TIFF"), facts("b", fmt="JPEG")]
    found = {b.name: b for b in attribute_baselines(train, judged, ["a", "b"])}
    assert found["format only"].accuracy == 0.5  # TIFF: never seen -> majority "a"; JPEG -> "b"
    assert attribute_baselines([], judged, ["a", "b"]) == []
