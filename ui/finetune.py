"""Fine-tune page: start a short training run from the sidebar's model in the background, watch it learn,
compare before/after.

UI only: data preparation, the job, estimates and the comparison live in mrcnn.training.finetune /
mrcnn.training.jobs. The run a session started stays its own (cancelled without asking) across page switches
and reloads: the job's record holds the session's owner token (ui/run_owner.py). An uploaded zip is kept for
the session in a server-named file (KeptUpload), so that a page switch does not lose it. What the page
computed is kept: the before/after metrics per run (session), the validation set's scan and both models'
detections per validation image (shared caches keyed by the run's checkpoint and its mtime), so moving a
slider redraws and never runs a network again.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from mrcnn.data import coco, uploads
from mrcnn.errors import MrcnnError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.files import atomic_write_bytes
from mrcnn.inference.draw import draw_detections
from mrcnn.inference.structures import Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.model.zoo import LoadedModel
from mrcnn.model.zoo import resolve_device
from mrcnn.training import finetune, jobs
from ui import run_owner, state, tables
from ui.evaluation_bar import IMAGES_PER_BATCH, EvaluationBar

LOSS_TERMS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
VAL_AP_KEYS = {"bbox_AP": "val box AP", "segm_AP": "val mask AP"}
IMAGE_SIZES = [128, 160, 192, 224, 256, 320, 384, 512, 640, 800]


@dataclass
class KeptUpload:
    """The session's last dataset zip, in a file the server names: Streamlit's uploader forgets its file when
    the page is left, this keeps it for the session. The folder goes when another zip replaces it, when the
    user forgets it, or with the session."""

    name: str  # as the user named it: labels messages, never part of a path
    upload_id: str  # Streamlit's id of the upload it came from
    size: int  # bytes
    folder: uploads.TemporaryFolder

    @property
    def path(self) -> Path:
        return self.folder.path / "upload.zip"


def _kept_upload(upload) -> KeptUpload | None:
    """The zip a run would use: ``upload`` (written to a server-named file once per upload), else the one kept."""
    ss = st.session_state
    kept = ss.get("ft_kept_upload")
    if upload is not None and (kept is None or kept.upload_id != upload.file_id):
        folder = uploads.TemporaryFolder("mrcnn-finetune-")
        try:
            atomic_write_bytes(folder.path / "upload.zip", upload.getvalue())
        except BaseException as err:
            folder.close()
            if not isinstance(err, OSError):
                raise
            st.error(f"{state.literal(upload.name)} cannot be stored on the server: {err.strerror or err}")
            return None  # not the zip kept before: the user chose another
        if kept is not None:
            kept.folder.close()
        kept = ss["ft_kept_upload"] = KeptUpload(upload.name, upload.file_id, upload.size, folder)
    return kept


def _forget_upload() -> None:
    kept = st.session_state.pop("ft_kept_upload", None)
    if kept is not None:
        kept.folder.close()


def loss_figure(metrics: list[dict]) -> go.Figure:
    """Per-term training loss curves, the validation loss and AP where the run validated (dashed, AP on a
    0-1 axis of its own), and the learning rate, from metrics.jsonl rows. A validation loss that rises while
    the training loss falls is over-fitting."""
    rows = [m for m in metrics if "step" in m and "loss" in m]
    fig = go.Figure()
    steps = [m["step"] for m in rows]
    for term in LOSS_TERMS:
        if rows and term in rows[0]:
            fig.add_trace(go.Scatter(x=steps, y=[m.get(term) for m in rows], mode="lines", name=term,
                                     line={"width": 3 if term == "loss" else 1.5}))
    validated = [m for m in rows if isinstance(m.get("val"), dict)]
    val_steps = [m["step"] for m in validated]
    if validated and "loss" in validated[0]["val"]:
        fig.add_trace(go.Scatter(x=val_steps, y=[m["val"].get("loss") for m in validated], mode="lines+markers",
                                 name="val loss", line={"width": 3, "dash": "dash", "color": "black"}))
    for key, name in VAL_AP_KEYS.items():
        if validated and key in validated[0]["val"]:
            fig.add_trace(go.Scatter(x=val_steps, y=[m["val"].get(key) for m in validated], mode="lines+markers",
                                     name=name, yaxis="y3", line={"dash": "dash"}))
    if rows and "lr" in rows[0]:
        fig.add_trace(go.Scatter(x=steps, y=[m["lr"] for m in rows], name="learning rate", yaxis="y2",
                                 line={"dash": "dot", "color": "grey"}))
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="step",
                      xaxis_domain=[0, 0.9], yaxis_title="loss",
                      yaxis2={"overlaying": "y", "side": "right", "title": "lr", "showgrid": False},
                      yaxis3={"overlaying": "y", "side": "right", "anchor": "free", "position": 1.0,
                              "title": "val AP", "range": [0, 1], "showgrid": False},
                      legend={"orientation": "h"})
    return fig


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = max(int(seconds), 1)  # "about 1 s", not "about 0 s", for a run shorter than a second
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _settings_form() -> None:
    loaded = state.current_model()
    if loaded is None:
        st.warning(f"No model to start from — {state.literal(st.session_state.get('model_error'))}. "
                   "Pick an available model in the sidebar.", icon=":material/warning:")
        return
    st.subheader("Data")
    source = st.radio("Training data", ["Teach it a new shape (built-in)", "Upload a COCO .zip"], key="ft_source",
                      horizontal=True, persist_state="session")
    kept = None
    if source.startswith("Upload"):
        upload = st.file_uploader("COCO dataset (.zip with annotations.json and images/)", type=["zip"],
                                  key="ft_upload")
        kept = _kept_upload(upload)
        if upload is None and kept is not None:
            c1, c2 = st.columns([4, 1], vertical_alignment="center")
            c1.caption(f"Using **{state.literal(kept.name)}** ({kept.size / 1e6:.1f} MB), uploaded earlier in this session; "
                       "upload another file to replace it.")
            c2.button("Forget it", key="ft_forget_upload", on_click=_forget_upload)
    else:
        st.caption(f"Generated scenes with circles, squares, triangles and **{finetune.NEW_SHAPE}s** — a shape "
                   "the bundled model has never seen. Validation scenes are generated apart (another seed).")

    st.subheader("Settings")
    st.caption(f"Starts from `{loaded.name}`, the model chosen in the sidebar.")
    arch_name = loaded.arch["name"]
    kind = "light" if arch_name == "light" else "r50"  # each kind keeps its own image size
    c1, c2, c3 = st.columns(3)
    steps = c1.number_input("Steps", 1, 5000, 100, key="ft_steps", persist_state="session")
    batch = c2.number_input("Batch size", 1, 64, 4, key="ft_batch", persist_state="session")
    size = c3.select_slider("Image size", IMAGE_SIZES, finetune.default_image_size(arch_name), key=f"ft_size_{kind}",
                            persist_state="session",
                            help="the shorter image side the model trains at; the default fits a CPU")
    c4, c5, c6 = st.columns(3)
    lr = c4.number_input("Learning rate", 0.0001, 0.5, 0.01, format="%.4f", key="ft_lr", persist_state="session")
    devices = ["auto", "cpu"] + (["cuda"] if resolve_device("auto").type == "cuda" else [])
    state.keep_choice("ft_device", devices, "auto")
    device = c5.selectbox("Device", devices, key="ft_device", persist_state="session",
                          help="auto: CUDA (float16 mixed precision) when a GPU is present, else the CPU "
                               "(bfloat16 mixed precision where the CPU has bf16 instructions)")
    gpus = _gpu_choice(c6, device)
    validations = st.number_input("Validations per run", 0, 100, 5, key="ft_validations", persist_state="session",
                                  help="how many times the run measures the validation loss and AP while it "
                                       "trains (0: once, at the end)")
    layers = _backbone_layers(loaded)
    try:
        settings = finetune.FinetuneSettings(model=loaded.name, steps=int(steps), batch_size=int(batch),
                                             image_size=int(size), lr=float(lr), device=device,
                                             trainable_backbone_layers=layers, gpus=gpus,
                                             validations=int(validations))
    except ValueError as err:
        st.error(state.literal(err))
        return
    _estimate(loaded, settings)
    if st.button("Start fine-tuning", type="primary", key="ft_start"):
        if kept is None and source.startswith("Upload"):
            st.error("Choose a .zip file first.")
            return
        _start(settings, kept)


def _gpu_choice(column, device: str) -> int:
    """1, or every GPU of the machine (torchrun, one process each) when it has several and the user says so."""
    count = torch.cuda.device_count()
    if count < 2 or device == "cpu":
        return 1
    options = ["1 GPU", f"all {count} GPUs"]
    state.keep_choice("ft_gpus", options, options[0])
    choice = column.radio("GPUs", options, key="ft_gpus", horizontal=True, persist_state="session",
                          help="all: one training process per GPU through torchrun (DistributedDataParallel); "
                               "the batch size is per GPU")
    return count if choice.startswith("all") else 1


@st.cache_data(max_entries=64, show_spinner=False)
def _parameter_counts(arch: dict, num_classes: int, layers: int | None) -> tuple[int, int]:
    return finetune.parameter_counts(arch, num_classes, layers)


def _backbone_layers(loaded: LoadedModel) -> int | None:
    """The trainable backbone layers (None for the light architecture, which trains whole), with the
    trainable and frozen parameter counts they give."""
    if finetune.has_backbone_choice(loaded.arch["name"]):
        layers = int(st.number_input(
            "Trainable backbone layers", 0, 5, 3, key="ft_trainable_layers", persist_state="session",
            help="as torchvision counts them: the last N of layer4, layer3, layer2, layer1, conv1 train "
                 "(5 = all), the rest stays as it is; the backbone's BatchNorm statistics stay fixed"))
    else:
        layers = None
        st.caption("Backbone: every layer trains. The light architecture is small and normalises with GroupNorm, "
                   "so freezing part of it saves little; the setting applies to torchvision's R50 models.")
    trainable, frozen = _parameter_counts(loaded.arch, loaded.num_classes, layers)
    st.caption(f"**{trainable:,}** parameters train, **{frozen:,}** frozen (with the model's "
               f"{loaded.num_classes - 1} classes; the heads are rebuilt for the data's)")
    return layers


@st.cache_data(max_entries=32, show_spinner="Timing one training step of this model on this machine…")
def _seconds_per_image(model: str, sha256: str, image_size: int, device: str, layers: int | None) -> float | None:
    """Measured once per model file, size, device and frozen layers (``sha256``: a rewritten file is new)."""
    try:
        return finetune.measure_seconds_per_image(model, image_size, device, layers)
    except MrcnnError:
        return None


def _estimate(loaded: LoadedModel, settings: finetune.FinetuneSettings) -> None:
    run_device = "cuda" if settings.gpus > 1 else resolve_device(settings.device).type
    per_image = _seconds_per_image(settings.model, loaded.sha256, settings.image_size, run_device,
                                   settings.trainable_backbone_layers)
    source = (f"a training step of `{loaded.name}` at {settings.image_size} px measured on this machine: "
              f"{per_image:.2f} s per image" if per_image is not None else "from measured throughput")
    on = f"{settings.gpus} GPUs" if settings.gpus > 1 else run_device.upper()
    st.info(f"Estimated training time on {on}: about "
            f"{_fmt_s(finetune.estimate_seconds(settings, run_device, per_image))} ({source}), "
            "plus a minute for evaluation before and after.")


def _start(settings: finetune.FinetuneSettings, upload: KeptUpload | None) -> None:
    """Prepare the data and start the job. Streamlit stops or reruns a script (leaving the page, a reload,
    Stop) by raising from its next st call, session state included: everything the run needs is written
    before the job starts (plan.json, the owner in the address and in the job's record), and once it has
    started nothing removes its folder."""
    owner = run_owner.token(create=True)
    run_dir = finetune.new_run_dir()
    started = False
    try:
        with st.status("Preparing data…", expanded=True) as status:
            if upload is not None:  # a server-named file; the user's name only labels messages
                plan = finetune.prepare_upload(upload.path, settings, run_dir, display_name=upload.name)
                issues = plan.report.get("issues", [])
                skipped, notes = ([f"{i['where']}: {i['message']}" for i in issues if i.get("level") == level]
                                  for level in ("warning", "note"))
                st.session_state["ft_dataset_report"] = (str(run_dir), skipped, notes)  # shown beside the run
            else:
                plan = finetune.prepare_builtin(settings, run_dir)
            atomic_write_bytes(Path(run_dir) / "plan.json",
                               json.dumps({"val_dir": plan.val_dir, "start_model": settings.model}).encode())
            status.update(label="Starting the training process…")  # a user who left meanwhile stops here
            jobs.start_job(plan.train_args, run_dir, settings.steps, nproc=settings.gpus, owner=owner)
            started = True  # no st call between the start and this line: nothing can interrupt it
            status.update(label="Training started", state="complete")
    except BaseException as err:
        if started:  # the page was left or reloaded: the run goes on, its folder stays
            raise
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that did not start leaves no folder behind
        if not isinstance(err, MrcnnError):
            raise
        st.error(state.literal(err))
        return
    st.rerun()


@st.fragment(run_every=2)
def _watch(job: jobs.Job) -> None:
    """Redraws every 2 s while the job runs; reruns the page once when it ends."""
    status = job.status()
    prog = job.progress()
    metrics = job.metrics()
    if status["state"] == "running":
        st.progress(prog["fraction"], text=f"step {prog['step']} / {prog['steps']} — elapsed "
                    f"{_fmt_s(prog['elapsed_s'])}, about {_fmt_s(prog['eta_s'])} left")
        # one run per server: another session's run is shown here too, and cancelling it is asked for first
        theirs = not run_owner.owns(job.owner)
        if theirs:
            st.caption("This run was started in another session.")
        sure = not theirs or st.checkbox("Cancel another session's run", key="ft_cancel_theirs")
        if st.button("Cancel run", key="ft_cancel", disabled=not sure):
            job.cancel()
            st.rerun(scope="app")
    last = next((m for m in reversed(metrics) if "loss" in m), None)
    if last:
        cols = st.columns(4)
        cols[0].metric("loss", f"{last['loss']:.3f}")
        cols[1].metric("learning rate", f"{last.get('lr', 0):.4g}")
        cols[2].metric("images/s", f"{last.get('images_per_s', 0):.1f}")
        if last.get("gpu_mem_mb") is not None:
            cols[3].metric("GPU memory", f"{last['gpu_mem_mb']:.0f} MB")
        st.plotly_chart(loss_figure(metrics), key="ft_loss_chart")
    if status["state"] != "running" and st.session_state.get("ft_seen_state") == "running":
        st.session_state["ft_seen_state"] = status["state"]
        st.rerun(scope="app")
    st.session_state["ft_seen_state"] = status["state"]


def _plan_of(job: jobs.Job) -> dict | None:
    """The run's plan.json (what "before vs after" evaluates), or None when it is missing or not one the
    page wrote (a list or a plan without its folders was a traceback on the page)."""
    path = Path(job.run_dir) / "plan.json"
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(plan, dict) and all(isinstance(plan.get(key), str) for key in ("start_model", "val_dir"))):
        return None
    return plan


def _results(job: jobs.Job) -> None:
    status = job.status()
    run_state = status["state"]
    if run_state == "failed":
        st.error(f"The run failed: {status.get('message') or 'no reason given'}")
        with st.expander("Last lines of the training log"):
            st.code(job.log_tail(30) or "(empty)")
        return
    if run_state == "cancelled":
        st.warning(f"The run was cancelled. {status.get('message', '')}")
    ckpt = Path(job.run_dir) / "checkpoint.pt"
    try:
        stamp = ckpt.stat().st_mtime_ns  # keys what is kept of this checkpoint: a rewritten one is new
    except OSError:
        st.info("No checkpoint was written.")
        return
    listed = f"ft_listed::{ckpt}::{stamp}"
    if listed not in st.session_state:  # the sidebar lists runs' checkpoints: show this one now, once
        state.model_infos.clear()
        st.session_state[listed] = True
    st.success(f"New checkpoint: `{ckpt}` — it is now in the sidebar's model picker.")
    plan = _plan_of(job)
    if not plan:
        return
    key = f"ft_compare::{ckpt}::{stamp}"
    if key not in st.session_state and st.button("Evaluate before vs after", type="primary", key="ft_eval"):
        try:
            st.session_state[key] = _compare_before_after(plan, ckpt)
        except MrcnnError as err:
            st.error(state.literal(err))
            return
    result = st.session_state.get(key)
    if result:
        _show_comparison(result, plan, ckpt, stamp)


def _compare_before_after(plan: dict, ckpt: Path) -> dict:
    """finetune.compare_before_after's metrics, a round of runs a run slot (EvaluationBar), with the shared models
    and validation scan the images below use. One image per batch: a round is then one image per worker."""
    dataset = _validation_set(plan["val_dir"])
    bar = EvaluationBar("Evaluating…")
    result = {}
    try:
        for which, name in (("before", plan["start_model"]), ("after", str(ckpt))):
            bar.model(state.get_model(name, "auto"), f"Evaluating {which}: image")
            result[which] = evaluate(bar.loaded, dataset, progress=bar.images, batch_size=IMAGES_PER_BATCH,
                                     run_slot=bar.run_slot).to_dict()
    finally:
        bar.empty()
    return result


def _show_comparison(result: dict, plan: dict, ckpt: Path, stamp: int) -> None:
    rows = []
    for which in ("before", "after"):
        r = result[which]
        row = {"model": f"{which} ({plan['start_model'] if which == 'before' else ckpt.parent.name})"}
        row.update({tables.metric_label(t, m): r[t][m] for m in ("AP", "AP50") for t in ("bbox", "segm")})
        rows.append(row)
    st.dataframe(pd.DataFrame(rows).set_index("model").style.format("{:.3f}"))
    classes = sorted(set(result["after"].get("per_class", {})) | set(result["before"].get("per_class", {})))
    mask_ap = tables.metric_label("segm", "AP")

    def class_ap(which: str, cls: str) -> float:
        return result[which].get("per_class", {}).get(cls, {}).get("segm_AP", 0.0)

    per = [{"class": c, f"{mask_ap} before": class_ap("before", c), f"{mask_ap} after": class_ap("after", c)}
           for c in classes]
    if per:
        st.caption("Per class (a class the starting model did not know scores 0 before)")
        st.dataframe(pd.DataFrame(per).set_index("class").style.format("{:.3f}"))
    _side_by_side(plan, ckpt, stamp)


@st.cache_resource(max_entries=2, show_spinner=False)
def _validation_set(val_dir: str) -> coco.CocoDataset:
    """The run's validation scenes, scanned once (a run's folders are written once, before training)."""
    return coco.load_dataset(val_dir)


@st.cache_data(max_entries=32, show_spinner="Running both models on this image…")
def _before_after_images(start_model: str, checkpoint: str, stamp: int, val_dir: str, idx: int) -> list:
    """[(drawn detections, count)] of the starting and the fine-tuned model on validation image ``idx``
    (``stamp``: the checkpoint's mtime, so a rewritten checkpoint is run again)."""
    image, _ = _validation_set(val_dir)[idx]
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    drawn = []
    for name in (start_model, checkpoint):
        loaded = state.get_model(name, "auto")
        # in the server's run slots and budget, as Detect's runs (the spinner above says what runs)
        with state.trace_cache().network_run(loaded, array.shape):
            trace = run_trace(loaded, array, Thresholds())
        drawn.append((draw_detections(array, trace.detections), len(trace.detections)))
    return drawn


def _side_by_side(plan: dict, ckpt: Path, stamp: int) -> None:
    try:
        n = len(_validation_set(plan["val_dir"]))
        if n > 1:
            state.clamp("ft_val_idx", 0, n - 1, initial=0)  # another run's validation set may be smaller
            idx = st.slider("Validation image", 0, n - 1, key="ft_val_idx", persist_state="session")
        else:
            idx = 0
        drawn = _before_after_images(plan["start_model"], str(ckpt), stamp, plan["val_dir"], idx)
    except MrcnnError as err:
        st.error(state.literal(err))
        return
    for col, title, (canvas, count) in zip(st.columns(2), ("Before", "After"), drawn):
        col.image(canvas, caption=f"{title}: {count} detections")


def render() -> None:
    st.title("Fine-tune")
    st.caption("Start a short training run from the sidebar's model in the background, watch it learn, and "
               "compare before and after on the same validation images. One run at a time per server; it "
               "survives page reloads.")
    current = jobs.current_job()
    if current is None and (problem := jobs.registry_problem()):
        st.warning(f"{problem} — treated as no job; starting a run replaces it.", icon=":material/warning:")
    if current is not None:
        run_dir, skipped, notes = st.session_state.get("ft_dataset_report") or (None, [], [])
        if run_dir == str(current.run_dir):  # the report of the upload this run was started from
            tables.dataset_report(skipped, notes)
    if current is not None and current.state() == "running":
        st.subheader(f"Run {Path(current.run_dir).name}")
        _watch(current)
        return
    if current is not None:
        with st.container(border=True):
            st.subheader(f"Last run: {Path(current.run_dir).name}")
            _watch(current)
            _results(current)
    _settings_form()


if __name__ == "__main__":
    render()
