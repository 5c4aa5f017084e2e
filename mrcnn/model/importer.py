"""Bring in a Mask R-CNN trained elsewhere and make it one of the zoo's models.

    imported = import_model("my_model.pth", classes=["cat", "dog"], name="pets")   # -> models/<id>.pt + .json

Accepted files, all read with ``torch.load(weights_only=True)``:

- a plain ``state_dict`` of torchvision's ``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2``, any
  number of classes;
- the checkpoint dict torchvision's references/detection/train.py writes (``{"model": state_dict, ...}``);
- a state dict saved from DataParallel or DDP (every key prefixed ``module.``);
- this project's own checkpoints (docs/checkpoints.md).

The architecture and the number of classes are read from key names and tensor shapes, never from the file
name: v1 and v2 differ in their box head (``fc6``/``fc7`` vs. four conv layers and one linear layer), the
class count is the box predictor's row count. A state dict does not record the input transform, so the
sizes default to torchvision's (``min_size`` 800, ``max_size`` 1333) unless given.

The imported model is written once into the models folder (``zoo.models_dir()``) under a name the server
makes (a hash of the source file), with a card holding the display name, the source file's sha256, the
architecture and classes; the zoo then lists it under that display name.
A file that is not a Mask R-CNN this can run is refused with the first key or shape that does not fit, and
nothing is written.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mrcnn.errors import CheckpointError
from mrcnn.files import atomic_write_bytes, file_sha256
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import (check_checkpoint, check_tensors, class_name_problem, is_checkpoint, read_torch_file,
                                    save_checkpoint)
from mrcnn.model.zoo import list_models, models_dir, read_card

BACKGROUND = "__background__"
TORCHVISION_DEFAULT_SIZES = {"min_size": 800, "max_size": 1333}
NAME_PUNCTUATION = " -_.+()"  # what a model name may hold besides letters and digits
MAX_NAME_CHARS = 64

# Keys that only one of torchvision's two Mask R-CNN box heads has.
_BOX_HEAD_MARKERS = {
    "roi_heads.box_head.fc6.weight": "maskrcnn_resnet50_fpn",        # TwoMLPHead
    "roi_heads.box_head.0.0.weight": "maskrcnn_resnet50_fpn_v2",     # FastRCNNConvFCHead
}
_CLASS_ROWS = "roi_heads.box_predictor.cls_score.weight"
_MASK_ROWS = "roi_heads.mask_predictor.mask_fcn_logits.weight"


@dataclass(frozen=True)
class ImportedModel:
    """What ``import_model`` wrote: the checkpoint and its card, and the name the zoo lists it under."""

    name: str
    checkpoint: Path
    card: dict
    class_note: str | None  # set when class names were made up (class_1 ...): how to name them


def unwrap_state_dict(obj: Any, source: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside whatever torch.load returned: references-style ``{"model": ...}`` dicts are
    opened, a ``module.`` prefix (DataParallel / DDP) is removed."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected a Mask R-CNN state dict (a dict of tensors), "
                              f"found {type(obj).__name__}")
    not_tensor = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if not_tensor is not None:
        raise CheckpointError(f"{source}: expected a Mask R-CNN state dict of tensors; "
                              f"key {not_tensor!r} holds {type(obj[not_tensor]).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def recognise(state_dict: dict[str, torch.Tensor], source: str | Path) -> tuple[str, int]:
    """(torchvision architecture name, number of classes including the background) from keys and shapes."""
    if not any(k.startswith("roi_heads.") for k in state_dict):
        raise CheckpointError(f"{source}: expected a Mask R-CNN state dict (keys 'backbone.*', 'rpn.*', "
                              f"'roi_heads.*'); the first key is {next(iter(state_dict))!r}")
    if _CLASS_ROWS not in state_dict:
        raise CheckpointError(f"{source}: expected a box predictor ('{_CLASS_ROWS}'); not found")
    if _MASK_ROWS not in state_dict:
        raise CheckpointError(f"{source}: a detector without a mask head (no '{_MASK_ROWS}'): "
                              "a Faster R-CNN, not a Mask R-CNN")
    archs = {arch for key, arch in _BOX_HEAD_MARKERS.items() if key in state_dict}
    if len(archs) != 1:
        raise CheckpointError(f"{source}: expected the box head of maskrcnn_resnet50_fpn "
                              f"('roi_heads.box_head.fc6.weight') or of maskrcnn_resnet50_fpn_v2 "
                              f"('roi_heads.box_head.0.0.weight'); found {'both' if archs else 'neither'}")
    num_classes = int(state_dict[_CLASS_ROWS].shape[0])
    if num_classes < 2 or int(state_dict[_MASK_ROWS].shape[0]) != num_classes:
        raise CheckpointError(f"{source}: the box predictor has {num_classes} classes and the mask predictor "
                              f"{int(state_dict[_MASK_ROWS].shape[0])}; they must agree and count the background")
    return archs.pop(), num_classes


def check_fits(arch: dict, num_classes: int, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every key and shape of the architecture, and nothing else, each a dense real tensor of finite values
    (checkpoint.check_tensors), or the first one that does not fit.
    The model is built on the meta device: no memory for weights that are about to be replaced."""
    with torch.device("meta"):
        own = build_model(arch, num_classes).state_dict()
    for key, tensor in own.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: expected key {key!r} of {arch['name']}; it is missing")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}; "
                                  f"{arch['name']} with {num_classes} classes expects {tuple(tensor.shape)}")
    extra = next((k for k in state_dict if k not in own), None)
    if extra is not None:
        raise CheckpointError(f"{source}: key {extra!r} is not part of {arch['name']}")
    check_tensors(state_dict, source)


def class_names(num_classes: int, source: Path, classes: Sequence[str] | None = None,
                classes_from: str | Path | None = None) -> tuple[list[str], str | None]:
    """The model's categories (background first) and, when they were made up, a note on naming them.

    In order: ``classes``; the categories of a COCO annotations file (sorted by id); a sidecar
    ``<file>.classes.txt`` (one per line) or ``<file>.classes.json`` (a list); else class_1 ... class_N."""
    wanted = num_classes - 1
    origin = "the class names given"  # --classes on the command line, "Class names" in the app
    if classes is None and classes_from is not None:
        classes, origin = _coco_category_names(Path(classes_from)), str(classes_from)
    if classes is None:
        for sidecar in (Path(f"{source}.classes.txt"), Path(f"{source}.classes.json")):
            if sidecar.is_file():
                classes, origin = _sidecar_names(sidecar), str(sidecar)
                break
    if classes is None:
        note = (f"the file does not name its {wanted} classes: they are class_1 ... class_{wanted}; "
                f"name them when adding it (--classes a,b,... or --classes-from annotations.json on the command line)")
        return [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)], note
    names = [str(c).strip() for c in classes]
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if len(names) != wanted:
        raise CheckpointError(f"{source}: the model has {wanted} classes (besides the background) "
                              f"but {len(names)} names came from {origin}")
    for i, name in enumerate(names, 1):
        # "N/A" marks the unused ids of torchvision's COCO models: the pages leave it out of every class list
        problem = class_name_problem(name) or ("is 'N/A', which marks an unused class id" if name == "N/A" else None)
        if problem is not None:
            raise CheckpointError(f"{origin}: class name {i} {problem}")
    repeated = next((n for i, n in enumerate(names) if n in names[:i] or n == BACKGROUND), None)
    if repeated is not None:
        raise CheckpointError(f"{origin}: class names must be distinct; {repeated!r} is named more than once")
    return [BACKGROUND, *names], None


def _coco_category_names(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        return [str(c["name"]) for c in categories]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path.name}: cannot read the class names: {type(err).__name__}: {err}") from None
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path.name}: expected COCO 'categories' with 'id' and 'name'") from None


def _sidecar_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            names = json.loads(text)
            if not isinstance(names, list):
                raise ValueError("expected a JSON list of names")
            return [str(n) for n in names]
        return [line.strip() for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path.name}: cannot read the class names: {err}") from None


def _display_name(name: str | None, source: Path) -> str:
    """A name to list the model under: shown only, never part of a path. Letters, digits, spaces and
    ``- _ . + ( )``, a letter or digit first: a name with a slash was listed as a training run (whose names
    are their checkpoints' paths), one starting with '-' was read as a flag by the trainer's command line,
    and one with brackets showed as a Markdown link or image on every session's pages."""
    name = (name if name is not None else source.stem).strip()
    if not (0 < len(name) <= MAX_NAME_CHARS and name[0].isalnum()
            and all(ch.isalnum() or ch in NAME_PUNCTUATION for ch in name)):
        raise CheckpointError(f"a model name must be 1 to {MAX_NAME_CHARS} letters, digits, spaces or "
                              f"{' '.join(NAME_PUNCTUATION.strip())}, starting with a letter or digit; got {name!r}")
    return name


def import_model(path: str | Path, classes: Sequence[str] | None = None, classes_from: str | Path | None = None,
                 name: str | None = None, min_size: int | None = None, max_size: int | None = None,
                 dest_dir: str | Path | None = None, display_file_name: str | None = None) -> ImportedModel:
    """Check ``path`` and write it as a checkpoint + card into ``dest_dir`` (default: models_dir()).

    ``display_file_name``: the name the user knows the file by (an upload's), used in messages and the card
    instead of a temporary path."""
    path = Path(path)
    shown = display_file_name or path.name
    try:
        obj = read_torch_file(path)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace(str(path), shown)) from None
    if is_checkpoint(obj):
        if (classes is not None or classes_from is not None) and isinstance(obj.get("categories"), list) \
                and obj["categories"]:
            # the user's names replace the file's: a file whose own names are unusable (repeated) can be renamed
            obj = dict(obj, categories=class_names(len(obj["categories"]), Path(shown), classes, classes_from)[0])
        # the file read once, not twice; its weights' values are checked with the shapes (check_fits)
        own = check_checkpoint(obj, shown, values=False)
        arch, categories, state_dict = dict(own["arch"]), list(own["categories"]), own["state_dict"]
        note = None
    else:
        state_dict = unwrap_state_dict(obj, shown)
        arch_name, num_classes = recognise(state_dict, shown)
        arch = {"name": arch_name, **TORCHVISION_DEFAULT_SIZES}
        try:  # the file's own path finds its sidecar class lists; messages name it as the user knows it
            categories, note = class_names(num_classes, path, classes, classes_from)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(str(path), shown)) from None
    for key, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None:
            if not isinstance(value, int) or not 32 <= value <= 4096:
                raise CheckpointError(f"--{key.replace('_', '-')} must be an integer from 32 to 4096, got {value}")
            arch[key] = value
    if arch.get("min_size") is not None and arch.get("max_size") is not None:
        largest = max(arch["min_size"]) if isinstance(arch["min_size"], (list, tuple)) else arch["min_size"]
        if largest > arch["max_size"]:  # torchvision would cap the scale at max_size without a word
            raise CheckpointError(f"the minimum size ({largest} px) must not be above the maximum size "
                                  f"({arch['max_size']} px)")
    check_fits(arch, len(categories), state_dict, shown)

    sha = file_sha256(path)
    dest = Path(dest_dir) if dest_dir is not None else models_dir()
    stem = f"imported-{sha[:16]}"  # the server's name: the same file imported twice is one model
    display = _display_name(name, Path(shown))
    already = read_card(dest / f"{stem}.pt").get("name")
    if already not in (None, display):  # renaming it would take the model away from whoever uses that name
        raise CheckpointError(f"{shown} is imported already, as the model {already!r}; use that one")
    if display in {i.name for i in list_models(include_runs=False)} - {already}:
        raise CheckpointError(f"a model named {display!r} exists already; give this one another name")
    card = {
        "name": display,
        "source": {"file": shown, "sha256": sha},
        "architecture": arch,
        "classes": categories[1:],
        "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    checkpoint = save_checkpoint(dest / f"{stem}.pt", arch, categories, state_dict,
                                 {"source": "import", "imported_from": card["source"]})
    atomic_write_bytes(dest / f"{stem}.json", (json.dumps(card, indent=2) + "\n").encode())
    return ImportedModel(card["name"], checkpoint, card, note)


__all__ = ["ImportedModel", "import_model", "recognise", "unwrap_state_dict", "check_fits",
           "class_names"]
