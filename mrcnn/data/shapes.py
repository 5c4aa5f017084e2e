"""Synthetic shapes: scenes deterministic by seed, a COCO writer and an on-the-fly dataset.

    python -m mrcnn shapes --out data/shapes --num 200 --seed 0 --size 256 --classes circle,square,triangle

A scene is a background (flat, gradient, noise, stripes or checks) with 1..max_objects shapes painted
in order, so later shapes hide earlier ones. The masks are the *visible* parts (they never overlap);
an object whose visible part is under ~15% of its full area or under 30 px is dropped (its remnant
pixels stay in the image, unlabelled, as in real data). Boxes are the visible mask's extent,
pixel-inclusive: ``x1 = max_x + 1``. Mild blur and noise come last. ``nested=P`` and ``overlap=P``
(for training data) place each shape inside, or across the edge of, an earlier one with probability P.
Scene ``i`` of a dataset with seed ``s`` is ``generate_scene(scene_seed(s, i))``, both in
``write_dataset`` and ``ShapesDataset``.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from mrcnn.data.masks import encode_rle, masks_to_boxes
from mrcnn.errors import DatasetError
from mrcnn.files import removing_new_empty_folders

SHAPE_NAMES = ("circle", "square", "triangle", "star", "hexagon", "ring")
DEFAULT_CLASSES = ("circle", "square", "triangle")

MIN_OBJECT_PX = 12           # smallest shape diameter
MAX_OBJECT_FRACTION = 0.4    # largest shape diameter, as a fraction of the image size
MIN_VISIBLE_FRACTION = 0.15  # occluded objects keeping less than this of their area are dropped
MIN_VISIBLE_PX = 30          # ... as are those with fewer visible pixels than this
# Inradius / circumradius: a shape whose circumcircle lies within this circle lies inside the host.
# No ring: its hole would show through.
_INRADIUS = {"circle": 1.0, "square": math.cos(math.pi / 4), "triangle": math.cos(math.pi / 3),
             "hexagon": math.cos(math.pi / 6), "star": 0.45 * math.cos(math.pi / 5)}
_SEED_STRIDE = 1_000_003     # scene i of dataset seed s: s * stride + i (datasets don't overlap)

# Limits on what a user may ask for: a 100,000 px scene would allocate 37 GiB before the first shape,
# and a dataset of 10^12 scenes makes the training sampler's permutation alone 8 TB.
MIN_SIZE, MAX_SIZE = 32, 2048        # px per side
MAX_SCENES = 10_000_000              # the bundled model's recipe draws from 1,000,000
MAX_SEED = 2 ** 32 - 1
MAX_OBJECTS = 100


@dataclass
class Scene:
    """One synthetic image and its instances (visible parts only)."""

    image: np.ndarray   # (H, W, 3) uint8
    masks: np.ndarray   # (N, H, W) bool, pairwise disjoint
    labels: list[str]   # N shape names
    boxes: np.ndarray   # (N, 4) float32 xyxy, pixel-inclusive extent of each mask

    def __len__(self) -> int:
        return len(self.labels)


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in a dataset generated with ``seed``."""
    return int(seed) * _SEED_STRIDE + int(index)


def check_classes(classes: Sequence[str] | str) -> tuple[str, ...]:
    """Shape names as a tuple; a comma string is split. Unknown or repeated names -> DatasetError."""
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    classes = tuple(classes)
    if not classes:
        raise DatasetError(f"no shape classes given; choose from {', '.join(SHAPE_NAMES)}")
    unknown = [c for c in classes if c not in SHAPE_NAMES]
    if unknown:
        raise DatasetError(f"unknown shape class(es) {', '.join(map(repr, unknown))}; "
                           f"choose from {', '.join(SHAPE_NAMES)}")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"shape classes repeated in {', '.join(classes)}")
    return classes


# ---------------------------------------------------------------------------------------- drawing

def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    a = angle + np.arange(n) * (2 * np.pi / n)
    return list(zip((cx + r * np.cos(a)).tolist(), (cy + r * np.sin(a)).tolist()))


def _star(cx: float, cy: float, r: float, angle: float, inner: float = 0.45) -> list[tuple[float, float]]:
    a = angle + np.arange(10) * (np.pi / 5)
    rr = np.where(np.arange(10) % 2 == 0, r, r * inner)
    return list(zip((cx + rr * np.cos(a)).tolist(), (cy + rr * np.sin(a)).tolist()))


def _shape_mask(name: str, cx: float, cy: float, r: float, angle: float, hole: float,
                h: int, w: int) -> np.ndarray:
    """Full (unoccluded) mask of one shape, bool (h, w). ``r`` is the circumradius."""
    canvas = Image.new("1", (w, h))
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        ri = r * hole
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r, 4, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, angle), fill=1)
    elif name == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, angle), fill=1)
    elif name == "star":
        draw.polygon(_star(cx, cy, r, angle), fill=1)
    else:  # pragma: no cover - guarded by check_classes
        raise DatasetError(f"unknown shape {name!r}")
    return np.asarray(canvas)  # mode "1" -> bool array


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (ys (size, 1), xs (1, size)) as float32, shared and read-only."""
    ys = np.arange(size, dtype=np.float32)[:, None]
    ys.flags.writeable = False
    xs = ys.reshape(1, size)
    return ys, xs


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background: flat, gradient, noise, stripes or checks (moderate contrast)."""
    kind = int(rng.integers(5))
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    # The second colour stays near the first so that textures don't look like objects.
    c2 = np.clip(c1 + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
    if kind == 0:  # flat
        return np.broadcast_to(c1.astype(np.uint8), (size, size, 3)).copy()
    ys, xs = _grid(size)
    if kind == 1:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = xs * math.cos(a) + ys * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    elif kind == 2:  # smooth noise: a coarse random grid upsampled
        k = int(rng.integers(3, 9))
        coarse = (rng.random((k, k)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255
    elif kind == 3:  # stripes at a random angle
        period = float(rng.uniform(6, max(8.0, size / 6)))
        a = rng.uniform(0, np.pi)
        t = np.floor((xs * math.cos(a) + ys * math.sin(a)) / period) % 2
    else:  # checks
        period = float(rng.uniform(6, max(8.0, size / 6)))
        t = (np.floor(xs / period) + np.floor(ys / period)) % 2
    return (c1 + (c2 - c1) * t[..., None]).astype(np.uint8)


def _object_colour(rng: np.random.Generator, neighbours: Sequence[np.ndarray]) -> np.ndarray:
    """A colour that stands out from each of ``neighbours`` (the background's mean colour and the shapes
    it overlaps): the first of a few tries at L1 distance >= 120 from all of them, else the farthest.

    Without the shapes it overlaps, a square painted on a circle of nearly its colour was labelled but
    could not be seen (a human could not find it either)."""
    refs = np.stack([np.asarray(c, np.float32) for c in neighbours])
    best, best_d = None, -1.0
    for _ in range(16):
        c = rng.uniform(0, 255, 3)
        d = float(np.abs(c - refs).sum(1).min())
        if d > best_d:
            best, best_d = c, d
        if d >= 120:
            break
    return best.astype(np.uint8)


@dataclass
class ShapeSpec:
    """One shape to paint: centre, circumradius and rotation in pixels/radians, colour RGB."""

    name: str
    cx: float
    cy: float
    r: float
    angle: float = 0.0
    colour: tuple[int, int, int] = (255, 255, 255)
    hole: float = 0.5  # ring only: hole radius / outer radius


def compose(shapes: Sequence[ShapeSpec], background: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paint ``shapes`` in order on ``background`` (H, W, 3) uint8 -> (image, visible masks, labels).

    Later shapes hide earlier ones; masks (N, H, W) bool are the visible parts. Shapes keeping less than
    MIN_VISIBLE_FRACTION of their area or fewer than MIN_VISIBLE_PX pixels are dropped (their remnant
    pixels stay in the image).
    """
    h, w = background.shape[:2]
    # owner[y, x] = index of the shape painted last at that pixel, -1 for background: painting in
    # order makes later shapes hide earlier ones, and visible masks are owner == k (never overlapping).
    owner = np.full((h, w), -1, np.int16)
    palette = np.zeros((max(len(shapes), 1), 3), np.uint8)
    full_area = np.zeros(len(shapes), np.int64)
    for k, s in enumerate(shapes):
        m = _shape_mask(s.name, s.cx, s.cy, s.r, s.angle, s.hole, h, w)
        owner[m] = k
        full_area[k] = np.count_nonzero(m)
        palette[k] = s.colour
    visible_area = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]
    keep = np.flatnonzero((visible_area >= MIN_VISIBLE_PX) & (visible_area >= MIN_VISIBLE_FRACTION * full_area))
    masks = owner[None] == keep[:, None, None].astype(np.int16)  # (N, H, W)
    painted = (owner >= 0)[..., None]
    image = np.where(painted, np.take(palette, owner, axis=0, mode="clip"), background)
    return image, masks, [shapes[k].name for k in keep]


def _inside(rng: np.random.Generator, hosts: Sequence[ShapeSpec], r_min: float) -> tuple[float, float, float] | None:
    """Centre and circumradius of a shape that lies wholly inside one of ``hosts`` (picked at random
    among those with room for a shape of radius ``r_min``), or None when none has room."""
    room = [(h, _INRADIUS[h.name] * h.r) for h in hosts if h.name in _INRADIUS]
    room = [(h, inr) for h, inr in room if 0.7 * inr >= r_min]
    if not room:
        return None
    host, inr = room[int(rng.integers(len(room)))]
    r = float(np.exp(rng.uniform(np.log(r_min), np.log(0.7 * inr))))
    # anywhere in the host's incircle shrunk by r, uniform over the disc
    rho, phi = (inr - r) * math.sqrt(float(rng.random())), float(rng.uniform(0, 2 * np.pi))
    return host.cx + rho * math.cos(phi), host.cy + rho * math.sin(phi), r


def _across(rng: np.random.Generator, hosts: Sequence[ShapeSpec], r: float, size: int) -> tuple[float, float]:
    """Centre for a shape of radius ``r`` that covers part of one of ``hosts`` (at 30-90% of the distance
    at which the two would just touch), kept inside the image."""
    host = hosts[int(rng.integers(len(hosts)))]
    rho, phi = float(rng.uniform(0.3, 0.9)) * (host.r + r), float(rng.uniform(0, 2 * np.pi))
    lo, hi = min(r, size / 2), max(size - r, size / 2)
    return float(np.clip(host.cx + rho * math.cos(phi), lo, hi)), float(np.clip(host.cy + rho * math.sin(phi), lo, hi))


def random_shapes(rng: np.random.Generator, size: int, classes: Sequence[str], max_objects: int,
                  bg_mean: np.ndarray, nested: float = 0.0, overlap: float = 0.0) -> list[ShapeSpec]:
    """1..max_objects shapes: random class, log-uniform diameter 12 px..40% of size, inside the image,
    each a colour that stands out from the background and from the earlier shapes it overlaps.

    With ``nested`` > 0, each shape after the first is, with that probability, placed wholly inside an
    earlier one (a small square on a large circle): left to chance that is 2% of the objects, too few
    for a model to learn. Else, with probability ``overlap``, it is placed across the edge of an earlier
    one, hiding part of it (shapes over 40% hidden are 4% by chance). With both 0 it draws exactly the
    scenes it always drew."""
    d_max = MAX_OBJECT_FRACTION * size
    d_min = min(float(MIN_OBJECT_PX), d_max)
    shapes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        name = classes[int(rng.integers(len(classes)))]
        r = float(np.exp(rng.uniform(np.log(d_min), np.log(d_max)))) / 2  # log-uniform: as many small as large
        cx, cy = rng.uniform(r, size - r, 2)
        if nested > 0 and shapes and rng.random() < nested:
            placed = _inside(rng, shapes, d_min / 2)
            if placed is not None:
                cx, cy, r = placed
        elif overlap > 0 and shapes and rng.random() < overlap:
            cx, cy = _across(rng, shapes, r, size)
        angle = float(rng.uniform(0, 2 * np.pi))
        hole = float(rng.uniform(0.4, 0.6))
        # it must stand out from the background and from the earlier shapes it may cover or touch
        overlapped = [np.array(o.colour) for o in shapes if math.hypot(o.cx - cx, o.cy - cy) < o.r + r]
        colour = tuple(int(c) for c in _object_colour(rng, [bg_mean, *overlapped]))
        shapes.append(ShapeSpec(name, float(cx), float(cy), r, angle, colour, hole))
    return shapes


def check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise DatasetError(f"{name} must be a probability between 0 and 1, got {value}")
    return float(value)


def check_in_range(name: str, value: int, low: int, high: int) -> int:
    """``value`` as an int if it is a whole number in low..high, else a DatasetError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise DatasetError(f"{name} must be a whole number from {low:,} to {high:,}, got {value!r}")
    return int(value)


def _check_dataset(num: int, seed: int, size: int) -> tuple[int, int, int]:
    return (check_in_range("number of images", num, 1, MAX_SCENES), check_in_range("seed", seed, 0, MAX_SEED),
            check_in_range("image size (px)", size, MIN_SIZE, MAX_SIZE))


def generate_scene(seed: int, size: int = 256, classes: Sequence[str] = DEFAULT_CLASSES,
                   max_objects: int = 8, nested: float = 0.0, overlap: float = 0.0) -> Scene:
    """One synthetic scene, a pure function of its arguments (``np.random.default_rng(seed)``).
    ``nested``, ``overlap``: probabilities that a shape is placed inside or across an earlier one
    (see ``random_shapes``)."""
    classes = check_classes(classes)
    size = check_in_range("image size (px)", size, MIN_SIZE, MAX_SIZE)
    max_objects = check_in_range("max_objects", max_objects, 1, MAX_OBJECTS)
    nested, overlap = check_probability("nested", nested), check_probability("overlap", overlap)
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    bg_mean = background[::8, ::8].reshape(-1, 3).mean(0, dtype=np.float32)
    shapes = random_shapes(rng, size, classes, max_objects, bg_mean, nested, overlap)
    out, masks, labels = compose(shapes, background)
    # Optics then sensor: mild blur (half the scenes), mild noise.
    if rng.random() < 0.5:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.BoxBlur(float(rng.uniform(0.4, 1.0)))))
    sigma = float(rng.uniform(0, 6))
    if sigma > 0.5:
        noise = rng.standard_normal((size, size, 1), dtype=np.float32)  # luminance noise
        noise *= sigma
        noisy = noise + out
        out = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)
    if not out.flags.writeable:  # PIL's buffer
        out = out.copy()
    return Scene(image=np.ascontiguousarray(out), masks=masks, labels=labels, boxes=masks_to_boxes(torch.from_numpy(masks)).numpy())


# ---------------------------------------------------------------------------------------- writing

def write_dataset(out_dir: str | Path, num: int, seed: int = 0, size: int = 256,
                  classes: Sequence[str] = DEFAULT_CLASSES,
                  progress: Callable[[int, int], None] | None = None, nested: float = 0.0,
                  overlap: float = 0.0) -> Path:
    """Write ``num`` scenes as ``out_dir/annotations.json`` + ``out_dir/images/NNNNNN.png`` (docs/datasets.md).

    COCO instances: image ids 1..num, annotation ids from 1, category ids 1..K in the order of
    ``classes``, segmentation as compressed RLE (str counts), bbox xywh, iscrowd 0.
    ``out_dir`` must be new or an empty folder (DatasetError otherwise: two datasets are never mixed). The
    dataset is written in a temporary sibling folder and moved into place when complete, so ``out_dir``
    holds the whole dataset or nothing, also when the writing fails or is interrupted.
    ``progress(done, num)`` is called after each image. ``nested``, ``overlap``: see ``random_shapes``.
    """
    classes = check_classes(classes)
    nested, overlap = check_probability("nested", nested), check_probability("overlap", overlap)
    num, seed, size = _check_dataset(num, seed, size)
    out_dir = Path(out_dir)
    _check_new_or_empty(out_dir)
    with removing_new_empty_folders(out_dir.parent):  # a failure leaves no parent folder it made
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            building = _new_sibling(out_dir)
        except OSError as err:
            raise DatasetError(f"cannot write {out_dir}: {err.strerror or err}") from None
        try:
            _write_scenes(building, num, seed, size, classes, progress, nested, overlap)
            if out_dir.is_dir():  # an empty folder that was there (a server-made temporary one) keeps its permissions
                os.chmod(building, stat.S_IMODE(out_dir.stat().st_mode))
            os.rename(building, out_dir)  # replaces an empty folder; refused if files appeared in it meanwhile
        except BaseException as err:
            shutil.rmtree(building, ignore_errors=True)
            if isinstance(err, OSError):
                held = " (it is no longer empty)" if _holds_files(out_dir) else ""
                raise DatasetError(f"cannot write {out_dir}{held}: {err.strerror or err}") from None
            raise
    return out_dir


def _new_sibling(out_dir: Path) -> Path:
    """A new hidden folder beside ``out_dir`` (mkdir's permissions, as ``out_dir`` would get them)."""
    for _ in range(100):
        folder = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {out_dir}")


def _check_new_or_empty(out_dir: Path) -> None:
    try:
        if not (out_dir.exists() or out_dir.is_symlink()):
            return
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise DatasetError(f"{out_dir} exists and is not a folder; write the dataset to a new or empty folder")
        held = sorted(p.name for p in out_dir.iterdir())
    except OSError as err:
        raise DatasetError(f"cannot read {out_dir}: {err.strerror or err}") from None
    if held:
        raise DatasetError(f"{out_dir} already holds files ({', '.join(held[:3])}{', …' if len(held) > 3 else ''}); "
                           "write the dataset to a new or empty folder")


def _holds_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def _write_scenes(root: Path, num: int, seed: int, size: int, classes: list[str],
                  progress: Callable[[int, int], None] | None, nested: float, overlap: float) -> None:
    images_dir = root / "images"
    images_dir.mkdir()
    cat_ids = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for i in range(num):
        scene = generate_scene(scene_seed(seed, i), size, classes, nested=nested, overlap=overlap)
        file_name = f"{i:06d}.png"
        Image.fromarray(scene.image).save(images_dir / file_name, compress_level=3)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for mask, label, box in zip(scene.masks, scene.labels, scene.boxes):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[label],
                "segmentation": encode_rle(mask), "area": int(mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
            })
        if progress is not None:
            progress(i + 1, num)
    data = {
        "info": {"description": "Mask R-CNN Explorer synthetic shapes", "seed": seed, "size": size,
                 "nested": nested, "overlap": overlap},
        "images": images, "annotations": annotations,
        "categories": [{"id": cat_ids[c], "name": c, "supercategory": "shape"} for c in classes],
    }
    (root / "annotations.json").write_bytes(json.dumps(data).encode("utf-8"))


# ---------------------------------------------------------------------------------------- dataset

class ShapesDataset(torch.utils.data.Dataset):
    """``num`` scenes generated on the fly; items are ``(image, target)`` exactly like ``CocoDataset``.

    image: float32 [3, H, W] in 0..1. target: boxes float32 [N, 4] xyxy, labels int64 [N] (index into
    ``categories``), masks uint8 [N, H, W], image_id int64 scalar (i + 1, as in ``write_dataset``),
    iscrowd int64 [N] (zeros), area float32 [N]. ``categories`` is the model's class list with
    "__background__" at 0 (default ``["__background__", *classes]``); every class must be in it.
    ``transforms(image, target) -> (image, target)`` is applied last. ``nested``, ``overlap``: see
    ``random_shapes``.
    """

    def __init__(self, num: int, seed: int = 0, size: int = 256, classes: Sequence[str] = DEFAULT_CLASSES,
                 categories: Sequence[str] | None = None, transforms: Callable | None = None,
                 max_objects: int = 8, nested: float = 0.0, overlap: float = 0.0):
        self.classes = check_classes(classes)
        self.nested = check_probability("nested", nested)
        self.overlap = check_probability("overlap", overlap)
        self.num, self.seed, self.size = _check_dataset(num, seed, size)
        self.max_objects = check_in_range("max_objects", max_objects, 1, MAX_OBJECTS)
        self.categories = list(categories) if categories is not None else ["__background__", *self.classes]
        missing = [c for c in self.classes if c not in self.categories]
        if missing:
            raise DatasetError(f"shape class(es) {', '.join(map(repr, missing))} not among the model's "
                               f"classes {self.categories[1:]}")
        self._label_index = {name: k for k, name in enumerate(self.categories)}
        self.transforms = transforms

    def __len__(self) -> int:
        return self.num

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.num:
            raise IndexError(f"scene index {i} out of range 0..{self.num - 1}")
        return generate_scene(scene_seed(self.seed, i), self.size, self.classes, self.max_objects,
                              self.nested, self.overlap)

    def __getitem__(self, i: int):
        scene = self.scene(i)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div_(255)
        masks = torch.from_numpy(scene.masks.astype(np.uint8))
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.tensor([self._label_index[n] for n in scene.labels], dtype=torch.int64),
            "masks": masks,
            "image_id": torch.tensor(i + 1, dtype=torch.int64),
            "iscrowd": torch.zeros(len(scene), dtype=torch.int64),
            "area": masks.flatten(1).sum(1).float(),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
