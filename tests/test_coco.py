"""COCO reader: segmentation forms, crowd, empty images, category ids and names, zips, validation report."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.data.coco import CocoDataset, load_dataset
from mrcnn.data.coco_checks import validate_coco
from mrcnn.data.zips import safe_extract_zip
from mrcnn.errors import DatasetError

W, H = 20, 16
RECT = np.zeros((H, W), np.uint8)
RECT[2:7, 3:9] = 1                       # x 3..8, y 2..6 -> box [3, 2, 9, 7]
POLYGON = [[3, 2, 9, 2, 9, 7, 3, 7]]     # pixel-corner polygon of RECT


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")  # COCO runs go down columns, starting with zeros
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def ann(id, image_id, category_id=1, seg=None, bbox=(3, 2, 6, 5), **extra) -> dict:
    a = {"id": id, "image_id": image_id, "category_id": category_id,
         "segmentation": POLYGON if seg is None else seg, "iscrowd": 0}
    if bbox is not None:
        a["bbox"] = list(bbox)
    a.update(extra)
    return a


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict],
               skip_files: tuple = ()) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        if im["file_name"] not in skip_files:
            pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / im["file_name"])
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


def image(id, w=W, h=H) -> dict:
    return {"id": id, "file_name": f"img_{id:03d}.png", "width": w, "height": h}


CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def test_polygon_compressed_and_uncompressed_rle_decode_to_the_mask(tmp_path):
    root = write_coco(tmp_path, [image(1)], [
        ann(1, 1, seg=POLYGON),
        ann(2, 1, seg=compressed_rle(RECT)),
        ann(3, 1, seg=uncompressed_rle(RECT), bbox=None),  # no bbox: taken from the mask
        ann(4, 1, seg=POLYGON[0]),                           # a flat polygon, as some exporters write
    ], CATS)
    ds = CocoDataset(root)
    assert ds.report.ok and not ds.report.issues
    img, t = ds[0]
    assert img.shape == (3, H, W) and img.dtype == torch.float32 and img.max() <= 1
    assert t["masks"].shape == (4, H, W) and t["masks"].dtype == torch.uint8
    for m in t["masks"]:
        assert np.array_equal(m.numpy(), RECT)
    assert t["boxes"].tolist() == [[3, 2, 9, 7]] * 4
    assert t["area"].tolist() == [30.0] * 4
    assert t["labels"].dtype == torch.int64 and t["image_id"].item() == 1


def test_polygon_with_a_hole_via_rle_and_multi_part_polygon(tmp_path):
    ring = RECT.copy()
    ring[4, 5] = 0
    two = [[1, 1, 3, 1, 3, 3, 1, 3], [10, 10, 12, 10, 12, 12, 10, 12]]
    root = write_coco(tmp_path, [image(1)], [ann(1, 1, seg=compressed_rle(ring)),
                                             ann(2, 1, seg=two, bbox=(1, 1, 11, 11))], CATS)
    _, t = CocoDataset(root)[0]
    assert np.array_equal(t["masks"][0].numpy(), ring)
    assert t["masks"][1].sum() == 8 and t["masks"][1][1, 1] and t["masks"][1][11, 11]


def test_crowd_left_out_of_targets_but_kept_for_evaluation(tmp_path):
    root = write_coco(tmp_path, [image(1)], [
        ann(1, 1), ann(2, 1, seg=uncompressed_rle(RECT), iscrowd=1)], CATS)
    ds = CocoDataset(root)
    _, t = ds[0]
    assert len(t["boxes"]) == 1 and t["iscrowd"].tolist() == [0]
    assert sorted(a["iscrowd"] for a in ds.coco.loadAnns(ds.coco.getAnnIds())) == [0, 1]
    assert ds.report.num_crowd == 1
    _, t = CocoDataset(root, include_crowd=True)[0]
    assert t["iscrowd"].tolist() == [0, 1]


def test_image_without_annotations_gives_empty_targets(tmp_path):
    root = write_coco(tmp_path, [image(1), image(2, w=24, h=12)], [ann(1, 1)], CATS)
    ds = CocoDataset(root)
    assert len(ds) == 2 and ds.report.ok and ds.report.num_unannotated == 1
    img, t = ds[1]
    assert img.shape == (3, 12, 24)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["masks"].shape == (0, 12, 24) and t["masks"].dtype == torch.uint8
    assert t["iscrowd"].shape == (0,) and t["area"].shape == (0,)
    assert t["image_id"].item() == 2


def test_non_contiguous_category_ids(tmp_path):
    cats = [{"id": 42, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]
    root = write_coco(tmp_path, [image(1)], [ann(1, 1, 42), ann(2, 1, 3), ann(3, 1, 17)], cats)
    ds = CocoDataset(root)
    assert ds.categories == ["__background__", "cat", "dog", "zebra"]  # ordered by category id
    _, t = ds[0]
    assert t["labels"].tolist() == [3, 1, 2]
    assert ds.cat_id_to_label == {3: 1, 17: 2, 42: 3} and ds.label_to_cat_id[3] == 42


def test_categories_matched_by_name_in_the_models_order(tmp_path):
    root = write_coco(tmp_path, [image(1)], [ann(1, 1, 1), ann(2, 1, 2)], CATS)
    model = ["__background__", "bird", "dog", "cat"]
    ds = CocoDataset(root, categories=model)
    _, t = ds[0]
    assert [model[k] for k in t["labels"]] == ["cat", "dog"]
    assert ds.categories == model


def test_dataset_category_unknown_to_the_model(tmp_path):
    root = write_coco(tmp_path, [image(1)], [ann(1, 1, 1), ann(2, 1, 2)], CATS)
    model = ["__background__", "cat"]
    with pytest.raises(DatasetError, match="'dog'"):
        CocoDataset(root, categories=model)
    report = validate_coco(root, categories=model)
    assert not report.ok and any("'dog'" in i.where for i in report.errors)
    ds = CocoDataset(root, categories=model, unknown="drop")
    _, t = ds[0]
    assert t["labels"].tolist() == [1]
    assert any("'dog'" in w.where for w in ds.report.warnings)
    assert [c["name"] for c in ds.coco.loadCats(ds.coco.getCatIds())] == ["cat"]


def test_a_category_name_with_a_control_character_is_an_error(tmp_path):
    """A class name with a newline would reach the model's checkpoint, which refuses it at load."""
    root = write_coco(tmp_path, [image(1)], [ann(1, 1)], [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog\nfish"}])
    report = validate_coco(root)
    assert [(i.where, i.message) for i in report.errors] == [
        ("category 2 ('dog\\nfish')", "the category name holds the control character '\\n'")]


def test_every_validation_problem_is_named(tmp_path):
    images = [image(1), image(2), image(3), image(4, w=30), image(5)]
    bad_rle = compressed_rle(RECT)
    bad_rle["size"] = [H + 1, W]
    annotations = [
        ann(10, 1),                                             # fine
        ann(11, 1, category_id=99),                             # unknown category id
        ann(12, 1, bbox=(15, 2, 10, 5)),                        # sticks out of the 20 px wide image
        ann(13, 1, bbox=(3, 2, 0, 5)),                          # zero width
        ann(14, 1, seg=[[1, 1, 2, 2]], bbox=(1, 1, 1, 1)),      # too few points: empty mask
        ann(15, 1, seg=bad_rle),                                # RLE for another size
        {"id": 16, "image_id": 1, "bbox": [3, 2, 6, 5]},        # no segmentation, no category
        ann(17, 77),                                            # image id not in 'images'
        ann(18, 2),                                             # its image file is missing
    ]
    root = write_coco(tmp_path, images, annotations, CATS, skip_files=("img_002.png",))
    (root / "images" / "img_003.png").write_bytes(b"not a png at all")
    Image.new("RGB", (W, H)).save(root / "images" / "img_004.png")  # 20 px wide, json says 30
    report = validate_coco(root)
    by_where = {i.where: i for i in report.issues}

    def issue(where: str, level: str, *words: str):
        assert where in by_where, f"{where} not in {list(by_where)}"
        i = by_where[where]
        assert i.level == level and all(w in i.message for w in words), i

    issue("image 2 (img_002.png)", "error", "not found")
    issue("image 3 (img_003.png)", "error", "unreadable")
    issue("image 4 (img_004.png)", "error", "20x16", "30x16")
    issue("annotation 11 (image 1)", "error", "unknown category", "99")
    issue("annotation 12 (image 1)", "error", "outside")
    issue("annotation 13 (image 1)", "warning", "zero-width box [3, 2, 0, 5]", "skipped")
    issue("annotation 14 (image 1)", "warning", "empty mask", "polygon", "skipped")
    issue("annotation 15 (image 1)", "error", "size")
    issue("annotation 16 (image 1)", "error", "missing", "'segmentation'", "'category_id'")
    issue("annotation 17 (image 77)", "error", "not in 'images'")
    assert "annotation 10 (image 1)" not in by_where and "image 5 (img_005.png)" not in by_where
    assert len(report.issues) == 10 and len(report.errors) == 8 and len(report.warnings) == 2
    assert report.num_images == 5 and report.num_annotations == 9 and report.categories == ["cat", "dog"]
    text = report.summary()
    assert "8 errors, 2 warnings" in text and "image 3 (img_003.png)" in text
    d = report.to_dict()
    assert d["ok"] is False and d["num_errors"] == 8 and len(d["issues"]) == 10
    json.dumps(d)

    # The lenient dataset keeps what is usable; load_dataset refuses and shows the report.
    ds = CocoDataset(root)
    assert ds.image_ids == [1, 5]
    _, t = ds[0]
    assert t["labels"].tolist() == [1]
    with pytest.raises(DatasetError, match="img_003.png"):
        load_dataset(root)


@pytest.mark.parametrize("content, words", [
    (None, "not found"),
    ("{\"images\": [", "malformed JSON"),
    ("[1, 2]", "must be an object"),
    (json.dumps({"images": [], "categories": []}), "missing key 'annotations'"),
    ("{\"images\": " + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("{\"images\": [" + "9" * 5001 + "]}", "malformed JSON"),  # past Python's int digit limit
], ids=["missing", "malformed", "not-an-object", "missing-key", "nested", "long-number"])
def test_fatal_problems_are_report_errors(tmp_path, content, words):
    if content is not None:
        (tmp_path / "annotations.json").write_text(content)
    report = validate_coco(tmp_path)
    assert not report.ok and words in report.errors[0].message and report.errors[0].where == "annotations.json"
    with pytest.raises(DatasetError, match=f"annotations.json: .*{words}") as err:
        CocoDataset(tmp_path)
    assert "\n" not in str(err.value)  # one line, for the CLI and the app alike


@pytest.mark.parametrize("seg", [
    [[-1e5, -1e5, 1e5, -1e5, 1e5, 1e5, -1e5, 1e5]],   # pycocotools walks every edge pixel: 2e8 crashed it
    [[3, 2, 9, 2, 10 ** 400, 7]],                      # an int beyond float's range
    [[3, 2, 9, 2, 9, 7] * 20_000],                     # in the image, but an outline 1000s of images long
])
def test_polygons_pycocotools_cannot_draw_safely_are_errors(tmp_path, seg):
    root = write_coco(tmp_path, [image(1), image(2)], [
        ann(1, 1, seg=seg), ann(2, 2, seg=[[-W, -H, 2 * W, -H, 2 * W, 2 * H]])], CATS)  # one size out: kept
    report = validate_coco(root)
    assert [(i.where, i.level) for i in report.issues] == [("annotation 1 (image 1)", "error")]
    assert "malformed segmentation: polygon" in report.issues[0].message
    with pytest.raises(DatasetError, match=r"annotation 1 \(image 1\)"):
        load_dataset(root)


def test_boxes_and_rles_with_numbers_out_of_range_are_errors(tmp_path):
    root = write_coco(tmp_path, [image(1)], [
        ann(1, 1, bbox=(3, 2, 10 ** 400, 5)),                      # beyond float's range
        ann(2, 1, seg={"size": [H, W], "counts": [10 ** 30]}),      # more pixels than the image has
        ann(3, 1, seg={"size": [10 ** 6, 10 ** 6], "counts": [10 ** 12]}),  # another image's size
    ], CATS)
    report = validate_coco(root)
    assert [(i.where, i.level) for i in report.issues] == [(f"annotation {k} (image 1)", "error") for k in (1, 2, 3)]


def test_ids_must_fit_pycocotools_int64(tmp_path):
    big = 2 ** 63
    root = write_coco(tmp_path, [image(1), {**image(2), "id": big}, image(3)],
                      [ann(big, 1), ann(2, 3, category_id=-big - 1), ann(3, 1)],
                      CATS + [{"id": -big - 1, "name": "cow"}])
    report = validate_coco(root)
    by_where = {i.where: i.message for i in report.errors}
    assert set(by_where) == {f"image {big} (img_002.png)", f"annotation {big} (image 1)",
                             f"category {-big - 1} ('cow')", "annotation 2 (image 3)"}
    assert all("64" in m for m in list(by_where.values())[:3])
    assert CocoDataset(root).coco.getAnnIds() == [3]  # what is left evaluates


def test_a_file_name_too_long_for_the_file_system_is_an_error(tmp_path):
    root = write_coco(tmp_path, [image(1), {**image(2), "file_name": "x" * 300 + ".png"}], [ann(1, 1)], CATS,
                      skip_files=("x" * 300 + ".png",))
    report = validate_coco(root)
    assert [(i.where[:10], i.message) for i in report.errors] == [("image 2 (x", "cannot look up file_name: "
                                                                  "File name too long")]


def test_an_image_that_passes_the_check_but_fails_to_decode_is_one_named_error(tmp_path):
    root = write_coco(tmp_path, [{**image(1), "file_name": "bad.tif"}], [], CATS, skip_files=("bad.tif",))
    buf = io.BytesIO()
    Image.new("RGB", (W, H)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    i = data.index(b"\x11\x01\x04\x00")  # the StripOffsets tag, type LONG
    data[i + 2:i + 4] = b"\x0b\x00"         # as FLOAT: the header verifies, decoding raised a TypeError
    (root / "images" / "bad.tif").write_bytes(bytes(data))
    ds = load_dataset(root)
    with pytest.raises(DatasetError, match=r"^image 1 \(bad.tif\): file is corrupt"):
        ds[0]


def test_dataset_images_are_decoded_as_detect_decodes_them(tmp_path):
    from mrcnn.data import images

    root = write_coco(tmp_path, [image(1), image(2), image(3, w=H, h=W)], [], CATS)
    gradient = np.tile(np.linspace(0, 65535, W).astype(np.uint16), (H, 1))
    Image.fromarray(gradient).save(root / "images" / "img_001.png")        # 16-bit grey
    rgba = np.zeros((H, W, 4), np.uint8)                                    # fully transparent black
    Image.fromarray(rgba).save(root / "images" / "img_002.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                                         # "rotate 90 CW to display"
    Image.fromarray(np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)).save(
        root / "images" / "img_003.png", exif=exif.tobytes())                # stored 20x16, shown 16x20
    ds = load_dataset(root)
    for i in range(3):
        pixels = ds[i][0].mul(255).round().byte().permute(1, 2, 0).numpy()
        detect = images.load_image(root / "images" / ds.file_name(i)).array
        assert np.array_equal(pixels, detect), ds.file_name(i)
    assert ds[1][0].min() == 1.0  # transparent is white, as Detect shows it

    (root / "annotations.json").write_text(json.dumps({"images": [image(3)], "annotations": [],
                                                        "categories": CATS}))  # the stored size
    assert validate_coco(root).errors[0].message == ("image is 16x20 pixels after its EXIF orientation but "
                                                     "annotations.json says 20x16: images/img_003.png")


def test_an_exif_orientation_that_keeps_the_size_is_one_note_and_annotations_follow_the_image_as_shown(
        tmp_path, caplog):
    """Orientations 2-4 (mirrored, turned 180°) keep width and height, so annotations.json cannot tell in which
    frame its annotations were drawn: they are read as drawn on the image as shown (detectron2's reading), and
    the report says so in one note naming the images, which the CLI prints; nothing is left out."""
    from mrcnn.data.sources import open_data

    root = write_coco(tmp_path, [image(1), image(2), image(3), image(4, w=H, h=W)],
                      [ann(1, 1, seg=[[0, 0, 8, 0, 8, H, 0, H]], bbox=(0, 0, 8, H))], CATS)
    stored = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    for i, orientation in ((1, 3), (2, 2), (4, 6)):  # 6 swaps the sides: annotations.json's size tells
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(root / "images" / f"img_{i:03d}.png", exif=exif.tobytes())
    report = validate_coco(root)
    assert report.ok and not report.warnings and report.to_dict()["num_notes"] == 1
    assert str(report.notes[0]) == (
        "note: images: 2 images carry an EXIF orientation that keeps the size (img_001.png (turned 180°), "
        "img_002.png (mirrored)): annotations are read as drawn on the image as shown, turned as the tag says "
        "(as detectron2 reads them); if they were drawn on the pixels as stored, remove the tag")
    assert f"  {report.notes[0]}" in report.summary().splitlines()
    assert report.summary().splitlines()[0].endswith("0 errors, 0 warnings, 1 note")
    with caplog.at_level("WARNING", logger="mrcnn"):
        ds = open_data(str(root))
    assert [r.getMessage() for r in caplog.records] == [f"{root}: {report.notes[0].where}: {report.notes[0].message}"]
    assert len(ds) == 4
    pixels, target = ds[0]
    assert np.array_equal(pixels.mul(255).round().byte().permute(1, 2, 0).numpy(), stored[::-1, ::-1])
    assert target["masks"][0][:, :8].all() and not target["masks"][0][:, 8:].any()  # on the image as shown


def test_degenerate_annotations_never_reach_torchvision(tmp_path):
    from tests.helpers import tiny_loaded

    root = write_coco(tmp_path, [image(1, w=64, h=64)], [
        ann(1, 1, seg=[[10, 10, 40, 10, 40, 30, 10, 30]], bbox=(10, 10, 30, 20)),
        ann(2, 1, seg=[[5, 5, 5, 5, 5, 5]], bbox=(5, 5, 0, 0)),          # a point
        ann(3, 1, seg=[[50, 50, 55, 50, 55, 55]], bbox=(50, 50, 1e-9, 5)),  # hair-thin: x1 == x0 in float32
        ann(4, 1, seg=compressed_rle(np.zeros((64, 64), np.uint8)), bbox=(1, 1, 5, 5)),  # empty RLE
        ann(5, 1, category_id=2, seg=[[60, 60, 63.5, 60, 63.5, 63.5]], bbox=(60, 60, 4.4, 4.4)),  # rounding
    ], CATS)
    ds = CocoDataset(root, categories=["__background__", "circle", "square", "triangle", "cat", "dog"])
    assert [w.where for w in ds.report.warnings] == [f"annotation {i} (image 1)" for i in (2, 3, 4)]
    assert [w.message for w in ds.report.warnings] == [
        "zero-size box [5, 5, 0, 0], skipped", "zero-width box [50, 50, 1e-09, 5], skipped",
        "empty mask: its RLE sets no pixel, skipped"]
    assert ds.report.ok
    image_, target = ds[0]
    assert target["boxes"].tolist() == [[10, 10, 40, 30], [60, 60, 64, 64]]
    loaded = tiny_loaded(categories=ds.categories)
    loaded.model.train()
    torch.manual_seed(0)
    losses = loaded.model([image_], [target])
    assert all(torch.isfinite(v) for v in losses.values())


def test_skipped_annotations_are_in_the_report_for_the_app(tmp_path):
    """What the CLI prints as warning lines the report holds: one ValidationIssue per skipped annotation."""
    root = write_coco(tmp_path, [image(1)], [
        ann(1, 1), ann(7, 1, bbox=(3, 2, 0, 5)), ann(8, 1, seg=[[4, 4, 4, 4, 4, 4]], bbox=None)], CATS)
    report = validate_coco(root)
    assert report.ok and report.to_dict()["num_warnings"] == 2
    assert str(report.warnings[0]) == "warning: annotation 7 (image 1): zero-width box [3, 2, 0, 5], skipped"
    assert str(report.warnings[1]).startswith("warning: annotation 8 (image 1): empty mask: its polygon encloses "
                                              "no pixel (points that coincide or lie on one line")


def test_coco_ground_truth_evaluates(tmp_path):
    from pycocotools.cocoeval import COCOeval

    root = write_coco(tmp_path, [image(1), image(2)], [
        ann(1, 1), ann(2, 2, category_id=2, seg=compressed_rle(RECT)),
        ann(3, 2, seg=uncompressed_rle(1 - RECT), bbox=(0, 0, W, H), iscrowd=1)], CATS)
    ds = CocoDataset(root)
    coco = ds.coco
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "bbox": a["bbox"], "score": 0.9} for a in coco.loadAnns(coco.getAnnIds()) if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- zips

def zip_folder(zip_path: Path, folder: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
        zf.writestr("__MACOSX/._annotations.json", b"resource fork")
    return zip_path


@pytest.mark.parametrize("prefix", ["", "my-dataset/"])
def test_zip_of_the_layout_loads(tmp_path, prefix):
    src = write_coco(tmp_path / "src", [image(1), image(2)], [ann(1, 1)], CATS)
    z = zip_folder(tmp_path / "data.zip", src, prefix)
    ds = load_dataset(z, categories=["__background__", "dog", "cat"], extract_to=tmp_path / "x")
    assert len(ds) == 2 and ds.root == tmp_path / "x" / prefix
    assert ds[0][1]["labels"].tolist() == [2]


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt",
                                  "..\\evil.txt"])
def test_zip_escaping_the_folder_is_refused(tmp_path, name):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("annotations.json", "{}")
        zf.writestr(name, "pwned")
    dest = tmp_path / "out" / "inner"
    with pytest.raises(DatasetError, match="unsafe path"):
        safe_extract_zip(z, dest)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (dest / "annotations.json").exists(), "nothing is extracted from a bad zip"
    with pytest.raises(DatasetError, match="unsafe path"):
        load_dataset(z, extract_to=dest)


def test_zip_symlink_and_size_limits(tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("images/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="symbolic link"):
        safe_extract_zip(z, tmp_path / "a")

    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations.json", b" " * 5000)
    with pytest.raises(DatasetError, match="more than"):
        safe_extract_zip(z, tmp_path / "b", max_bytes=1000)

    z = tmp_path / "noann.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/images/x.png", b"")
        zf.writestr("b/annotations.json", b"{}")
    with pytest.raises(DatasetError, match="no annotations.json"):
        safe_extract_zip(z, tmp_path / "c")

    (tmp_path / "fake.zip").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="neither"):
        load_dataset(tmp_path / "fake.zip")
    with pytest.raises(DatasetError, match="not a readable zip"):
        safe_extract_zip(tmp_path / "fake.zip", tmp_path / "d")


def damaged_zip(path: Path, damage: str) -> Path:
    """A dataset zip that Python's zipfile or the file system cannot take as it is."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations.json", json.dumps({"images": [], "annotations": [], "categories": CATS}))
        if damage == "utf-8 flag":
            zf.writestr("images/zz.png", b"")
        elif damage == "file and folder":
            zf.writestr("images/x", b"a file")
            zf.writestr("images/x/y.png", b"under a file")
        elif damage == "long name":
            zf.writestr("images/" + "y" * 300 + "/a.png", b"")
    data = bytearray(path.read_bytes())
    if damage == "deflate data":
        data[30 + len("annotations.json")] = 0xFF  # its first block: an invalid block type
    elif damage == "utf-8 flag":
        data = data.replace(b"images/zz.png", b"images/\xff\xfe.png")
        central = data.rindex(b"images/\xff\xfe.png") - 46  # its central directory entry
        data[central + 9] |= 0x08                           # flag bit 11: the name is UTF-8
    elif damage == "zip version":
        central = data.index(b"PK\x01\x02")
        data[central + 6] = 0x70  # "version needed to extract": 11.2
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage, words", [
    ("deflate data", "cannot extract 'annotations.json': Error -3 while decompressing"),
    ("utf-8 flag", "marked UTF-8 but is not valid UTF-8"),
    ("zip version", "not a readable zip file: zip file version 11.2 is not supported"),
    ("file and folder", "'images/x' is a file but 'images/x/y.png' needs it to be a folder"),
    ("long name", "longer than 255 bytes"),
])
def test_a_zip_that_cannot_be_unpacked_is_one_line_naming_it_and_leaves_nothing(tmp_path, monkeypatch, damage,
                                                                                 words):
    z = damaged_zip(tmp_path / "bad.zip", damage)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(DatasetError) as err:
        load_dataset(z)
    assert str(err.value).startswith("bad.zip") and words in str(err.value) and "\n" not in str(err.value)
    assert list(temp.iterdir()) == []


def test_errors_in_a_zipped_dataset_name_the_zip_not_the_folder_it_was_unpacked_into(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    src = write_coco(tmp_path / "src", [image(1), image(2)], [ann(1, 1)], CATS, skip_files=("img_002.png",))
    with pytest.raises(DatasetError) as err:
        load_dataset(zip_folder(tmp_path / "data.zip", src, "d/"))
    assert str(err.value).splitlines()[1].startswith("data.zip/d: 2 images")
    assert "image file not found: images/img_002.png" in str(err.value) and str(temp) not in str(err.value)


def test_images_beside_annotations_json_are_unpacked_into_images(tmp_path):
    src = write_coco(tmp_path / "src", [image(1), image(2)], [ann(1, 1)], CATS)
    for f in (src / "images").iterdir():
        f.rename(src / f.name)
    (src / "images").rmdir()
    root = safe_extract_zip(zip_folder(tmp_path / "flat.zip", src), tmp_path / "x")
    assert sorted(p.name for p in (root / "images").iterdir()) == ["img_001.png", "img_002.png"]
    assert len(load_dataset(root)) == 2


def test_a_zip_folder_lives_as_long_as_its_dataset(tmp_path, monkeypatch):
    src = write_coco(tmp_path / "src", [image(1)], [ann(1, 1)], CATS)
    z = zip_folder(tmp_path / "data.zip", src)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ds = load_dataset(z)
    assert [p.name.startswith("mrcnn-dataset-") for p in temp.iterdir()] == [True]
    assert ds[0][1]["labels"].tolist() == [1]  # the files are there while the dataset is
    del ds
    gc.collect()
    assert list(temp.iterdir()) == []

    bad = tmp_path / "bad.zip"  # refused after unpacking: the folder goes at once
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("annotations.json", json.dumps({"images": [image(1)], "annotations": [], "categories": CATS}))
    with pytest.raises(DatasetError, match="img_001.png"):
        load_dataset(bad)
    assert list(temp.iterdir()) == []
