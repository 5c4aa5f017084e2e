"""Take a model away: a plain torchvision state dict, or an ONNX file checked against PyTorch right after.

    report = export_model(loaded, "out/", fmt="onnx", size=(512, 512))   # out/model.onnx, classes.json, README.md
    report.check.max_box_px                                               # what onnxruntime's run differed by

- ``torchvision`` (models of torchvision's architectures): ``model.pt``, a state dict that
  ``maskrcnn_resnet50_fpn(num_classes=N)`` (or ``_v2``) loads with ``strict=True``.
- ``onnx`` (every architecture): ``model.onnx`` for one fixed input size, through torch's TorchScript-based
  exporter (``dynamo=False``: torch.export cannot trace torchvision's detectors yet, vision#9321), opset 17,
  input ``image`` (3, H, W) float32 in [0, 1], outputs ``boxes``, ``labels``, ``scores``, ``masks``.
  Every export is run at once with onnxruntime on three images and compared with the PyTorch model:
  detections matched one to one with the same labels, boxes within 0.5 px, scores within 1e-3 and mask
  IoU ≥ 0.99, or the export fails and leaves nothing.

Both write ``classes.json`` (index = label id, 0 the background) and a README with the lines that load it.
Files appear in the output folder only when complete (written to a temporary folder beside it first).
"""
from __future__ import annotations

import copy
import io
import json
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mrcnn.data.shapes import DEFAULT_CLASSES, SHAPE_NAMES, generate_scene
from mrcnn.errors import ExportError
from mrcnn.files import removing_new_empty_folders
from mrcnn.model.architectures import TORCHVISION_ARCHITECTURES
from mrcnn.model.zoo import LoadedModel

FORMATS = ("torchvision", "onnx")
FILES = {"torchvision": ("model.pt", "classes.json", "README.md"),  # what each format writes in its folder
         "onnx": ("model.onnx", "classes.json", "README.md")}
ONNX_OPSET = 17
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
# What "the same detections" means for an export (issue: boxes 0.5 px, scores 1e-3, mask IoU 0.99).
MAX_BOX_PX, MAX_SCORE_DIFF, MIN_MASK_IOU = 0.5, 1e-3, 0.99
MASK_PROB_TOL = 1e-3
CHECK_SEEDS = (101, 202, 303)


@dataclass(frozen=True)
class ParityCheck:
    """PyTorch against the export on ``images`` images: how far apart the matched detections were."""

    images: int
    detections: int          # detections compared (all matched, or the check failed)
    max_box_px: float
    max_score_diff: float
    min_mask_iou: float
    problem: str | None      # why it failed; None when it held

    @property
    def passed(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class ExportReport:
    format: str
    folder: Path
    files: list[str]
    input_size: tuple[int, int] | None
    check: ParityCheck | None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


def default_input_size(loaded: LoadedModel) -> tuple[int, int]:
    """The model's own test size: a square of its (last) ``min_size``."""
    min_size = loaded.model.transform.min_size
    side = int(min_size[-1] if isinstance(min_size, (list, tuple)) else min_size)
    return side, side


def check_images(loaded: LoadedModel, size: tuple[int, int], num: int = 3) -> list[np.ndarray]:
    """Generated scenes of the shapes the model knows (any scene for other models), cut to ``size``."""
    classes = tuple(c for c in loaded.categories[1:] if c in SHAPE_NAMES) or DEFAULT_CLASSES
    h, w = size
    return [generate_scene(seed, size=max(h, w), classes=classes).image[:h, :w] for seed in CHECK_SEEDS[:num]]


def export_model(loaded: LoadedModel, out_dir: str | Path, fmt: str = "torchvision",
                 size: tuple[int, int] | None = None) -> ExportReport:
    """Write ``loaded`` to ``out_dir`` in ``fmt``; ExportError with the reason when it cannot."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    for name in FILES[fmt]:  # a file there is replaced; a folder cannot be, and would fail after the export
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise ExportError(f"--out {out}: cannot write {name} there: a folder has that name")
    with removing_new_empty_folders(out):  # a failed export leaves no folder it made
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
        try:
            if fmt == "torchvision":
                report = _write_torchvision(loaded, staging)
            else:
                report = _write_onnx(loaded, staging, size or default_input_size(loaded))
            out.mkdir(exist_ok=True)
            for name in report.files:
                (staging / name).replace(out / name)
            return ExportReport(report.format, out, report.files, report.input_size, report.check)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def export_zip(loaded: LoadedModel, fmt: str = "torchvision", size: tuple[int, int] | None = None
               ) -> tuple[bytes, ExportReport]:
    """``export_model`` into a zip held in memory (the app's download); nothing stays on disk."""
    folder = Path(tempfile.mkdtemp(prefix="mrcnn-export-"))
    try:
        report = export_model(loaded, folder / "export", fmt, size)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in report.files:
                zf.write(report.folder / name, name)
        return buf.getvalue(), report
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_classes_and_readme(loaded: LoadedModel, folder: Path, how_to_load: str) -> list[str]:
    (folder / "classes.json").write_text(json.dumps(list(loaded.categories), indent=1) + "\n")
    (folder / "README.md").write_text(
        f"# {loaded.name}, exported by Mask R-CNN Explorer\n\n"
        f"Classes (`classes.json`, index = label id): {', '.join(loaded.categories[1:])}.\n\n"
        f"```python\n{how_to_load}```\n")
    return ["classes.json", "README.md"]


def _write_torchvision(loaded: LoadedModel, folder: Path) -> ExportReport:
    name = loaded.arch.get("name")
    if name not in TORCHVISION_ARCHITECTURES:
        raise ExportError(f"{loaded.name} is a {name!r} model, not one of torchvision's "
                          f"({', '.join(TORCHVISION_ARCHITECTURES)}); export it with --format onnx")
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in loaded.model.state_dict().items()}
    torch.save(state, folder / "model.pt")
    sizes = {k: loaded.arch[k] for k in ("min_size", "max_size") if k in loaded.arch}
    size_args = "".join(f", {k}={v!r}" for k, v in sizes.items())
    how = (f"import json, torch\nfrom torchvision.models.detection import {name}\n\n"
           f"classes = json.load(open(\"classes.json\"))\n"
           f"model = {name}(weights=None, weights_backbone=None, num_classes=len(classes){size_args})\n"
           f"model.load_state_dict(torch.load(\"model.pt\", weights_only=True), strict=True)\n"
           f"model.eval()\n")
    return ExportReport("torchvision", folder, ["model.pt", *_write_classes_and_readme(loaded, folder, how)],
                        None, None)


def _write_onnx(loaded: LoadedModel, folder: Path, size: tuple[int, int]) -> ExportReport:
    h, w = (int(v) for v in size)
    if not (32 <= h <= 4096 and 32 <= w <= 4096):
        raise ExportError(f"the ONNX input size must be 32 to 4096 px a side, got {h}x{w}")
    model = copy.deepcopy(loaded.model).cpu().float().eval()  # the shared model is never touched
    example = torch.from_numpy(check_images(loaded, (h, w), 1)[0]).permute(2, 0, 1).float() / 255
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's TracerWarnings are about torchvision's internals
        try:
            torch.onnx.export(model, ([example],), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=list(OUTPUT_NAMES))
        except Exception as err:  # the exporter raises many kinds; all mean "this model did not export"
            raise ExportError(f"{loaded.name}: the ONNX export failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    check = check_onnx(path, model, check_images(loaded, (h, w)))
    if not check.passed:
        raise ExportError(f"{loaded.name}: the ONNX export does not reproduce PyTorch: {check.problem}")
    how = (f"import json, numpy as np, onnxruntime\n\n"
           f"classes = json.load(open(\"classes.json\"))\n"
           f"session = onnxruntime.InferenceSession(\"model.onnx\", providers=[\"CPUExecutionProvider\"])\n"
           f"image = np.zeros((3, {h}, {w}), np.float32)  # RGB in [0, 1], exactly {h}x{w}\n"
           f"boxes, labels, scores, masks = session.run(None, {{\"image\": image}})\n")
    return ExportReport("onnx", folder, ["model.onnx", *_write_classes_and_readme(loaded, folder, how)],
                        (h, w), check)


def check_onnx(path: str | Path, model: torch.nn.Module, images: list[np.ndarray]) -> ParityCheck:
    """Run ``path`` with onnxruntime (CPU) and ``model`` with PyTorch on ``images``; compare detections."""
    import onnxruntime  # only exports need it; importing it costs half a second

    options = onnxruntime.SessionOptions()
    # errors only: the traced graph records the example's detection count as its output shape, and
    # onnxruntime printed a warning for every other count (hundreds of lines in one export)
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = {"box": 0.0, "score": 0.0, "iou": 1.0}
    compared = 0
    for n, image in enumerate(images):
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            ref = {k: v.numpy() for k, v in model([tensor])[0].items()}
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"image": tensor.numpy()})))
        problem = _compare(ref, got, worst)
        compared += len(ref["boxes"])
        if problem:
            return ParityCheck(len(images), compared, worst["box"], worst["score"], worst["iou"],
                               f"image {n + 1}: {problem}")
    return ParityCheck(len(images), compared, worst["box"], worst["score"], worst["iou"], None)


def _compare(ref: dict, got: dict, worst: dict) -> str | None:
    """Match ``got``'s detections to ``ref``'s one to one (same label, nearest box); update ``worst``."""
    if len(ref["boxes"]) != len(got["boxes"]):
        return f"{len(ref['boxes'])} detections in PyTorch, {len(got['boxes'])} in onnxruntime"
    free = set(range(len(got["boxes"])))
    for i in range(len(ref["boxes"])):
        same_label = [j for j in free if got["labels"][j] == ref["labels"][i]]
        if not same_label:
            return f"no detection of label {int(ref['labels'][i])} left to match PyTorch's detection {i}"
        j = min(same_label, key=lambda k: float(np.abs(got["boxes"][k] - ref["boxes"][i]).max()))
        free.discard(j)
        box = float(np.abs(got["boxes"][j] - ref["boxes"][i]).max())
        score = float(abs(got["scores"][j] - ref["scores"][i]))
        iou = _mask_iou(ref["masks"][i, 0], got["masks"][j, 0])
        worst.update(box=max(worst["box"], box), score=max(worst["score"], score), iou=min(worst["iou"], iou))
        if box > MAX_BOX_PX or score > MAX_SCORE_DIFF or iou < MIN_MASK_IOU:
            return (f"detection {i} differs: box by {box:.3f} px (limit {MAX_BOX_PX}), score by {score:.2e} "
                    f"(limit {MAX_SCORE_DIFF}), mask IoU {iou:.4f} (limit {MIN_MASK_IOU})")
    return None


def _mask_iou(ref: np.ndarray, got: np.ndarray, thresh: float = 0.5) -> float:
    """IoU of the two masks cut at ``thresh``, leaving out pixels whose PyTorch probability lies within
    MASK_PROB_TOL of it: there a rounding difference flips the pixel (seen on boxes under a pixel high,
    whose masks sit at p = 0.5 while the probabilities agree to 1e-5)."""
    sure = np.abs(ref - thresh) > MASK_PROB_TOL
    a, b = (ref > thresh) & sure, (got > thresh) & sure
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


__all__ = ["FORMATS", "ExportReport", "ParityCheck", "export_model", "export_zip", "check_onnx", "default_input_size"]
