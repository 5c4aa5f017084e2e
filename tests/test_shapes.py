"""Synthetic shapes: determinism, every class, holes, occlusion, boxes, writer, CLI, on-the-fly dataset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.cli import main
from mrcnn.data.coco import load_dataset
from mrcnn.errors import DatasetError
from mrcnn.data.shapes import (DEFAULT_CLASSES, SHAPE_NAMES, ShapesDataset, ShapeSpec, _shape_mask, compose,
                          generate_scene, random_shapes, write_dataset)
from mrcnn.data.sources import open_data, parse_shapes_spec



def flat(h: int = 96, w: int = 96, colour=(40, 40, 40)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def extent(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_same_seed_same_scene_other_seed_other_scene():
    a, b = generate_scene(7, size=96), generate_scene(7, size=96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.labels == b.labels and np.array_equal(a.boxes, b.boxes)
    c = generate_scene(8, size=96)
    assert not np.array_equal(a.image, c.image)


def test_scene_contract():
    for seed in range(25):
        s = generate_scene(seed, size=96, classes=SHAPE_NAMES)
        n = len(s.labels)
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (n, 96, 96) and s.masks.dtype == bool
        assert s.boxes.shape == (n, 4) and s.boxes.dtype == np.float32
        assert 1 <= n <= 8 and set(s.labels) <= set(SHAPE_NAMES)
        assert s.masks.sum(0).max() <= 1, "visible masks must not overlap"
        for m, box in zip(s.masks, s.boxes):
            assert m.sum() >= 30
            assert box.tolist() == extent(m), "box is the visible mask's pixel-inclusive extent"
            assert max(box[2] - box[0], box[3] - box[1]) <= 0.4 * 96 + 2


def test_max_objects_and_small_images():
    for seed in range(10):
        assert 1 <= len(generate_scene(seed, size=48, max_objects=2)) <= 2


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_every_class_renders(name):
    image, masks, labels = compose([ShapeSpec(name, 48, 48, 30, angle=0.3, colour=(250, 10, 10))], flat())
    assert labels == [name] and masks.shape == (1, 96, 96)
    area = masks[0].sum()
    # Between a triangle's and a full disc's share of the circumscribed circle (star is the thinnest).
    assert 0.25 * np.pi * 30 ** 2 < area <= np.pi * 31 ** 2
    assert (image[masks[0]] == (250, 10, 10)).all() and (image[~masks[0]] == 40).all()
    only = generate_scene(3, size=96, classes=(name,))
    assert set(only.labels) == {name}


def test_shapes_differ_from_each_other():
    masks = {n: compose([ShapeSpec(n, 48, 48, 30, angle=0.3)], flat())[1][0] for n in SHAPE_NAMES}
    for a in SHAPE_NAMES:
        for b in SHAPE_NAMES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 50, (a, b)


def test_ring_has_a_hole():
    _, masks, _ = compose([ShapeSpec("ring", 48, 48, 30, hole=0.5)], flat())
    ring = masks[0]
    assert not ring[48, 48], "the centre is the hole"
    assert ring[48, 48 + 22] and ring[48 - 22, 48]
    x0, y0, x1, y1 = extent(ring)
    assert abs((x1 - x0) - 60) <= 2 and abs((y1 - y0) - 60) <= 2
    hole = ~ring[30:66, 30:66]
    assert hole[18, 18] and hole.sum() > 0.8 * np.pi * 14 ** 2


def test_ring_hole_shows_what_is_below():
    # A circle under the ring's hole stays visible through it.
    image, masks, labels = compose([ShapeSpec("circle", 48, 48, 8, colour=(0, 255, 0)),
                                    ShapeSpec("ring", 48, 48, 30, hole=0.5, colour=(0, 0, 255))], flat())
    assert labels == ["circle", "ring"]
    assert masks[0][48, 48] and not masks[1][48, 48]
    assert tuple(image[48, 48]) == (0, 255, 0)


def test_occlusion_removes_hidden_part_and_drops_hidden_objects():
    square = ShapeSpec("square", 40, 40, 25, angle=np.pi / 4, colour=(255, 0, 0))  # axis-aligned
    circle = ShapeSpec("circle", 60, 40, 15, colour=(0, 0, 255))
    _, full_square, _ = compose([square], flat())
    _, full_circle, _ = compose([circle], flat())
    image, masks, labels = compose([square, circle], flat())
    assert labels == ["square", "circle"]
    assert np.array_equal(masks[0], full_square[0] & ~full_circle[0]), "the hidden part left the square's mask"
    assert np.array_equal(masks[1], full_circle[0]), "the top shape is whole"
    assert not (masks[0] & masks[1]).any()
    assert tuple(image[40, 60]) == (0, 0, 255)

    # Hidden entirely, or all but a sliver: dropped.
    small = ShapeSpec("triangle", 40, 40, 10)
    _, masks, labels = compose([small, ShapeSpec("square", 40, 40, 30, angle=np.pi / 4)], flat())
    assert labels == ["square"] and len(masks) == 1
    big = ShapeSpec("circle", 40, 40, 20)
    cover = ShapeSpec("square", 42, 40, 26, angle=np.pi / 4)  # leaves a thin crescent of the circle
    _, masks, labels = compose([big, cover], flat())
    assert labels == ["square"]


BG_MEAN = np.array([120.0, 130.0, 140.0], np.float32)


def assert_colours_apart(specs: list[ShapeSpec], bg_mean: np.ndarray = BG_MEAN) -> int:
    """Every shape differs by >= 110 in L1 (out of 765) from the background and from each earlier shape it
    may touch; returns how many such pairs there were."""
    pairs = 0
    for i, a in enumerate(specs):
        assert np.abs(np.subtract(a.colour, bg_mean)).sum() >= 110
        for b in specs[:i]:
            if np.hypot(a.cx - b.cx, a.cy - b.cy) < a.r + b.r:
                pairs += 1
                assert np.abs(np.subtract(a.colour, b.colour, dtype=float)).sum() >= 110, (a, b)
    return pairs


def test_overlapping_shapes_have_colours_apart():
    """A shape painted over one of nearly its colour is labelled but cannot be seen: every pair of shapes
    that may touch differs by >= 110 in L1 (out of 765), as each shape does from the background."""
    pairs = sum(assert_colours_apart(random_shapes(np.random.default_rng(seed), 256, DEFAULT_CLASSES, 8, BG_MEAN))
                for seed in range(300))
    assert pairs > 200  # the scenes do overlap


def nested_fraction(specs: list[ShapeSpec], size: int = 256) -> tuple[int, int]:
    """(shapes lying wholly inside an earlier one, shapes after the first)."""
    full = [_shape_mask(s.name, s.cx, s.cy, s.r, s.angle, s.hole, size, size) for s in specs]
    inside = sum(any((full[k] & ~full[j]).sum() == 0 for j in range(k)) for k in range(1, len(specs)))
    return inside, len(specs) - 1


def test_nested_places_shapes_inside_earlier_ones_in_a_colour_that_shows():
    counts = {}
    for nested in (0.0, 0.5):
        inside = total = 0
        for seed in range(150):
            specs = random_shapes(np.random.default_rng(seed), 256, SHAPE_NAMES, 8, BG_MEAN, nested)
            i, t = nested_fraction(specs)
            inside, total = inside + i, total + t
            assert all(a.r >= 6 - 1e-6 for a in specs)  # no shape below the 12-px minimum, nested or not
            assert_colours_apart(specs)
        counts[nested] = inside / total
    # by chance hardly any shape is wholly inside another; with 0.5 most hosts with room get one
    assert counts[0.0] < 0.03 and counts[0.5] > 0.25, counts


def test_overlap_places_shapes_across_earlier_ones():
    rates = {}
    for overlap in (0.0, 1.0):
        across = total = 0
        for seed in range(200):
            specs = random_shapes(np.random.default_rng(seed), 256, DEFAULT_CLASSES, 8, BG_MEAN, overlap=overlap)
            for k, a in enumerate(specs[1:], 1):
                assert a.r <= a.cx <= 256 - a.r and a.r <= a.cy <= 256 - a.r  # still inside the image
                total += 1
                across += any(np.hypot(a.cx - b.cx, a.cy - b.cy) < 0.9 * (a.r + b.r) + 1e-6 for b in specs[:k])
        rates[overlap] = across / total
    assert rates[0.0] < 0.6 and rates[1.0] == 1.0, rates


def test_zero_probabilities_draw_the_same_scenes_and_nested_shapes_are_labelled():
    for seed in range(5):
        a, b = generate_scene(seed, 96), generate_scene(seed, 96, nested=0.0, overlap=0.0)
        assert np.array_equal(a.image, b.image) and a.labels == b.labels
    ds = ShapesDataset(40, seed=3, size=128, nested=1.0)
    found = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert np.all(scene.masks.sum(0) <= 1) and all(m.sum() >= 30 for m in scene.masks)
        # a nested shape's box lies inside another object's box
        boxes = scene.boxes
        for k in range(len(boxes)):
            found += any(j != k and np.all(boxes[k][:2] >= boxes[j][:2]) and np.all(boxes[k][2:] <= boxes[j][2:])
                         for j in range(len(boxes)))
    assert found >= 20


def test_nested_in_data_specs_and_cli(tmp_path, capsys):
    assert parse_shapes_spec("shapes:10:1:64:nested=0.25") == {"num": 10, "seed": 1, "size": 64, "nested": 0.25}
    assert parse_shapes_spec("shapes:10:1:64:circle,ring:nested=1:overlap=0.3") == {
        "num": 10, "seed": 1, "size": 64, "classes": ("circle", "ring"), "nested": 1.0, "overlap": 0.3}
    ds = open_data("shapes:3:0:64:nested=0.5:overlap=0.25")
    assert (ds.nested, ds.overlap) == (0.5, 0.25)
    for spec, message in [("shapes:3:0:64:nesting=0.5", "unknown option 'nesting'"),
                          ("shapes:3:0:64:nested=lots", "nested is a probability"),
                          ("shapes:3:0:64:nested=1.5", "between 0 and 1"),
                          ("shapes:3:0:64:overlap=-0.1", "overlap must be a probability")]:
        with pytest.raises(DatasetError, match=message):
            open_data(spec)
    out = tmp_path / "nested"
    assert main(["shapes", "--out", str(out), "--num", "3", "--size", "64", "--nested", "0.5", "--overlap", "0.2"]) == 0
    info = json.loads((out / "annotations.json").read_text())["info"]
    assert (info["nested"], info["overlap"]) == (0.5, 0.2)
    capsys.readouterr()
    assert main(["shapes", "--out", str(out), "--num", "3", "--nested", "2"]) == 2
    err = capsys.readouterr().err
    assert "between 0 and 1" in err and len(err.strip().splitlines()) == 1


def test_unknown_class_is_named():
    with pytest.raises(DatasetError, match="'pentagon'"):
        generate_scene(0, classes=("circle", "pentagon"))


def test_write_dataset_and_on_the_fly_dataset_agree(tmp_path):
    out = write_dataset(tmp_path / "ds", 3, seed=2, size=64, classes=("ring", "star"))
    data = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["ring", "star"] and [c["id"] for c in data["categories"]] == [1, 2]
    assert sorted(p.name for p in (out / "images").iterdir()) == [i["file_name"] for i in data["images"]]
    ann = data["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
    coco = load_dataset(out)
    shapes = ShapesDataset(3, seed=2, size=64, classes=("ring", "star"))
    for i in range(3):
        (ci, ct), (si, st) = coco[i], shapes[i]
        assert torch.allclose(ci, si)
        assert torch.equal(ct["masks"], st["masks"]) and torch.equal(ct["labels"], st["labels"])
        assert torch.equal(ct["boxes"], st["boxes"]) and torch.equal(ct["image_id"], st["image_id"])
        assert torch.equal(ct["area"], st["area"])
    # Datasets with different seeds do not share scenes.
    other = ShapesDataset(3, seed=3, size=64, classes=("ring", "star"))
    assert not any(torch.equal(shapes[i][0], other[j][0]) for i in range(3) for j in range(3))


def test_shapes_dataset_items_and_category_order():
    cats = ["__background__", "triangle", "square", "circle", "star"]
    ds = ShapesDataset(4, seed=1, size=64, categories=cats)
    assert len(ds) == 4 and ds.categories == cats
    for i in range(4):
        image, t = ds[i]
        scene = ds.scene(i)
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert t["masks"].dtype == torch.uint8 and t["labels"].dtype == torch.int64
        assert [cats[k] for k in t["labels"]] == scene.labels
        assert t["iscrowd"].tolist() == [0] * len(scene) and t["image_id"].item() == i + 1
    with pytest.raises(DatasetError, match="'circle'"):
        ShapesDataset(2, categories=["__background__", "square", "triangle"])


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["shapes", "--out", str(out), "--num", "5", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "5 images" in printed and len(printed.strip().splitlines()) == 1
    ds = load_dataset(out)
    assert len(ds) == 5 and ds.categories == ["__background__", *DEFAULT_CLASSES] and ds.report.ok
    image, target = ds[4]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len(target["masks"]) >= 1

    assert main(["shapes", "--out", str(out), "--num", "2", "--classes", "circle,blob"]) == 2
    err = capsys.readouterr().err
    assert "'blob'" in err and len(err.strip().splitlines()) == 1


def test_shapes_refuses_an_out_folder_that_holds_files(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["shapes", "--out", str(out), "--num", "3", "--size", "32"]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["shapes", "--out", str(out), "--num", "2", "--size", "32", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already holds files (annotations.json, images); write the dataset to a new or " \
                  "empty folder\n"
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not mixed with another
    (tmp_path / "file").write_text("mine")
    assert main(["shapes", "--out", str(tmp_path / "file"), "--num", "2", "--size", "32"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    empty = tmp_path / "empty"  # e.g. a server-made temporary folder: used, and keeps its permissions
    empty.mkdir(mode=0o700)
    assert write_dataset(empty, 2, size=32) == empty and len(load_dataset(empty)) == 2
    assert empty.stat().st_mode & 0o777 == 0o700 and sorted(os.listdir(tmp_path)) == ["empty", "file", "shapes"]


def test_a_dataset_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "new" / "shapes"
    saved = []
    real_save = Image.Image.save

    def fail_on_the_second_image(image, path, *args, **kwargs):
        saved.append(Path(path))
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fail_on_the_second_image)
    with pytest.raises(DatasetError, match=f"cannot write {out}: No space left on device"):
        write_dataset(out, 3, size=32)
    assert os.listdir(tmp_path) == []  # no half dataset, no temporary folder, no parent folder it made
    assert saved[0].parent.parent != out  # the images went to a temporary folder, not straight to their name
    monkeypatch.undo()
    progress = []
    write_dataset(out, 3, size=32, progress=lambda done, num: progress.append(os.listdir(tmp_path / "new")))
    assert all(names == [] or names[0].startswith(".shapes.") for names in progress)  # not in place until done
    assert sorted(os.listdir(tmp_path / "new")) == ["shapes"] and len(load_dataset(out)) == 3
    (tmp_path / "made_by_mkdir").mkdir()
    assert out.stat().st_mode == (tmp_path / "made_by_mkdir").stat().st_mode  # not a temporary folder's 0700


@pytest.mark.parametrize("kwargs, words", [
    ({"num": 8, "size": 100_000}, "image size (px) must be a whole number from 32 to 2,048, got 100000"),
    ({"num": 8, "size": 16}, "image size (px) must be a whole number from 32"),
    ({"num": 1_000_000_000_000}, "number of images must be a whole number from 1 to 10,000,000"),
    ({"num": 0}, "number of images"),
    ({"num": 8, "seed": 2**40}, "seed must be a whole number from 0 to 4,294,967,295"),
    ({"num": 8, "seed": -1}, "seed"),
    ({"num": 8, "max_objects": 10**9}, "max_objects"),
])
def test_sizes_counts_and_seeds_are_bounded_before_any_work(tmp_path, kwargs, words):
    with pytest.raises(DatasetError) as err:
        ShapesDataset(**kwargs)
    assert words in str(err.value)
    if "max_objects" not in kwargs:
        with pytest.raises(DatasetError) as err:
            write_dataset(tmp_path / "out", **kwargs)
        assert words in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, words", [
    ("shapes:8:0:100000", "image size"),
    ("shapes:1000000000000:0:128", "number of images"),
    ("shapes:8:99999999999:64", "seed"),
])
def test_data_specs_name_the_field_out_of_range(spec, words):
    with pytest.raises(DatasetError) as err:
        open_data(spec)
    assert str(err.value).startswith(f"shapes data spec {spec!r}: {words}")
