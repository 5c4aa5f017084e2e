"""Checks of a COCO-format dataset folder (docs/datasets.md: ``DIR/annotations.json`` + ``DIR/images/``).

    report = validate_coco("data/pets", categories=model.categories)   # every problem, named
    print(report.summary())

Problems are sorted in two levels. *Errors* make the data wrong (missing or unreadable image, malformed
JSON or missing keys, an id beyond 64 bits, too many pixels, unknown category, box outside the image,
malformed segmentation, a polygon point more than one image size outside the image): the offending
image or annotation is left out, and ``load_dataset`` (mrcnn.data.coco) refuses a dataset that has any.
*Warnings* name an annotation that is skipped but leaves the data usable (zero-width box, empty mask):
``report.warnings`` lists them, one ValidationIssue each, and ``open_data`` logs them (the CLI prints them
as ``warning: ...`` lines). *Notes* (``report.notes``) say how something was read that a person may not
expect (images an EXIF orientation mirrors or turns 180°); nothing is left out, and they are logged too.
``scan_dataset`` returns the valid part, which CocoDataset reads from: no instance in it is one torchvision
would reject.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from mrcnn.data.images import MAX_PIXELS_ENV, max_pixels_from_env
from mrcnn.errors import reason
from mrcnn.model.checkpoint import class_name_problem

BACKGROUND = "__background__"   # class 0 of every model: no dataset category may take its name
MIN_BOX_SIDE = 1.0              # px; narrower boxes are degenerate (as for v2.SanitizeBoundingBoxes)
BOX_TOLERANCE = 1.0             # px a box may stick out of the image (rounding) before it is an error
_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED_IMAGE = ("id", "file_name", "width", "height")
_REQUIRED_ANNOTATION = ("id", "image_id", "category_id", "segmentation")
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
_EXIF_ORIENTATION = 0x0112
# Orientations that keep width and height, so annotations.json's sizes cannot tell whether its annotations
# were drawn on the image as shown or as stored: they are read as shown, as detectron2 reads them.
_SAME_SIZE_TURNS = {2: "mirrored", 3: "turned 180°", 4: "flipped upside down"}
# pycocotools rasterises a polygon by walking every edge pixel by pixel (its memory grows with the edge
# length; ±2e8 crashed the process). A point more than one image size beyond an edge is no drawing
# mistake but coordinates of another image or scale, and bounding them bounds that walk.
POLYGON_MARGIN = 1.0            # image widths/heights a polygon point may lie outside the image
MAX_POLYGON_PERIMETER = 100     # times (width + height): far more than any outline, bounds the walk too


# ---------------------------------------------------------------------------------------- report

@dataclass
class ValidationIssue:
    level: str    # "error" | "warning" | "note"
    where: str    # "annotations.json", "category 3 ('dog')", "image 17 (img_017.png)", "annotation 45 (image 17)"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


@dataclass
class ValidationReport:
    """Everything found wrong with a dataset, each issue naming the image or annotation concerned."""

    issues: list[ValidationIssue] = field(default_factory=list)
    num_images: int = 0          # image entries in annotations.json
    num_annotations: int = 0     # annotation entries in annotations.json
    categories: list[str] = field(default_factory=list)  # dataset category names, by category id
    num_crowd: int = 0           # valid crowd annotations (kept for evaluation, not trained on)
    num_unannotated: int = 0     # valid images without any valid annotation
    root: str = ""

    def error(self, where: str, message: str) -> None:
        self.issues.append(ValidationIssue("error", where, message))

    def warning(self, where: str, message: str) -> None:
        self.issues.append(ValidationIssue("warning", where, message))

    def note(self, where: str, message: str) -> None:
        self.issues.append(ValidationIssue("note", where, message))

    @property
    def errors(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def notes(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.level == "note"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, max_issues: int = 20) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        cats = f" ({', '.join(self.categories)})" if self.categories else ""
        head = (f"{self.root + ': ' if self.root else ''}{self.num_images} images, {self.num_annotations} "
                f"annotations, {len(self.categories)} categories{cats}; "
                f"{n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)}"
                + (f", {len(self.notes)} note{'s' * (len(self.notes) != 1)}" if self.notes else ""))
        # Errors first: they are what stops the dataset from loading.
        shown = (self.errors + self.warnings + self.notes)[:max_issues]
        lines = [head] + [f"  {issue}" for issue in shown]
        if len(self.issues) > len(shown):
            lines.append(f"  ... and {len(self.issues) - len(shown)} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, num_errors=len(self.errors), num_warnings=len(self.warnings), num_notes=len(self.notes))
        return d



# ---------------------------------------------------------------------------------------- scanning

@dataclass
class Annotation:
    id: int
    image_id: int
    category_id: int
    rle: dict           # compressed RLE, counts bytes
    bbox: list[float]   # xywh, clipped to the image
    area: float
    iscrowd: int


@dataclass
class DatasetIndex:
    categories: dict[int, str]                 # id -> name, valid ones only
    images: list[tuple[int, str, Path, int, int]]   # (id, file_name, file, width, height), valid ones only
    annotations: dict[int, list[Annotation]]  # image id -> valid annotations
    raw_images: dict[int, dict]                # id -> the JSON entry (for .coco)


class _Bad(Exception):
    """A malformed value (an error in the report)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    """An integer pycocotools can hold: COCOeval keeps ids in int64 arrays."""
    return _is_int(v) and INT64_MIN <= v <= INT64_MAX


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range
        return False


def _rle_string_counts(s: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString, with bounds checks)."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise _Bad("compressed RLE counts string is truncated")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise _Bad(f"compressed RLE counts has an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _to_rle(seg: Any, h: int, w: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE (bytes counts).

    Raises _Bad for a malformed one. Polygons with fewer than 3 points are left out (pycocotools would
    read a 4-number polygon as a box); if none is left the mask is empty.
    """
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise _Bad(f"RLE 'size' must be [height, width], got {size!r}")
        if size != [h, w]:
            raise _Bad(f"RLE size {size} does not match the image's [height, width] [{h}, {w}]")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                raise _Bad("uncompressed RLE counts must be non-negative integers")
            runs = counts
        elif isinstance(counts, str):
            runs = _rle_string_counts(counts)
            if any(c < 0 for c in runs):
                raise _Bad("compressed RLE counts decode to negative run lengths")
        else:
            raise _Bad(f"RLE 'counts' must be a list or a string, got {type(counts).__name__}")
        if sum(runs) != h * w:  # pycocotools would read or write past the mask otherwise
            raise _Bad(f"RLE run lengths add up to {sum(runs)}, not height*width = {h * w}")
        if isinstance(counts, str):
            return {"size": [h, w], "counts": counts.encode("ascii")}
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(seg, list):
        if seg and all(_is_number(v) for v in seg):  # one flat polygon, as some exporters write it
            seg = [seg]
        polys = []
        for poly in seg:
            if not (isinstance(poly, list) and all(_is_number(v) for v in poly)):
                raise _Bad("polygon segmentation must be a list of lists of numbers")
            if len(poly) % 2:
                raise _Bad(f"polygon has an odd number of coordinates ({len(poly)})")
            if len(poly) >= 6:
                polys.append(_bounded_polygon(poly, h, w))
        if not polys:
            return mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    raise _Bad(f"segmentation must be polygons (list) or RLE (dict), got {type(seg).__name__}")


def _bounded_polygon(poly: list, h: int, w: int) -> list[float]:
    """The polygon as floats; _Bad when a point lies more than POLYGON_MARGIN image sizes outside the
    image or its outline is longer than pycocotools should walk."""
    xy = np.asarray(poly, np.float64).reshape(-1, 2)
    lo = -POLYGON_MARGIN * np.array([w, h])
    hi = (1 + POLYGON_MARGIN) * np.array([w, h])
    outside = np.flatnonzero(((xy < lo) | (xy > hi)).any(axis=1))
    if outside.size:
        x, y = xy[outside[0]]
        raise _Bad(f"polygon point ({x:g}, {y:g}) is more than one image size outside the {w}x{h} image")
    perimeter = np.abs(np.diff(xy, axis=0, append=xy[:1])).max(axis=1).sum()
    if perimeter > MAX_POLYGON_PERIMETER * (w + h):
        raise _Bad(f"polygon outline is {perimeter:.0f} px long, more than {MAX_POLYGON_PERIMETER}x the "
                   f"image's width + height")
    return xy.ravel().tolist()


def _image_where(entry: Any, j: int) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"image {entry['id']} ({entry.get('file_name', '?')})"
    return f"image #{j} in the list"


def _check_image_file(file: Path, width: int, height: int) -> tuple[str | None, int]:
    """(None if the file is an image of the stated size (after its EXIF orientation, as mrcnn.data.images
    reads it), else what is wrong; its EXIF orientation, 1 when it has none)."""
    orientation = 1
    try:
        with Image.open(file) as img:
            size, orientation = img.size, _exif_orientation(img)
        with Image.open(file) as img:  # verify() must come first after opening
            img.verify()  # checksums / structure without decoding all pixels
    except FileNotFoundError:
        return "image file not found", 1
    except UnidentifiedImageError:
        return "unreadable image: not an image file (unrecognised format)", 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable image: {reason(err)}", 1
    turned = orientation in (5, 6, 7, 8)  # these swap width and height
    if turned:
        size = size[::-1]
    if size != (width, height):
        oriented = " after its EXIF orientation" if turned else ""
        return f"image is {size[0]}x{size[1]} pixels{oriented} but annotations.json says {width}x{height}", orientation
    return None, orientation


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1-8) as ImageOps.exif_transpose reads it; 1 when there is none or it is
    unreadable (the image is then used as stored there too)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # an eXIf chunk after the pixels is found only by decoding them: not for a check
    try:
        value = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - malformed EXIF is common and never refuses the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _find_image_file(root: Path, rel: Path) -> Path:
    """The file a file_name names: under images/, or else under the dataset folder itself."""
    file = root / "images" / rel
    if not file.is_file() and (root / rel).is_file():
        file = root / rel  # some exports give paths relative to the dataset folder
    return file


def scan_dataset(root: Path, report: ValidationReport, check_files: bool = True) -> DatasetIndex | None:
    """Check a dataset folder, filling ``report``; return the valid part, or None when nothing is usable."""
    report.root = str(root)
    ann_file = root / "annotations.json"
    if not root.is_dir():
        report.error(str(root), "dataset folder not found")
        return None
    if not ann_file.is_file():
        report.error("annotations.json", f"not found in {root}")
        return None
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        report.error("annotations.json", f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})")
        return None
    except RecursionError:  # the decoder recurses once per [ or {: a hostile file exhausts the stack
        report.error("annotations.json", "nested too deeply")
        return None
    except (UnicodeDecodeError, OSError) as err:
        report.error("annotations.json", f"cannot read: {err}")
        return None
    except ValueError as err:  # an integer longer than Python converts (sys.get_int_max_str_digits())
        report.error("annotations.json", f"malformed JSON: {str(err).split(';')[0]}")
        return None
    if not isinstance(data, dict):
        report.error("annotations.json", f"top level must be an object, got {type(data).__name__}")
        return None
    for key in _REQUIRED_TOP:
        if key not in data:
            report.error("annotations.json", f"missing key '{key}'")
        elif not isinstance(data[key], list):
            report.error("annotations.json", f"'{key}' must be a list, got {type(data[key]).__name__}")
    if not report.ok:
        return None
    report.num_images, report.num_annotations = len(data["images"]), len(data["annotations"])

    # Categories: ids may be any distinct integers; names must be distinct (matching is by name).
    categories: dict[int, str] = {}
    for j, c in enumerate(data["categories"]):
        where = f"category {c.get('id')} ({c.get('name')!r})" if isinstance(c, dict) else f"category #{j}"
        if not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str) \
                or not c["name"].strip():
            report.error(where, "a category needs an integer 'id' (64-bit) and a non-empty 'name'")
        elif c["id"] in categories:
            report.error(where, f"duplicate category id {c['id']}")
        elif class_name_problem(c["name"]) is not None:
            report.error(where, f"the category name {class_name_problem(c['name'])}")
        elif c["name"] in categories.values():
            report.error(where, f"duplicate category name {c['name']!r}")
        elif c["name"] == BACKGROUND:
            report.error(where, f"{BACKGROUND!r} is reserved for the model's background class")
        else:
            categories[c["id"]] = c["name"]
    report.categories = [categories[k] for k in sorted(categories)]

    max_pixels = max_pixels_from_env()
    images: list[tuple[int, str, Path, int, int]] = []
    raw_images: dict[int, dict] = {}
    same_size_turns: list[str] = []  # "file (how)" of images an EXIF orientation turns without a size change
    seen_ids: set = set()
    for j, e in enumerate(data["images"]):
        where = _image_where(e, j)
        if not isinstance(e, dict):
            report.error(where, "an image entry must be an object")
            continue
        missing = [k for k in _REQUIRED_IMAGE if k not in e]
        if missing:
            report.error(where, f"missing key(s) {', '.join(map(repr, missing))}")
            continue
        if not _is_id(e["id"]):
            report.error(where, f"image id must be an integer that fits in 64 bits, got {e['id']!r}")
            continue
        if e["id"] in seen_ids:
            report.error(where, f"duplicate image id {e['id']}")
            continue
        seen_ids.add(e["id"])
        w, h, name = e["width"], e["height"], e["file_name"]
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            report.error(where, f"width and height must be positive integers, got {w!r} x {h!r}")
            continue
        if w * h > max_pixels:  # Detect's limit; it also bounds every mask decoded for this image
            report.error(where, f"image has too many pixels ({w}x{h}; the limit is {max_pixels:,}, "
                                f"raise it with {MAX_PIXELS_ENV})")
            continue
        if not isinstance(name, str) or not name:
            report.error(where, "file_name must be a non-empty string")
            continue
        rel = Path(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", name):
            report.error(where, "file_name must be relative to images/ and stay inside it")
            continue
        try:
            file = _find_image_file(root, rel)
        except OSError as err:  # e.g. a name longer than the file system allows
            report.error(where, f"cannot look up file_name: {reason(err)}")
            continue
        if check_files:
            problem, orientation = _check_image_file(file, w, h)
            if problem:
                report.error(where, f"{problem}: {file.relative_to(root) if file.is_relative_to(root) else file}")
                continue
            if orientation in _SAME_SIZE_TURNS:
                same_size_turns.append(f"{name} ({_SAME_SIZE_TURNS[orientation]})")
        images.append((e["id"], name, file, w, h))
        raw_images[e["id"]] = e
    if same_size_turns:
        n = len(same_size_turns)
        report.note("images", f"{n} image{'s' * (n != 1)} carr{'ies' if n == 1 else 'y'} an EXIF orientation "
                    f"that keeps the size ({', '.join(same_size_turns[:3])}{', …' if n > 3 else ''}): "
                    "annotations are read as drawn on the image as shown, turned as the tag says (as "
                    "detectron2 reads them); if they were drawn on the pixels as stored, remove the tag")
    sizes = {i: (h, w) for i, _, _, w, h in images}

    annotations: dict[int, list[Annotation]] = {i: [] for i, *_ in images}
    named_image_ids = {e["id"] for e in data["images"] if isinstance(e, dict) and _is_int(e.get("id"))}
    seen_ids = set()
    for j, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            report.error(f"annotation #{j} in the list", "an annotation must be an object")
            continue
        where = f"annotation {a.get('id', '#' + str(j))} (image {a.get('image_id', '?')})"
        missing = [k for k in _REQUIRED_ANNOTATION if k not in a]
        if missing:
            report.error(where, f"missing key(s) {', '.join(map(repr, missing))}")
            continue
        bad = [k for k in ("id", "image_id", "category_id") if not _is_id(a[k])]
        if bad:
            report.error(where, f"{', '.join(map(repr, bad))} must be integer(s) that fit in 64 bits")
            continue
        if a["id"] in seen_ids:
            report.error(where, f"duplicate annotation id {a['id']}")
            continue
        seen_ids.add(a["id"])
        if a["image_id"] not in named_image_ids:
            report.error(where, f"refers to image id {a['image_id']!r}, which is not in 'images'")
            continue
        if a["image_id"] not in sizes:
            continue  # its image has an error of its own already
        if a["category_id"] not in categories:
            report.error(where, f"unknown category id {a['category_id']!r} (not in 'categories')")
            continue
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            report.error(where, f"iscrowd must be 0 or 1, got {iscrowd!r}")
            continue
        h, w = sizes[a["image_id"]]
        try:
            rle = _to_rle(a["segmentation"], h, w)
        except _Bad as err:
            report.error(where, f"malformed segmentation: {err}")
            continue
        mask_area = int(mask_utils.area(rle))
        bbox = a.get("bbox")
        if bbox is None:
            if mask_area == 0:  # its box would be [0, 0, 0, 0]: name the cause, not the symptom
                report.warning(where, f"{_empty_mask_reason(a['segmentation'])}, skipped")
                continue
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            report.error(where, f"bbox must be [x, y, width, height], got {bbox!r}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        if bw < MIN_BOX_SIDE or bh < MIN_BOX_SIDE:
            report.warning(where, f"{_thin_side(bw, bh)} box {_fmt(bbox)}, skipped")
            continue
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE or y + bh > h + BOX_TOLERANCE:
            report.error(where, f"box {_fmt(bbox)} (x, y, width, height) is outside the {w}x{h} image")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
            report.warning(where, f"{_thin_side(x1 - x0, y1 - y0)} box {_fmt(bbox)} once clipped to the image, skipped")
            continue
        if mask_area == 0:
            report.warning(where, f"{_empty_mask_reason(a['segmentation'])}, skipped")
            continue
        area = float(a["area"]) if _is_number(a.get("area")) else float(mask_area)
        report.num_crowd += int(iscrowd)
        annotations[a["image_id"]].append(Annotation(
            a["id"], a["image_id"], a["category_id"], rle, [x0, y0, x1 - x0, y1 - y0], area, int(iscrowd)))
    report.num_unannotated = sum(1 for anns in annotations.values() if not anns)
    return DatasetIndex(categories, images, annotations, raw_images)


def _fmt(bbox: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in bbox) + "]"


def _thin_side(width: float, height: float) -> str:
    """Which side of a box is under MIN_BOX_SIDE: "zero-width", "zero-height" or "zero-size"."""
    if width < MIN_BOX_SIDE and height < MIN_BOX_SIDE:
        return "zero-size"
    return "zero-width" if width < MIN_BOX_SIDE else "zero-height"


def _empty_mask_reason(segmentation: Any) -> str:
    """Why a well-formed segmentation covers no pixel of its image."""
    if isinstance(segmentation, list):
        return "empty mask: its polygon encloses no pixel (points that coincide or lie on one line, " \
               "fewer than 3 points, or outside the image)"
    return "empty mask: its RLE sets no pixel"



def validate_coco(root: str | Path, categories: Sequence[str] | None = None, unknown: str = "error",
                  check_files: bool = True) -> ValidationReport:
    """Check a dataset folder; never raises for a problem with the data, it is in the report.

    ``categories``: the model's class list ("__background__" first); dataset categories whose name is
    not in it are errors (warnings with ``unknown="drop"``). ``check_files=False`` skips opening images.
    """
    report = ValidationReport()
    index = scan_dataset(Path(root), report, check_files)
    if index is not None and categories is not None:
        model = list(categories)
        for cid in sorted(index.categories):
            name = index.categories[cid]
            if name not in model:
                msg = f"not among the model's classes ({', '.join(model[1:])})"
                if unknown == "drop":
                    report.warning(f"category {cid} ({name!r})", msg + "; its annotations are ignored")
                else:
                    report.error(f"category {cid} ({name!r})", msg)
    return report


__all__ = ["BACKGROUND", "ValidationIssue", "ValidationReport", "Annotation", "DatasetIndex", "scan_dataset",
           "validate_coco", "MIN_BOX_SIDE", "BOX_TOLERANCE"]
