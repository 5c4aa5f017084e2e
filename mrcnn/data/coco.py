"""COCO-format datasets (docs/datasets.md: ``DIR/annotations.json`` + ``DIR/images/``) as training items.

    ds = load_dataset("upload.zip", categories=model.categories)        # DatasetError if any error
    image, target = ds[0]

The checks are mrcnn.data.coco_checks' (``ds.report``: a ValidationReport); a zip is unpacked by
mrcnn.data.zips. Targets never hold an instance that torchvision would reject. Crowd annotations
(``iscrowd: 1``) are left out of training targets by default but kept in ``.coco`` so that evaluation
honours them.

Images are decoded by mrcnn.data.images, as Detect decodes them (EXIF orientation applied, transparency
on white, 16-bit scaled to 8), so a model is trained and evaluated on the pixels Detect shows it.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn.data import images
from mrcnn.data.coco_checks import BACKGROUND, Annotation, ValidationReport, scan_dataset
from mrcnn.data.uploads import naming_upload
from mrcnn.data.zips import safe_extract_zip
from mrcnn.errors import DatasetError, ImageError


def _model_categories(categories: Sequence[str] | None, dataset_names: list[str]) -> list[str]:
    if categories is None:
        return [BACKGROUND, *dataset_names]
    categories = list(categories)
    if not categories or categories[0] != BACKGROUND:
        raise DatasetError(f"the model's class list must start with {BACKGROUND!r}, got {categories[:3]}...")
    return categories


def decode_masks(rles: list[dict], h: int, w: int) -> np.ndarray:
    """Compressed RLEs -> (N, H, W) uint8."""
    if not rles:
        return np.zeros((0, h, w), np.uint8)
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        masks = mask_utils.decode(rles)  # (H, W, N), Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


def load_image(file: str | Path, name: str | None = None) -> torch.Tensor:
    """An image file as float32 [3, H, W] in 0..1, decoded as Detect decodes it (mrcnn.data.images:
    EXIF orientation, transparency on white, high bit depths scaled). DatasetError naming ``name``
    (default: the path) when it cannot be read."""
    try:
        array = images.load_image(file, name=name).array
    except ImageError as err:
        raise DatasetError(str(err)) from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


class CocoDataset(torch.utils.data.Dataset):
    """A COCO instances dataset as Mask R-CNN training items.

    ``ds[i] -> (image float32 [3, H, W] in 0..1, target)``, target: boxes float32 [N, 4] xyxy,
    labels int64 [N] (index into ``categories``), masks uint8 [N, H, W], image_id int64 scalar (the
    COCO image id), iscrowd int64 [N], area float32 [N]. An image without annotations gives N = 0.

    categories: the model's class list, "__background__" first; default: "__background__" then the
        dataset's category names by category id. Categories are matched by name. A dataset category
        the list lacks is a DatasetError, or with ``unknown="drop"`` its annotations are ignored.
    transforms: ``(image, target) -> (image, target)``, applied last (see mrcnn.data.transforms).
    report: a ValidationReport to fill (a new one by default); ``.report`` holds it. Images and
        annotations with errors or warnings are left out; construction only fails when nothing is
        readable (no annotations.json, malformed JSON, missing keys).
    include_crowd: keep crowd annotations in targets (iscrowd=1); default off. ``.coco`` has them always.

    Attributes: ``categories``, ``image_ids``, ``report``, ``coco`` (pycocotools COCO of the valid
    images and annotations, category ids as in the file; built on first use), ``cat_id_to_label`` and
    ``label_to_cat_id`` (COCO category id <-> index into ``categories``).
    """

    def __init__(self, root: str | Path, categories: Sequence[str] | None = None,
                 transforms: Callable | None = None, report: ValidationReport | None = None, *,
                 unknown: str = "error", include_crowd: bool = False, check_files: bool = True):
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        self.root = Path(root)
        self.report = report if report is not None else ValidationReport()
        index = scan_dataset(self.root, self.report, check_files)
        if index is None:
            problems = "; ".join(f"{i.where}: {i.message}" for i in self.report.errors)
            raise DatasetError(f"cannot use dataset {self.root}: {problems}")
        names = [index.categories[k] for k in sorted(index.categories)]
        self.categories = _model_categories(categories, names)
        unknown_ids = [cid for cid in sorted(index.categories) if index.categories[cid] not in self.categories]
        if unknown_ids:
            listed = ", ".join(f"{index.categories[c]!r} (id {c})" for c in unknown_ids)
            if unknown == "error":
                raise DatasetError(f"dataset {self.root} has categories the model does not know: {listed}; "
                                   f"the model's classes are {', '.join(self.categories[1:])}")
            for cid in unknown_ids:
                self.report.warning(f"category {cid} ({index.categories[cid]!r})",
                                    "not among the model's classes; its annotations are ignored")
        self.cat_id_to_label = {cid: self.categories.index(name) for cid, name in index.categories.items()
                                if name in self.categories}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        self.transforms = transforms
        self.include_crowd = include_crowd
        self._images = index.images
        self._raw_images = index.raw_images
        self._all_annotations = {i: [a for a in anns if a.category_id in self.cat_id_to_label]
                                 for i, anns in index.annotations.items()}
        self._dataset_categories = index.categories
        self.image_ids = [i for i, *_ in self._images]
        self._coco = None

    def __len__(self) -> int:
        return len(self._images)

    def file_name(self, i: int) -> str:
        """Item ``i``'s ``file_name`` as annotations.json gives it (to show; the file itself is read from the
        checked path)."""
        return self._images[i][1]

    def image_sizes(self) -> list[tuple[str, int, int]]:
        """(name, height, width) of every item, as annotations.json gives them (checked against the files)."""
        return [(f"image {image_id} ({file_name})", h, w) for image_id, file_name, _, w, h in self._images]

    def annotations(self, i: int) -> list[Annotation]:
        """The valid annotations that go into item ``i``'s target."""
        anns = self._all_annotations[self._images[i][0]]
        return anns if self.include_crowd else [a for a in anns if not a.iscrowd]

    def __getitem__(self, i: int):
        image_id, file_name, file, w, h = self._images[i]
        image = load_image(file, name=f"image {image_id} ({file_name})")
        if tuple(image.shape[1:]) != (h, w):
            raise DatasetError(f"image {image_id} ({file_name}) is {image.shape[2]}x{image.shape[1]} pixels "
                               f"but annotations.json says {w}x{h}")
        anns = self.annotations(i)
        masks = torch.from_numpy(decode_masks([a.rle for a in anns], h, w))
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a.bbox for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a.category_id] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "iscrowd": torch.tensor([a.iscrowd for a in anns], dtype=torch.int64),
            "area": torch.tensor([a.area for a in anns], dtype=torch.float32),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    @property
    def coco(self):
        """pycocotools COCO ground truth of the valid images and annotations (crowd included), for COCOeval."""
        if self._coco is None:
            anns = []
            for image_id, *_ in self._images:
                for a in self._all_annotations[image_id]:
                    anns.append({"id": a.id, "image_id": a.image_id, "category_id": a.category_id,
                                 "segmentation": {"size": a.rle["size"], "counts": a.rle["counts"].decode("ascii")},
                                 "bbox": a.bbox, "area": a.area, "iscrowd": a.iscrowd})
            coco = COCO()
            coco.dataset = {
                "images": [self._raw_images[i] for i in self.image_ids],
                "annotations": anns,
                "categories": [{"id": cid, "name": name} for cid, name in sorted(self._dataset_categories.items())
                               if cid in self.cat_id_to_label],
            }
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco


def load_dataset(path_or_zip: str | Path, categories: Sequence[str] | None = None,
                 extract_to: str | Path | None = None, **kwargs) -> CocoDataset:
    """A CocoDataset from a folder (or its annotations.json) or a .zip of the layout in docs/datasets.md.

    A zip is unpacked with ``safe_extract_zip`` into ``extract_to``, or by default into a new temporary
    folder that lives as long as the dataset: it is removed when the dataset is garbage collected (or
    at exit), and at once when loading fails. Raises DatasetError with the report's summary when it has
    errors. ``kwargs`` go to CocoDataset (transforms, unknown, include_crowd, check_files).
    """
    path = Path(path_or_zip)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as err:  # e.g. a name longer than the file system allows
        raise DatasetError(f"dataset {str(path)[:80]!r}...: {err.strerror}") from None
    if is_dir:
        return _without_errors(CocoDataset(path, categories, **kwargs), path)
    if is_file and path.name == "annotations.json":
        return _without_errors(CocoDataset(path.parent, categories, **kwargs), path)
    if not is_file:
        raise DatasetError(f"dataset not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path} is neither a dataset folder nor a .zip file")
    owns_folder = extract_to is None
    dest = Path(tempfile.mkdtemp(prefix="mrcnn-dataset-")) if owns_folder else Path(extract_to)
    try:
        root = safe_extract_zip(path, dest)
        # Messages name the zip, not the folder it was unpacked into (removed when this fails).
        with naming_upload(path.name, dest):
            ds = _without_errors(CocoDataset(root, categories, **kwargs), path)
        ds.report.root = path.name
    except BaseException:
        if owns_folder:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    if owns_folder:
        weakref.finalize(ds, _remove_folder, dest, os.getpid())
    return ds


def _without_errors(ds: CocoDataset, path: Path) -> CocoDataset:
    if not ds.report.ok:
        raise DatasetError(f"dataset {path} has errors:\n{ds.report.summary()}")
    return ds


def _remove_folder(folder: Path, owner_pid: int) -> None:
    # Only the process that made it: a forked DataLoader worker holds a copy of the dataset too.
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["CocoDataset", "load_dataset", "decode_masks", "load_image", "BACKGROUND"]
