"""Boxes in the catalog (data/boxes.py, cli/boxes.py): COCO, labelme and CSV imports, bad rows skipped with their
reasons, one label per labelset on a box, idempotent reruns, stats, and the v4 -> v5 migration."""

import json
from pathlib import Path

import pytest
import typer
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from handlens.cli.boxes import boxes_app
from handlens.core.errors import InputError, NotFoundError
from handlens.data.boxes import box_stats, import_boxes
from handlens.data.catalog import SCHEMA_VERSION, Box, BoxLabel, open_catalog
from handlens.data.importer import import_path
from tests.conftest import colour_tree, split_workspace


@pytest.fixture
def colours(tmp_path, catalog):
    """Six 40x40 images (red/green/blue, two each) in dataset 'colours'; returns the tree's folder."""
    tree = colour_tree(tmp_path / "colours", per_class=2, size=40)
    import_path(catalog, tree, "colours", workers=1)
    return tree


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def boxes_with_labels(catalog) -> dict[tuple[float, ...], dict[str, str]]:
    with catalog.session() as session:
        out: dict[tuple[float, ...], dict[str, str]] = {}
        for box in session.scalars(select(Box)):
            out[(box.x0, box.y0, box.x1, box.y1)] = {item.labelset: item.label for item in box.labels}
        return out


def test_csv_imports_good_rows_and_skips_bad_ones_with_reasons(colours, catalog, tmp_path):
    csv_file = write_csv(colours / "boxes.csv", [
        "path,x0,y0,x1,y1,label",
        "red/red_00.png,1,2,11,22,sigma-clast",  # relative to the CSV's folder
        f"{colours / 'green' / 'green_00.png'},0,0,40,40,delta-clast",  # absolute, the whole image
        "elsewhere/blue_00.png,5,5,9,9,sigma-clast",  # no such path: found by its (unique) file name
        "red/red_01.png,30,30,41,35,sigma-clast",  # x1 beyond the 40 px width
        "red/red_01.png,10,10,10,20,sigma-clast",  # x1 == x0
        "red/red_01.png,10,10,10.5,10.5,sigma-clast",  # 0.25 px²
        "red/nope.png,1,1,5,5,sigma-clast",
        "red/red_01.png,abc,1,5,5,sigma-clast",
    ])
    report = import_boxes(catalog, "colours", csv_file)
    assert report.format == "csv" and report.rows == 8 and report.added == 3
    assert [(s.where, s.reason) for s in report.skipped] == [
        ("boxes.csv:5", "outside_image"), ("boxes.csv:6", "degenerate"), ("boxes.csv:7", "degenerate"),
        ("boxes.csv:8", "unknown_image"), ("boxes.csv:9", "bad_row")]
    assert "40x40" in report.skipped[0].detail
    assert report.labels == {"default": {"delta-clast": 1, "sigma-clast": 2}}
    document = report.to_dict()
    assert document["skipped_by_reason"] == {"bad_row": 1, "degenerate": 2, "outside_image": 1, "unknown_image": 1}
    json.dumps(document)
    with catalog.session() as session:
        assert session.scalar(select(func.count(Box.id))) == 3
    assert boxes_with_labels(catalog)[(5.0, 5.0, 9.0, 9.0)] == {"default": "sigma-clast"}


def test_a_file_name_held_by_two_images_is_ambiguous(make_tree, catalog, tmp_path):
    root = make_tree({"a": 1, "b": 1})  # a/img_000.png and b/img_000.png, 48x40
    import_path(catalog, root, "twins", workers=1)
    csv_file = write_csv(tmp_path / "elsewhere" / "b.csv", ["img_000.png,1,1,5,5,x", f"{root}/b/img_000.png,1,1,5,5,x"])
    report = import_boxes(catalog, "twins", csv_file, fmt="csv")  # no header: the columns in their order
    assert report.added == 1 and [s.reason for s in report.skipped] == ["ambiguous_image"]


def coco_document(colours: Path) -> dict:
    return {
        "images": [{"id": 1, "file_name": "red/red_00.png", "width": 40, "height": 40},
                   {"id": 2, "file_name": "green_01.png", "width": 40, "height": 40},
                   {"id": 3, "file_name": "missing.png", "width": 40, "height": 40}],
        "categories": [{"id": 7, "name": "sigma-clast"}, {"id": 8, "name": "delta-clast"}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [2, 3, 10, 20], "category_id": 7,
             "attributes": {"rotation": "cw", "occluded": False}},
            {"id": 11, "image_id": 2, "bbox": [0, 0, 8, 8], "category_id": 8, "attributes": {"rotation": "ccw"}},
            {"id": 12, "image_id": 2, "bbox": [35, 35, 10, 2], "category_id": 7},  # x1 = 45 > 40
            {"id": 13, "image_id": 3, "bbox": [1, 1, 4, 4], "category_id": 7},
            {"id": 14, "image_id": 1, "bbox": [1, 1, 4, 4], "category_id": 99},
            {"id": 15, "image_id": 1, "bbox": [1, 1, 0, 4], "category_id": 7},
        ],
    }


def test_coco_category_and_attribute_land_in_two_labelsets_of_one_box(colours, catalog):
    coco = colours / "coco.json"
    coco.write_text(json.dumps(coco_document(colours)))
    report = import_boxes(catalog, "colours", coco, labelset="detection")
    assert report.format == "coco" and report.added == 2
    assert {s.where: s.reason for s in report.skipped} == {
        "coco.json#12": "outside_image", "coco.json#13": "unknown_image", "coco.json#14": "bad_row",
        "coco.json#15": "degenerate"}
    assert boxes_with_labels(catalog) == {(2.0, 3.0, 12.0, 23.0): {"detection": "sigma-clast", "rotation": "cw"},
                                          (0.0, 0.0, 8.0, 8.0): {"detection": "delta-clast", "rotation": "ccw"}}
    assert report.labels == {"detection": {"delta-clast": 1, "sigma-clast": 1}, "rotation": {"ccw": 1, "cw": 1}}

    again = import_boxes(catalog, "colours", coco, labelset="detection")  # a rerun adds nothing
    assert (again.added, again.labelled, again.relabelled, again.unchanged) == (0, 0, 0, 2)
    assert len(again.skipped) == 4 and len(boxes_with_labels(catalog)) == 2
    with catalog.session() as session:
        assert session.scalar(select(func.count(BoxLabel.id))) == 4


def test_labelme_folder_of_files(colours, catalog, tmp_path):
    folder = tmp_path / "labelme"
    folder.mkdir()
    (folder / "red_00.json").write_text(json.dumps({
        "imagePath": "..\\colours\\red\\red_00.png", "imageWidth": 40, "imageHeight": 40,  # Windows separators
        "shapes": [{"label": "sigma-clast", "shape_type": "rectangle", "points": [[20, 30], [4, 6]]},  # drawn up
                   {"label": "vein", "shape_type": "polygon", "points": [[1, 1], [5, 1], [3, 4]]},
                   {"label": "bad", "shape_type": "rectangle", "points": [[1, 1]]}]}))
    (folder / "blue_01.json").write_text(json.dumps({
        "imagePath": "blue_01.png", "shapes": [{"label": "", "shape_type": "rectangle", "points": [[0, 0], [3, 3]]}]}))
    report = import_boxes(catalog, "colours", folder)
    assert report.format == "labelme" and report.added == 2
    assert sorted(s.reason for s in report.skipped) == ["bad_row", "not_a_rectangle"]
    assert boxes_with_labels(catalog) == {(4.0, 6.0, 20.0, 30.0): {"default": "sigma-clast"},
                                          (0.0, 0.0, 3.0, 3.0): {}}
    single = import_boxes(catalog, "colours", folder / "red_00.json", fmt="labelme")
    assert single.added == 0 and single.unchanged == 1


def test_two_csvs_give_one_box_two_labelsets_and_a_changed_label_replaces_the_old(colours, catalog):
    detection = write_csv(colours / "detection.csv", ["path,x0,y0,x1,y1,label", "red/red_00.png,1,1,9,9,sigma-clast",
                                                      "red/red_00.png,20,20,30,30,sigma-clast"])
    rotation = write_csv(colours / "rotation.csv", ["path,x0,y0,x1,y1,label", "red/red_00.png,1,1,9,9,cw",
                                                    "red/red_00.png,20.0000001,20,30,30,ccw"])
    assert import_boxes(catalog, "colours", detection, labelset="detection").added == 2
    second = import_boxes(catalog, "colours", rotation, labelset="rotation")
    assert (second.added, second.labelled) == (0, 2)  # the same boxes (to 1e-3 px) gain a label
    assert boxes_with_labels(catalog) == {(1.0, 1.0, 9.0, 9.0): {"detection": "sigma-clast", "rotation": "cw"},
                                          (20.0, 20.0, 30.0, 30.0): {"detection": "sigma-clast", "rotation": "ccw"}}
    fixed = write_csv(colours / "fixed.csv", ["path,x0,y0,x1,y1,label,labelset",
                                              "red/red_00.png,1,1,9,9,ccw,rotation"])  # its own labelset column
    assert import_boxes(catalog, "colours", fixed, labelset="ignored").relabelled == 1
    assert boxes_with_labels(catalog)[(1.0, 1.0, 9.0, 9.0)]["rotation"] == "ccw"


def test_stats_on_a_known_set(colours, catalog):
    csv_file = write_csv(colours / "b.csv", [
        "path,x0,y0,x1,y1,label,labelset",
        "red/red_00.png,0,0,10,10,sigma,detection",  # 10x10
        "red/red_00.png,0,0,2,8,sigma,detection",  # 2x8
        "red/red_00.png,10,10,14,13,delta,detection",  # 4x3
        "green/green_00.png,0,0,20,5,sigma,detection",  # 20x5
        "green/green_00.png,0,0,20,5,cw,rotation",
    ])
    import_boxes(catalog, "colours", csv_file)
    stats = box_stats(catalog, "colours")
    assert (stats["boxes"], stats["images"], stats["images_with_boxes"], stats["images_without_boxes"]) == (4, 6, 2, 4)
    assert stats["labelsets"] == {
        "detection": {"classes": {"sigma": 3, "delta": 1}, "labelled": 4, "unlabelled": 0},
        "rotation": {"classes": {"cw": 1}, "labelled": 1, "unlabelled": 3}}
    assert stats["width"] == {"min": 2.0, "median": 7.0, "max": 20.0}
    assert stats["height"] == {"min": 3.0, "median": 6.5, "max": 10.0}
    assert stats["area"] == {"min": 12.0, "median": 58.0, "max": 100.0}  # 12, 16, 100, 100
    assert stats["boxes_per_image"] == {"min": 1.0, "median": 2.0, "max": 3.0}


def test_empty_dataset_stats_and_clear_errors(colours, catalog, tmp_path):
    stats = box_stats(catalog, "colours")
    assert stats["boxes"] == 0 and stats["width"]["median"] is None and stats["images_without_boxes"] == 6
    with pytest.raises(NotFoundError, match="no dataset named 'rocks'"):
        box_stats(catalog, "rocks")
    odd = tmp_path / "odd.json"
    odd.write_text('{"something": []}')
    with pytest.raises(InputError, match="--format"):
        import_boxes(catalog, "colours", odd)
    with pytest.raises(InputError, match="unknown box format"):
        import_boxes(catalog, "colours", odd, fmt="yolo")
    with pytest.raises(InputError, match="not COCO JSON"):
        import_boxes(catalog, "colours", odd, fmt="coco")
    with pytest.raises(InputError, match="does not exist"):
        import_boxes(catalog, "colours", tmp_path / "none.csv")


def test_a_version_four_catalog_gains_the_box_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog = open_catalog(url)
    with catalog.engine.begin() as conn:
        conn.execute(text("insert into datasets (name, description, created_at) values ('old', '', '2026-01-01')"))
        conn.execute(text("drop table box_labels"))
        conn.execute(text("drop table boxes"))
        conn.execute(text("update schema_version set version = 4"))
    catalog.close()
    assert SCHEMA_VERSION == 5
    upgraded = open_catalog(url)
    with upgraded.engine.connect() as conn:
        assert conn.execute(text("select version from schema_version")).scalar() == 5
        assert conn.execute(text("select count(*) from boxes")).scalar() == 0
        assert conn.execute(text("select count(*) from box_labels")).scalar() == 0
        assert conn.execute(text("select name from datasets")).scalar() == "old"
    upgraded.close()


def test_deleting_an_image_deletes_its_boxes_and_labels(colours, catalog):
    import_boxes(catalog, "colours", write_csv(colours / "b.csv", ["red/red_00.png,1,1,5,5,x"]))
    with catalog.session() as session:
        session.execute(text("delete from images"))
    with catalog.session() as session:
        assert session.scalar(select(func.count(Box.id))) == 0
        assert session.scalar(select(func.count(BoxLabel.id))) == 0


def test_cli_boxes_import_and_stats(tmp_path):
    ws = split_workspace(tmp_path, colour_tree(tmp_path / "colours", per_class=4, size=40))
    csv_file = write_csv(tmp_path / "colours" / "b.csv", ["path,x0,y0,x1,y1,label", "red/red_00.png,1,1,9,9,sigma",
                                                          "red/red_00.png,1,1,50,9,sigma"])
    root = typer.Typer()

    @root.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"workspace": ws.root, "db": None}

    root.add_typer(boxes_app, name="boxes")
    runner = CliRunner()
    result = runner.invoke(root, ["boxes", "import", "colours", str(csv_file), "--labelset", "detection", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_by_reason"] == {"outside_image": 1}
    text_run = runner.invoke(root, ["boxes", "import", "colours", str(csv_file), "--format", "csv"])
    assert text_run.exit_code == 0 and "0 boxes added" in text_run.stdout and "1 outside image" in text_run.stdout
    stats = json.loads(runner.invoke(root, ["boxes", "stats", "colours", "--json"]).stdout)
    assert stats["labelsets"]["detection"]["classes"] == {"sigma": 1}
    shown = runner.invoke(root, ["boxes", "stats", "colours"])
    assert shown.exit_code == 0 and "1 of 12 images have boxes" in shown.stdout
    missing = runner.invoke(root, ["boxes", "stats", "rocks"])
    assert missing.exit_code != 0 and "no dataset named" in missing.output
