"""The sidebar shared by every page: model picker (with availability and downloads), device, precision,
model card."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from mrcnn.data.uploads import saved_upload
from mrcnn.errors import MrcnnError
from mrcnn.evaluation import fidelity
from mrcnn.inference import precision
from mrcnn.inference.input_size import network_input_size
from mrcnn.inference.model_export import export_zip
from mrcnn.model.architectures import TORCHVISION_ARCHITECTURES
from mrcnn.model import importer, zoo
from ui import state

DEVICES = ["auto", "cpu", "cuda"]
KIND_LABELS = {"bundled": "bundled", "torchvision": "COCO, torchvision", "checkpoint": "training run",
               "imported": "imported"}
MAX_CHECK_IMAGES = 4  # a precision check of R50 takes ~6 s per image on a 2-core CPU


def model_label(info: zoo.ModelInfo) -> str:
    """How a model is named in the picker."""
    if info.kind == "checkpoint":
        path = Path(info.name)
        name = f"run {path.parent.name}" if path.name == "checkpoint.pt" else path.name
    else:
        name = info.name
    suffix = "" if info.available else " — unavailable"
    return f"{name} ({KIND_LABELS.get(info.kind, info.kind)}){suffix}"


def default_model(infos: list[zoo.ModelInfo]) -> str | None:
    """shapes when it is here; else the first available model; else shapes (with its reason shown)."""
    by_name = {i.name: i for i in infos}
    if zoo.DEFAULT_MODEL in by_name and by_name[zoo.DEFAULT_MODEL].available:
        return zoo.DEFAULT_MODEL
    available = [i.name for i in infos if i.available]
    if available:
        return available[0]
    return zoo.DEFAULT_MODEL if zoo.DEFAULT_MODEL in by_name else (infos[0].name if infos else None)


def _download(info: zoo.ModelInfo) -> None:
    bar = st.progress(0.0, text=f"Downloading {info.name}…")

    def progress(done: int, total: int | None) -> None:
        if total:
            bar.progress(min(done / total, 1.0), text=f"{done / 1e6:.0f} / {total / 1e6:.0f} MB")
        else:
            bar.progress(0.0, text=f"{done / 1e6:.0f} MB")

    try:
        path = zoo.download_weights(info.name, progress=progress)
    except MrcnnError as err:
        st.session_state[f"download_error_{info.name}"] = str(err)
        bar.empty()
        return
    st.session_state.pop(f"download_error_{info.name}", None)
    state.model_infos.clear()
    st.toast(f"Saved {path.name}")
    st.rerun()


def _unavailable(info: zoo.ModelInfo) -> None:
    st.warning(f"**{info.name}** is not available: {info.reason}", icon=":material/cloud_off:")
    if info.kind == "torchvision" and info.url:
        if st.button("Download weights", key=f"download_{info.name}", icon=":material/download:",
                     help=f"From {info.url} into {zoo.hub_checkpoint_dir()}"):
            _download(info)
        err = st.session_state.get(f"download_error_{info.name}")
        if err:
            st.error(state.literal(err))


def _card(info: zoo.ModelInfo, loaded: zoo.LoadedModel | None) -> None:
    with st.expander("Model card", expanded=False, icon=":material/badge:"):
        classes = loaded.categories[1:] if loaded is not None else info.classes
        classes = [c for c in classes if c != "N/A"]
        st.markdown(f"**{len(classes)} classes:** " + ", ".join(classes[:40]) + (" …" if len(classes) > 40 else ""))
        if loaded is not None:
            st.caption(f"architecture `{loaded.arch.get('name')}` · sha256 `{loaded.sha256[:12]}…`")
        card = info.card or (loaded.meta if loaded is not None else {})
        metrics = card.get("metrics") if isinstance(card, dict) else None
        if isinstance(metrics, dict) and metrics:
            st.markdown("**Metrics**")
            flat = _flatten(metrics)
            st.dataframe(pd.DataFrame({"metric": list(flat), "value": list(flat.values())}), hide_index=True,
                         width="stretch")
        if loaded is not None:
            _export(loaded)
        rest = {k: v for k, v in (card or {}).items() if k != "metrics"}
        if rest:
            st.markdown("**About**")
            for key, value in rest.items():
                text = value if isinstance(value, (str, int, float)) else json.dumps(value)
                st.markdown(f"- *{key}*: {str(text)[:300]}")


def _export(loaded: zoo.LoadedModel) -> None:
    """Build the chosen export on request (ONNX takes a while: it is checked with onnxruntime) and offer it."""
    formats = (["torchvision"] if loaded.arch.get("name") in TORCHVISION_ARCHITECTURES else []) + ["onnx"]
    fmt = st.radio("Export as", formats, key="export_format", horizontal=True,
                   help="torchvision: a state dict plain torchvision loads; onnx: fixed input size, "
                        "checked against PyTorch with onnxruntime")
    key = (loaded.name, loaded.sha256, fmt)
    ready = st.session_state.get("export_ready")
    if st.button("Prepare export", key="export_prepare", icon=":material/package_2:"):
        try:
            with st.spinner(f"Exporting {loaded.name} as {fmt}…"):
                data, report = export_zip(loaded, fmt)
        except MrcnnError as err:
            st.error(state.literal(err))
            return
        check = report.check
        note = (f"onnxruntime matched {check.detections} detections on {check.images} images: boxes within "
                f"{check.max_box_px:.2g} px, scores within {check.max_score_diff:.1g}, mask IoU ≥ "
                f"{check.min_mask_iou:.3f}") if check else "loads with strict=True in torchvision"
        ready = st.session_state["export_ready"] = (key, data, note)
    if ready and ready[0] == key:
        st.caption(ready[2])
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in loaded.name)[:40] or "model"
        st.download_button(f"Download {fmt} export (.zip)", ready[1], file_name=f"{safe}-{fmt}.zip",
                           mime="application/zip", key="export_download", icon=":material/download:")


def _flatten(metrics: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, float):
            out[f"{prefix}{key}"] = f"{value:.3f}"
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _add_model_now() -> None:
    """The "Add" button's callback: import the uploaded file, then pick it (before the picker is drawn)."""
    ss = st.session_state
    upload = ss.get("add_model_file")
    if upload is None:
        ss["add_model_message"] = ("error", "Choose a model file first.")
        return
    names = [c.strip() for c in ss.get("add_model_classes", "").split(",") if c.strip()]
    try:
        with saved_upload(upload.getvalue(), suffix=".pth") as path:
            imported = importer.import_model(
                path, classes=names or None, name=ss.get("add_model_name") or Path(upload.name).stem,
                # sizes only when changed: an own checkpoint keeps its sizes, a state dict gets torchvision's
                **{k: int(ss[f"add_model_{k}"]) for k, v in importer.TORCHVISION_DEFAULT_SIZES.items()
                   if int(ss[f"add_model_{k}"]) != v},
                display_file_name=upload.name)
    except MrcnnError as err:
        ss["add_model_message"] = ("error", state.literal(err))
        return
    state.model_infos.clear()
    ss["model_name"] = imported.name
    note = f" {imported.class_note}." if imported.class_note else ""
    ss["add_model_message"] = ("success", f"Added **{imported.name}** ({len(imported.card['classes'])} classes, "
                                          f"{imported.card['architecture']['name']}).{note}")


def _add_model() -> None:
    with st.expander("Add a model", icon=":material/upload_file:"):
        st.file_uploader("Mask R-CNN weights (.pt, .pth)", type=["pt", "pth"], key="add_model_file",
                         max_upload_size=state.model_upload_mb(),
                         help="torchvision maskrcnn_resnet50_fpn / _v2 state dicts (any classes), torchvision "
                              "references checkpoints, DataParallel/DDP state dicts, or this app's checkpoints")
        st.text_input("Name", key="add_model_name", max_chars=importer.MAX_NAME_CHARS,
                      placeholder="the file's name")
        st.text_input("Class names, comma-separated", key="add_model_classes", placeholder="class_1, class_2, …")
        c1, c2 = st.columns(2)
        c1.number_input("min_size", 32, 4096, importer.TORCHVISION_DEFAULT_SIZES["min_size"], key="add_model_min_size",
                        help="The input transform's shorter side; a state dict does not record it")
        c2.number_input("max_size", 32, 4096, importer.TORCHVISION_DEFAULT_SIZES["max_size"], key="add_model_max_size")
        st.button("Add", key="add_model", on_click=_add_model_now, icon=":material/add:")
    # outside the expander: a rerun may fold it, and the result must stay in sight
    message = st.session_state.pop("add_model_message", None)
    if message:
        (st.error if message[0] == "error" else st.success)(message[1])


def _device() -> None:
    if torch.cuda.is_available():
        st.radio("Device", DEVICES, key="device", persist_state="session", horizontal=True)
    else:
        st.session_state["device"] = "auto"
    try:
        dev = zoo.resolve_device(st.session_state["device"])
    except MrcnnError as err:
        st.error(state.literal(err))
        return
    note = "" if torch.cuda.is_available() else " (no CUDA device here)"
    st.caption(f"Device: **{dev}**{note}")


def _precision_select() -> None:
    """auto, float32 and the precisions this device runs natively. One it lacks is not offered (the help
    says why): chosen, it would leave every page without a model. A choice the device cannot run (from a
    link, or kept from another device) falls back to auto with a warning naming the reason."""
    try:
        dev = zoo.resolve_device(st.session_state["device"])
    except MrcnnError:
        return
    offered = ["auto"] + precision.native_precisions(dev)
    lacking = {p: precision.unavailable_reason(p, dev) for p in precision.PRECISIONS if p not in offered}
    chosen = st.session_state.get("precision")
    if chosen in lacking:
        st.warning(f"Precision {chosen} is not available: {state.literal(lacking[chosen])}. Running auto.",
                   icon=":material/warning:")
    state.keep_choice("precision", offered, "auto")
    st.selectbox("Precision", offered, key="precision", persist_state="session",
                 help="What the network runs in. auto: the fastest precision this device runs natively "
                      "(bfloat16 on a CPU with bf16 units, float16 on CUDA), unless the model missed its fidelity "
                      "target in it; float32: exact. Feature maps and probabilities are float32 in every precision."
                      + "".join(f"\n\nNot offered here: {p}, {why}." for p, why in lacking.items()))


def _precision_caption(loaded: zoo.LoadedModel) -> None:
    """What runs, and why when auto did not pick the device's fast precision."""
    requested = st.session_state.get("precision", "auto")
    text = f"Runs in **{loaded.precision}**" + (" (auto)" if requested == "auto" else "")
    if loaded.precision_note:
        text += f" — {loaded.precision_note}"
    st.caption(text)


def _precision_check(loaded: zoo.LoadedModel) -> None:
    """What is known of the device's fast precision on this model (a precision check's record, else its
    card's AP record), and a button that checks it now against float32 on this session's latest images (or
    generated scenes) and records it for the model's weights: ``auto`` follows the record from then on."""
    fast = precision.fast_precision(loaded.device)
    if fast == "float32":
        return
    check = zoo.read_precision_check(loaded.sha256) or {}
    card = loaded.meta.get("precision_fidelity") if isinstance(loaded.meta.get("precision_fidelity"), dict) else {}
    if isinstance(check.get(fast), dict):
        st.caption(f"{fast} checked {check.get('checked', '')}: {check[fast].get('summary')} "
                   f"on {check.get('data', 'images')}")
    elif isinstance(card.get(fast), dict):
        st.caption(f"{fast} on the card's held-out data: {card[fast].get('summary')}")
    else:
        st.caption(f"{fast} has not been checked against float32 on this model yet.")
    images = list((st.session_state.get("images") or {}).values())[-MAX_CHECK_IMAGES:]
    # an image the model's resize makes 0 px on a side cannot run: left out (it stopped the whole check)
    images = [e for e in images if min(network_input_size(loaded.model, *e.array.shape[:2])) >= 1]
    where = (f"the session's last {len(images)} images" if len(images) > 1 else "the session's image" if images
             else "generated scenes")
    if st.button(f"Check {fast} against float32", key="precision_check", type="tertiary", icon=":material/rule:",
                 help=f"Runs the model in float32 and in {fast} on {where} and matches the detections (same "
                      f"label, box IoU ≥ {fidelity.MATCH_IOU}, score within {fidelity.MATCH_SCORE_DIFF}; target: "
                      f"{fidelity.MIN_MATCHED_SHARE:.0%}). auto runs float32 on a model where {fast} missed."):
        _run_precision_check(loaded, [e.array for e in images])


def _images_of_a_session(n: int) -> str:  # a record is seen by every session: no file names in it
    return f"{n} images of a session" if n > 1 else "an image of a session"


def _run_precision_check(loaded: zoo.LoadedModel, images: list) -> None:
    ss = st.session_state
    try:  # float32, as loaded already or for this check alone (R50: 170 MB not kept after it)
        reference = (loaded if loaded.precision == "float32"
                     else state.load_model_uncached(ss["model_name"], ss.get("device", "auto"), "float32"))
    except MrcnnError as err:
        st.error(state.literal(err))
        return
    bar = st.progress(0.0, text=f"Checking {loaded.name}…")
    largest = max((a.shape for a in images), key=lambda s: s[0] * s[1], default=(512, 512, 3))
    try:
        with state.network_slot(reference, largest, learn=False):  # several runs: no single run's peak
            fidelity.check_precisions(reference, images, _images_of_a_session(len(images)) if images else "",
                                      progress=lambda done, total: bar.progress(done / total,
                                                                                text=f"run {done} of {total}"))
    except MrcnnError as err:
        st.error(state.literal(err))
        return
    finally:
        bar.empty()
    state.forget_loaded_model(ss["model_name"], ss.get("device", "auto"))
    st.rerun()


def render() -> zoo.LoadedModel | None:
    """Draw the sidebar; returns the loaded model (None when it cannot be loaded, with the reason shown)."""
    with st.sidebar:
        st.title("Mask R-CNN Explorer")
        infos = state.model_infos()
        by_name = {i.name: i for i in infos}
        if not infos:
            st.error("No models are known.")
            st.session_state["model_name"] = None
            return None
        state.keep_choice("model_name", list(by_name), default_model(infos))
        name = st.selectbox("Model", list(by_name), key="model_name", persist_state="session",
                            format_func=lambda n: model_label(by_name[n]))
        info = by_name[name]
        if not info.available:
            _unavailable(info)
        elif name != zoo.DEFAULT_MODEL and not by_name.get(zoo.DEFAULT_MODEL, info).available:
            st.caption(f"The bundled `{zoo.DEFAULT_MODEL}` model is missing: {by_name[zoo.DEFAULT_MODEL].reason}")
        _device()
        _precision_select()
        loaded = state.current_model() if info.available else None
        if info.available and loaded is None:
            st.error(state.literal(st.session_state.get("model_error")))
        elif loaded is not None:
            _precision_caption(loaded)
            _precision_check(loaded)
        _card(info, loaded)
        _add_model()
        if st.button("Refresh model list", key="refresh_models", type="tertiary", icon=":material/refresh:"):
            state.model_infos.clear()
            st.rerun()
    return loaded
