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


def test_a_mask_region_is_served_as_a_tinted_picture(served, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from handlens.data.annotations import import_annotations
    from handlens.data.catalog import open_catalog

    client, _, root = served
    items = client.get("/api/v1/images", params={"dataset": "colours", "label": "blue", "limit": 1}).json()["items"]
    image = items[0]
    folder = tmp_path / "masks"
    folder.mkdir()
    half = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    half[:, : image["width"] // 2] = 255
    Image.fromarray(half).save(folder / f"{image['name'].rsplit('.', 1)[0]}.png")
    catalog = open_catalog(f"sqlite:///{root / 'ws' / 'handlens.db'}")
    try:
        assert import_annotations(catalog, "colours", folder, replace=False)["added"] == 1
    finally:
        catalog.close()
    region = next(r for r in client.get(f"/api/v1/images/{image['id']}").json()["regions"] if r["has_mask"])
    answer = client.get(f"/api/v1/regions/{region['id']}/mask.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"
    drawn = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert drawn.shape == (image["height"], image["width"], 4)
    assert (drawn[:, 0] == (0, 255, 255, 110)).all() and (drawn[:, -1, 3] == 0).all()
    assert client.get("/api/v1/regions/999999/mask.png").status_code == 404
