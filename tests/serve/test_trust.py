"""POST /api/v1/models/{id}/trust: one image's map against a random map, in words, cached like explanations."""

import json

from tests.serve.conftest import png_bytes

WORDS = ("faithful", "not better than random", "worse than random")


def test_trust_judges_one_map_against_a_random_map_and_is_cached(served):
    client, run_id, _ = served
    files = {"file": ("t.png", png_bytes((30, 160, 90)))}
    first = client.post(f"/api/v1/models/{run_id}/trust", files=files, data={"method": "gradcam", "steps": "8"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["verdict"] in WORDS and body["sentence"].startswith(body["verdict"] + " · deletion ")
    assert 0 <= body["deletion_auc"] <= 1 and 0 <= body["random_insertion_auc"] <= 1 and body["steps"] == 8
    assert not body["cached"] and body["target"] in ("blue", "green", "red")
    again = client.post(f"/api/v1/models/{run_id}/trust", files=files, data={"method": "gradcam", "steps": "8"})
    assert again.json()["cached"] and again.json()["deletion_auc"] == body["deletion_auc"]
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    by_id = client.post(f"/api/v1/models/{run_id}/trust", json={"image_id": image_id, "steps": 4, "target": "red"})
    assert by_id.status_code == 200 and by_id.json()["target"] == "red"


def test_trust_refuses_bad_steps_and_parameters(served):
    client, run_id, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    for body, words in (({"steps": 500}, "steps: Input should be less than or equal to 50"),
                        ({"steps": "many"}, "steps: Input should be a valid integer"),
                        ({"stpes": 5}, "did you mean 'steps'"), ({"method": ""}, "method:"),
                        ({"method": "integrated_gradients", "params": {"stpes": 3}}, "did you mean 'steps'")):
        answer = client.post(f"/api/v1/models/{run_id}/trust", content=json.dumps({"image_id": image_id, **body}),
                             headers={"Content-Type": "application/json"})
        assert answer.status_code == 422 and words in answer.json()["detail"], answer.text


def test_trust_after_the_overlay_measures_the_map_the_viewer_shows(served, monkeypatch):
    """The viewer asks for the overlay first: the trust check measures that cached map instead of explaining
    the image a second time."""
    from handlens.explain import image as image_module

    client, run_id, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 3}).json()["items"][2]["id"]
    body = {"image_id": image_id, "method": "gradcam", "target": "green"}
    client.post(f"/api/v1/models/{run_id}/explain", json=body).raise_for_status()
    explained = []
    real = image_module.explain_image
    monkeypatch.setattr(image_module, "explain_image", lambda *a, **k: explained.append(1) or real(*a, **k))
    answer = client.post(f"/api/v1/models/{run_id}/trust", json={**body, "steps": 6}).json()
    assert explained == [] and answer["target"] == "green" and answer["verdict"] in WORDS
    fresh = client.post(f"/api/v1/models/{run_id}/trust", json={**body, "steps": 7}).json()  # another key
    assert fresh["verdict"] in WORDS and explained == []  # still the cached overlay's map
