"""The explanation answer says where the map's energy sits; an image's expert regions are its ROI."""

from tests.serve.conftest import png_bytes

VERDICTS = ("shortcut warning", "no shortcut sign", "empty map")


def test_an_upload_has_border_shares_and_no_roi(served):
    client, run_id, _ = served
    answer = client.post(f"/api/v1/models/{run_id}/explain", files={"file": ("s.png", png_bytes((200, 30, 30)))},
                         data={"method": "gradcam"})
    assert answer.status_code == 200, answer.text
    shortcuts = answer.json()["shortcuts"]
    assert shortcuts["verdict"] in VERDICTS and shortcuts["sentence"].startswith(shortcuts["verdict"])
    if shortcuts["verdict"] != "empty map":
        assert 0 < shortcuts["border"]["area"] < 1 and shortcuts["outside_roi"] is None


def test_expert_regions_become_the_roi_and_a_new_region_is_a_new_answer(served):
    client, run_id, _ = served
    items = client.get("/api/v1/images", params={"dataset": "colours", "limit": 200}).json()["items"]
    image = next(i for i in items if not client.get(f"/api/v1/images/{i['id']}").json()["regions"])
    body = {"image_id": image["id"], "method": "gradcam"}
    before = client.post(f"/api/v1/models/{run_id}/explain", json=body).json()
    assert before["shortcuts"]["outside_roi"] is None
    detail = client.get(f"/api/v1/images/{image['id']}").json()
    width, height = detail["width"], detail["height"]
    region = {"polygons": [[[0, 0], [width // 2, 0], [width // 2, height], [0, height]]]}  # the left half
    assert client.post(f"/api/v1/images/{image['id']}/regions", json=region).status_code == 201
    after = client.post(f"/api/v1/models/{run_id}/explain", json=body).json()
    assert not after["cached"]  # the region changed what the answer says
    if after["shortcuts"]["verdict"] != "empty map":
        outside = after["shortcuts"]["outside_roi"]
        assert 0 <= outside["energy"] <= 1 and abs(outside["area"] - 0.5) < 0.1
