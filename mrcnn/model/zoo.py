"""The model zoo: which models exist, whether their weights are here, and loading them.

Names (docs/checkpoints.md): ``shapes`` (bundled in weights/), ``coco-r50-fpn`` and ``coco-r50-fpn-v2``
(torchvision's COCO weights, found in torch's hub cache, in weights/, or given as a file), the display
names of imported models (models/, mrcnn.model.importer), or a path to a checkpoint. Nothing here downloads on import; ``download_weights`` does, when called.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights

from mrcnn.errors import CheckpointError, MrcnnError, ModelUnavailable
from mrcnn.files import NEW_FILE_MODE, atomic_write_bytes, file_sha256
from mrcnn.inference.precision import choose_precision, combine_fidelity, prepare_model
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import (check_tensors, is_checkpoint, load_checkpoint, load_state_dict_checked,
                                    read_torch_file)

REPO_ROOT = Path(__file__).resolve().parents[2]


def weights_dir() -> Path:
    return Path(os.environ.get("MRCNN_WEIGHTS_DIR", REPO_ROOT / "weights"))


def models_dir() -> Path:
    """Where imported models live, one ``imported-<hash>.pt`` + ``.json`` card each (mrcnn.model.importer)."""
    return Path(os.environ.get("MRCNN_MODELS_DIR", REPO_ROOT / "models"))


def imported_models() -> dict[str, Path]:
    """Display name (from each card) -> checkpoint, for every imported model; the file names are the
    server's, the display names the users'."""
    found = {}
    folder = models_dir()
    for path in sorted(folder.glob("imported-*.pt")) if folder.is_dir() else []:
        name = read_card(path).get("name")
        if isinstance(name, str) and name and name not in found:
            found[name] = path
    return found


def precision_checks_dir() -> Path:
    """Precision checks of models that have no card recording AP per precision (the user's own: imported,
    torchvision's files), one ``<sha256>.json`` per weights file (mrcnn.evaluation.fidelity.check_precisions)."""
    return models_dir() / "precision-checks"


def runs_dir() -> Path:
    """Where training runs started from the app live; their checkpoints join the model list."""
    return Path(os.environ.get("MRCNN_RUNS_DIR", REPO_ROOT / "runs"))


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class TorchvisionEntry:
    arch: str
    weights_enum: object  # torchvision WeightsEnum member: url + categories, no download needed

    @property
    def url(self) -> str:
        return self.weights_enum.url

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def categories(self) -> list[str]:
        return list(self.weights_enum.meta["categories"])


TORCHVISION_MODELS = {
    "coco-r50-fpn": TorchvisionEntry("maskrcnn_resnet50_fpn", MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "coco-r50-fpn-v2": TorchvisionEntry("maskrcnn_resnet50_fpn_v2", MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
BUNDLED = {"shapes": "shapes.pt"}
BUNDLED_ARCH = {"shapes": "light"}  # what --weights given for a bundled model must hold
DEFAULT_MODEL = "shapes"


@dataclass
class ModelInfo:
    """One row of the model list."""

    name: str
    kind: str  # "bundled" | "torchvision" | "imported" | "checkpoint"
    classes: list[str]  # without "__background__"
    available: bool
    path: str | None = None
    reason: str = ""  # why not available, and how to get it
    url: str | None = None  # where the weights can be downloaded from, if anywhere
    card: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _real_classes(categories: list[str]) -> list[str]:
    return [c for c in categories[1:] if c != "N/A"]


def find_torchvision_weights(name: str) -> Path | None:
    entry = TORCHVISION_MODELS[name]
    for folder in (weights_dir(), hub_checkpoint_dir()):
        candidate = folder / entry.filename
        if candidate.is_file():
            return candidate
    return None


def read_card(checkpoint_path: Path) -> dict:
    """The model card beside a checkpoint (<stem>.json), else the checkpoint's own meta."""
    card_path = checkpoint_path.with_suffix(".json")
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, malformed or nested too deeply
            return {}
        return card if isinstance(card, dict) else {}
    return {}


def _precision_check_path(sha256: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):  # the file's name is the server's hash, nothing else
        raise ValueError(f"not a sha256: {sha256!r}")
    return precision_checks_dir() / f"{sha256}.json"


def read_precision_check(sha256: str) -> dict | None:
    """The recorded precision check of the weights with this sha256; None when never checked (or unreadable).
    Keyed by content: a re-written file is a new model; names that point at the same file share the record."""
    path = _precision_check_path(sha256)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def write_precision_check(sha256: str, record: dict) -> Path:
    path = _precision_check_path(sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def _checkpoint_info(name: str, path: Path, kind: str) -> ModelInfo:
    try:
        ckpt = load_checkpoint(path, mmap=True)  # the list needs the metadata, not the weights
    except CheckpointError as err:
        return ModelInfo(name, kind, [], False, str(path), reason=str(err))
    card = read_card(path) or dict(ckpt["meta"])
    return ModelInfo(name, kind, _real_classes(ckpt["categories"]), True, str(path), card=card)


def list_models(include_runs: bool = True) -> list[ModelInfo]:
    """Every model we know of, available or not (with the reason)."""
    infos = []
    for name, filename in BUNDLED.items():
        path = weights_dir() / filename
        if path.is_file():
            infos.append(_checkpoint_info(name, path, "bundled"))
        else:
            infos.append(ModelInfo(name, "bundled", ["circle", "square", "triangle"], False, str(path),
                                   reason=f"{path} is missing; reproduce it with `bash weights/train_shapes.sh`"))
    for name, entry in TORCHVISION_MODELS.items():
        path = find_torchvision_weights(name)
        if path is not None:
            infos.append(ModelInfo(name, "torchvision", _real_classes(entry.categories), True, str(path),
                                   url=entry.url, card={"source": "torchvision", "weights": "COCO_V1"}))
        else:
            infos.append(ModelInfo(
                name, "torchvision", _real_classes(entry.categories), False, None, url=entry.url,
                reason=(f"weights file {entry.filename} not found in {weights_dir()} or {hub_checkpoint_dir()}; "
                        f"download it from {entry.url} (the app has a download button when online) "
                        f"or pass --weights FILE")))
    for name, path in imported_models().items():
        infos.append(_checkpoint_info(name, path, "imported"))
    if include_runs and runs_dir().is_dir():
        for ckpt_path in sorted(runs_dir().glob("*/checkpoint.pt")):
            infos.append(_checkpoint_info(str(ckpt_path), ckpt_path, "checkpoint"))
    return infos


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MrcnnError("--device cuda was asked for, but no CUDA device is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MrcnnError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, on its device. Shared between users: never mutate it."""

    name: str
    model: torch.nn.Module
    categories: list[str]  # index 0 = "__background__"
    arch: dict
    source: str
    sha256: str
    meta: dict
    device: torch.device
    precision: str = "float32"  # what the network stages run in (mrcnn.inference.precision)
    precision_note: str = ""  # why ``auto`` did not pick the device's fast precision, if it did not

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def run_key(self) -> tuple[str, str, str, str]:
        """(name, weights sha256, device, precision): what the network computes with. What is kept of a run
        (a trace, a clip's frames, an evaluation, a run's measured memory) is kept under it."""
        return self.name, self.sha256, str(self.device), self.precision

    @property
    def has_masks(self) -> bool:
        return getattr(self.model.roi_heads, "mask_head", None) is not None


def _from_checkpoint(name: str, path: Path, device: torch.device, arch_name: str | None = None) -> LoadedModel:
    """``arch_name``: the architecture the model ``name`` stands for; a checkpoint of another is refused."""
    ckpt = load_checkpoint(path)
    if arch_name is not None and ckpt["arch"]["name"] != arch_name:
        raise CheckpointError(f"{path}: holds a {ckpt['arch']['name']!r} model, but {name} is a {arch_name!r} "
                              f"model; load the file by its path instead (--model {path})")
    try:
        model = build_model(ckpt["arch"], len(ckpt["categories"]))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build its architecture {ckpt['arch'].get('name')!r}: {err}") from None
    load_state_dict_checked(model, ckpt["state_dict"], path)
    meta = read_card(path) or dict(ckpt["meta"])
    return LoadedModel(name, model.eval().to(device), list(ckpt["categories"]), dict(ckpt["arch"]), str(path),
                       file_sha256(path), meta, device)


def _from_torchvision(name: str, path: Path, device: torch.device) -> LoadedModel:
    entry = TORCHVISION_MODELS[name]
    obj = read_torch_file(path)
    if is_checkpoint(obj):  # a fine-tuned checkpoint given with --weights
        return _from_checkpoint(name, path, device, arch_name=entry.arch)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # torchvision reference-scripts' training checkpoints
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    check_tensors(obj, path)
    categories = entry.categories
    head = obj.get("roi_heads.box_predictor.cls_score.weight")
    if head is not None and head.shape[0] != len(categories):
        categories = ["__background__"] + [f"class {i}" for i in range(1, head.shape[0])]
    model = build_model({"name": entry.arch}, len(categories))
    load_state_dict_checked(model, obj, path)
    return LoadedModel(name, model.eval().to(device), categories, {"name": entry.arch}, str(path),
                       file_sha256(path), {"source": "torchvision", "weights": "COCO_V1"}, device)


def load_model(name: str, weights: str | Path | None = None, device: str | torch.device = "auto",
               precision: str = "float32") -> LoadedModel:
    """Load a model by name or checkpoint path, ready to run in ``precision`` (float32, bfloat16, float16 or
    auto: mrcnn.inference.precision). Raises ModelUnavailable / CheckpointError / MrcnnError with a clear message."""
    dev = resolve_device(device)
    choose_precision(precision, dev)  # a precision the device lacks is refused before the weights are read
    loaded = _load_float32(name, weights, dev)
    fidelity = combine_fidelity(loaded.meta.get("precision_fidelity"), read_precision_check(loaded.sha256))
    choice = choose_precision(precision, dev, fidelity)
    prepare_model(loaded.model, choice.precision)
    loaded.precision, loaded.precision_note = choice.precision, choice.note
    return loaded


def _load_float32(name: str, weights: str | Path | None, dev: torch.device) -> LoadedModel:
    if name in TORCHVISION_MODELS:
        path = Path(weights) if weights else find_torchvision_weights(name)
        if path is None:
            info = next(i for i in list_models(include_runs=False) if i.name == name)
            raise ModelUnavailable(f"{name}: {info.reason}")
        return _from_torchvision(name, path, dev)
    if name in BUNDLED:
        path = Path(weights) if weights else weights_dir() / BUNDLED[name]
        if not path.is_file():
            raise ModelUnavailable(f"{name}: {path} is missing; reproduce it with `bash weights/train_shapes.sh`")
        return _from_checkpoint(name, path, dev, arch_name=BUNDLED_ARCH[name])
    imported = imported_models().get(name)
    if imported is not None:
        return _from_checkpoint(name, Path(weights) if weights else imported, dev)
    path = Path(name)
    if path.suffix in (".pt", ".pth") or path.exists() or os.sep in name:
        return _from_checkpoint(str(path), Path(weights) if weights else path, dev)
    known = ", ".join([*BUNDLED, *TORCHVISION_MODELS, *imported_models()])
    raise MrcnnError(f"unknown model {name!r}: use one of {known} or a checkpoint path")


HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torchvision: the file name carries a sha256 prefix


def download_weights(name_or_url: str, dest_dir: str | Path | None = None,
                     progress: Callable[[int, int | None], None] | None = None, timeout: float = 30.0) -> Path:
    """Download a weights file with a progress callback(done_bytes, total_bytes|None) and torchvision's hash check.

    The bytes stream into a temporary file in the destination folder (hashed on the way, never held in
    memory); it gets its final name only when complete and verified, and is removed on any failure.
    Offline, on a bad hash or when the folder cannot be written, raises ModelUnavailable with the reason.
    """
    url = TORCHVISION_MODELS[name_or_url].url if name_or_url in TORCHVISION_MODELS else name_or_url
    filename = url.rsplit("/", 1)[-1]
    dest = Path(dest_dir) if dest_dir else hub_checkpoint_dir()
    target = dest / filename
    expected = HASH_REGEX.search(filename)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{filename}.", suffix=".tmp")
    except OSError as err:
        raise ModelUnavailable(f"cannot write to {dest}: {err.strerror or err}") from None
    sha, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for block, total in _download_blocks(url, timeout, dest):
                sha.update(block)
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        digest = sha.hexdigest()
        if expected and not digest.startswith(expected.group(1)):
            raise ModelUnavailable(f"downloaded {filename} is corrupt: sha256 {digest[:12]}… does not start with "
                                   f"{expected.group(1)} as its name says; nothing was saved")
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, target)
    except OSError as err:  # the download's own errors are ModelUnavailable already: this is the disk
        Path(tmp).unlink(missing_ok=True)
        raise ModelUnavailable(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _download_blocks(url: str, timeout: float, dest: Path) -> Iterator[tuple[bytes, int | None]]:
    """(block of at most 1 MiB, Content-Length or None) until the end of ``url``; network failures are
    ModelUnavailable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            while block := resp.read(1 << 20):
                yield block, total
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise ModelUnavailable(f"cannot download {url}: {reason} (offline? copy the file to {dest} instead)") from None


__all__ = ["ModelInfo", "LoadedModel", "list_models", "load_model", "download_weights", "resolve_device",
           "TORCHVISION_MODELS", "DEFAULT_MODEL"]
