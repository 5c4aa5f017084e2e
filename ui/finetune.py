"""Fine-tune page: start a short training run in the background, watch it learn, compare before/after.

UI only: data preparation, the job, estimates and the comparison live in mrcnn.training.finetune / mrcnn.training.jobs.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from mrcnn.training import finetune
from mrcnn.training import jobs
from mrcnn.errors import MrcnnError
from mrcnn.model.zoo import resolve_device
from ui.state import get_model, model_infos

LOSS_TERMS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def loss_figure(metrics: list[dict]) -> go.Figure:
    """Per-term loss curves and the learning rate (second axis) from metrics.jsonl rows."""
    rows = [m for m in metrics if "step" in m and "loss" in m]
    fig = go.Figure()
    steps = [m["step"] for m in rows]
    for term in LOSS_TERMS:
        if rows and term in rows[0]:
            fig.add_trace(go.Scatter(x=steps, y=[m.get(term) for m in rows], mode="lines", name=term,
                                     line={"width": 3 if term == "loss" else 1.5}))
    if rows and "lr" in rows[0]:
        fig.add_trace(go.Scatter(x=steps, y=[m["lr"] for m in rows], name="learning rate", yaxis="y2",
                                 line={"dash": "dot", "color": "grey"}))
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="step",
                      yaxis_title="loss", yaxis2={"overlaying": "y", "side": "right", "title": "lr", "showgrid": False},
                      legend={"orientation": "h"})
    return fig


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _settings_form() -> None:
    models = [m for m in model_infos() if m.available]
    if not models:
        st.warning("No model is available to start from. See the sidebar for how to get one.")
        return
    names = [m.name for m in models]
    st.subheader("Data")
    source = st.radio("Training data", ["Teach it a new shape (built-in)", "Upload a COCO .zip"], key="ft_source",
                      horizontal=True)
    upload = None
    if source.startswith("Upload"):
        upload = st.file_uploader("COCO dataset (.zip with annotations.json and images/)", type=["zip"],
                                  key="ft_upload")
    else:
        st.caption(f"Generated scenes with circles, squares, triangles and **{finetune.NEW_SHAPE}s** — a shape "
                   "the bundled model has never seen. Validation scenes are generated apart (another seed).")

    st.subheader("Settings")
    c1, c2, c3 = st.columns(3)
    start = c1.selectbox("Start from", names, index=names.index("shapes") if "shapes" in names else 0,
                         key="ft_model")
    steps = c2.number_input("Steps", 1, 5000, 100, key="ft_steps")
    batch = c3.number_input("Batch size", 1, 64, 4, key="ft_batch")
    c4, c5, c6 = st.columns(3)
    size = c4.select_slider("Image size", [128, 160, 192, 224, 256, 320, 384, 512], 256, key="ft_size")
    lr = c5.number_input("Learning rate", 0.0001, 0.5, 0.01, format="%.4f", key="ft_lr")
    devices = ["auto", "cpu"] + (["cuda"] if resolve_device("auto").type == "cuda" else [])
    device = c6.selectbox("Device", devices, key="ft_device",
                          help="auto: CUDA (float16 mixed precision) when a GPU is present, else the CPU "
                               "(bfloat16 mixed precision where the CPU has bf16 instructions)")
    try:
        settings = finetune.FinetuneSettings(model=start, steps=int(steps), batch_size=int(batch),
                                             image_size=int(size), lr=float(lr), device=device)
    except ValueError as err:
        st.error(str(err))
        return
    run_device = resolve_device(device).type
    st.info(f"Estimated training time on {run_device.upper()}: about "
            f"{_fmt_s(finetune.estimate_seconds(settings, run_device))} (from measured throughput), "
            "plus a minute for evaluation before and after.")
    if st.button("Start fine-tuning", type="primary", key="ft_start"):
        if upload is None and source.startswith("Upload"):
            st.error("Choose a .zip file first.")
            return
        _start(settings, upload)


def _start(settings: finetune.FinetuneSettings, upload) -> None:
    run_dir = finetune.new_run_dir()
    try:
        with st.status("Preparing data…", expanded=True) as status:
            if upload is not None:
                with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as tmp:
                    tmp.write(upload.getvalue())
                plan = finetune.prepare_upload(tmp.name, settings, run_dir)
                Path(tmp.name).unlink(missing_ok=True)
                st.write(f"Dataset checked: {plan.report.get('num_images', '?')} images, "
                         f"{len(plan.report.get('issues', []))} notes.")
            else:
                plan = finetune.prepare_builtin(settings, run_dir)
            job = jobs.start_job(plan.train_args, run_dir, settings.steps)
            status.update(label="Training started", state="complete")
    except MrcnnError as err:
        st.error(str(err))
        return
    st.session_state["ft_plan"] = {"val_dir": plan.val_dir, "start_model": settings.model,
                                   "run_dir": str(run_dir)}
    (Path(run_dir) / "plan.json").write_text(
        json.dumps({"val_dir": plan.val_dir, "start_model": settings.model}))
    st.session_state.pop("ft_compare", None)
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
        if st.button("Cancel run", key="ft_cancel"):
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
    path = Path(job.run_dir) / "plan.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _results(job: jobs.Job) -> None:
    status = job.status()
    state = status["state"]
    if state == "failed":
        st.error(f"The run failed: {status.get('message') or 'no reason given'}")
        with st.expander("Last lines of the training log"):
            st.code(job.log_tail(30) or "(empty)")
        return
    if state == "cancelled":
        st.warning(f"The run was cancelled. {status.get('message', '')}")
    ckpt = Path(job.run_dir) / "checkpoint.pt"
    if not ckpt.is_file():
        st.info("No checkpoint was written.")
        return
    model_infos.clear()  # the picker lists runs' checkpoints: show the new one now, not at the next refresh
    st.success(f"New checkpoint: `{ckpt}` — it is now in the model picker.")
    plan = _plan_of(job)
    if not plan:
        return
    key = f"ft_compare::{job.run_dir}"
    if key not in st.session_state and st.button("Evaluate before vs after", type="primary", key="ft_eval"):
        bar = st.progress(0.0, text="Evaluating…")
        try:
            st.session_state[key] = finetune.compare_before_after(
                plan["start_model"], ckpt, plan["val_dir"],
                progress=lambda done, total: bar.progress(done / max(total, 1), text=f"Evaluating {done}/{total}"))
        except MrcnnError as err:
            st.error(str(err))
            return
        bar.empty()
    result = st.session_state.get(key)
    if result:
        _show_comparison(result, plan, ckpt)


def _show_comparison(result: dict, plan: dict, ckpt: Path) -> None:
    import pandas as pd

    rows = []
    for which in ("before", "after"):
        r = result[which]
        rows.append({"model": f"{which} ({plan['start_model'] if which == 'before' else ckpt.parent.name})",
                     "box AP": r["bbox"]["AP"], "mask AP": r["segm"]["AP"],
                     "box AP50": r["bbox"]["AP50"], "mask AP50": r["segm"]["AP50"]})
    st.dataframe(pd.DataFrame(rows).set_index("model").style.format("{:.3f}"))
    classes = sorted(set(result["after"].get("per_class", {})) | set(result["before"].get("per_class", {})))
    per = [{"class": c,
            "mask AP before": result["before"].get("per_class", {}).get(c, {}).get("segm_AP", 0.0),
            "mask AP after": result["after"].get("per_class", {}).get(c, {}).get("segm_AP", 0.0)} for c in classes]
    if per:
        st.caption("Per class (a class the starting model did not know scores 0 before)")
        st.dataframe(pd.DataFrame(per).set_index("class").style.format("{:.3f}"))
    _side_by_side(plan, ckpt)


def _side_by_side(plan: dict, ckpt: Path) -> None:
    from mrcnn.data.coco import load_dataset
    from mrcnn.inference.draw import draw_detections
    from mrcnn.inference.structures import Thresholds
    from mrcnn.inference.trace import run_trace

    dataset = load_dataset(plan["val_dir"])
    n = len(dataset)
    idx = st.slider("Validation image", 0, max(n - 1, 0), 0, key="ft_val_idx") if n > 1 else 0
    image, _ = dataset[idx]
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cols = st.columns(2)
    for col, (title, name) in zip(cols, (("Before", plan["start_model"]), ("After", str(ckpt)))):
        try:
            loaded = get_model(name, "auto")
        except MrcnnError as err:
            col.error(str(err))
            continue
        trace = run_trace(loaded, array, Thresholds())
        col.image(draw_detections(array, trace.detections), caption=f"{title}: {len(trace.detections)} detections")


st.header("Fine-tune")
st.caption("Start a short training run in the background, watch it learn, and compare before and after "
           "on the same validation images. One run at a time per server; it survives page reloads.")
current = jobs.current_job()
if current is not None and current.state() == "running":
    st.subheader(f"Run {Path(current.run_dir).name}")
    _watch(current)
else:
    if current is not None:
        with st.container(border=True):
            st.subheader(f"Last run: {Path(current.run_dir).name}")
            _watch(current)
            _results(current)
    _settings_form()
