"""Uploaded files: server-named temporary files and folders, removed on every path; messages name the upload.

The page tests upload under hostile names (a path that climbs out, an absolute path) on every page that
takes files, with the system temp folder moved to the test's own, so its entries can be counted exactly."""
from __future__ import annotations

import functools
import gc
import io
import json
import tempfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from mrcnn.data import uploads
from mrcnn.data.coco import load_dataset
from mrcnn.data.shapes import write_dataset
from mrcnn.errors import DatasetError
from mrcnn.training import finetune, jobs
from tests.helpers import scene, shown
from tests.test_app import env, png, tiny_shapes  # noqa: F401  (fixtures)
from tests.test_app_training_pages import FAKE, open_page
from tests.test_app_training_pages import _wait_state as wait_state

TRAVERSAL = "../" * 30 + "escape/x.zip"


@pytest.fixture
def tmpdir(tmp_path, monkeypatch):
    """The system temp folder moved to an empty folder of this test, so its entries can be counted."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def dataset_zip(tmp_path, n: int = 4, break_it: bool = False) -> bytes:
    folder = tmp_path / f"ds{n}{break_it}"
    if not folder.exists():  # write_dataset refuses a folder that holds a dataset already
        write_dataset(folder, n, seed=3, size=64)
    files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    if break_it:  # an image annotations.json names is not in the zip
        ann = json.loads(files["annotations.json"])
        ann["images"][0]["file_name"] = "missing.png"
        files["annotations.json"] = json.dumps(ann).encode()
    return zip_bytes(files)


def test_saved_upload_is_server_named_and_removed_on_error(tmpdir):
    with pytest.raises(RuntimeError):
        with uploads.saved_upload(b"bytes") as path:
            assert path.parent == tmpdir and path.name.startswith("mrcnn-upload-") and path.read_bytes() == b"bytes"
            raise RuntimeError("the caller failed")
    assert not list(tmpdir.iterdir())


def test_temporary_folder_goes_on_close_and_when_dropped(tmpdir):
    folder = uploads.TemporaryFolder("mrcnn-eval-")
    (folder.path / "data").mkdir()
    folder.close()
    assert not list(tmpdir.iterdir())
    dropped = uploads.TemporaryFolder()
    assert len(list(tmpdir.iterdir())) == 1
    del dropped
    gc.collect()
    assert not list(tmpdir.iterdir())


@pytest.mark.parametrize("data, expected", [
    (b"not a zip at all", "bad.zip is not a readable zip file"),
    (zip_bytes({"images/a.png": b"x"}), "bad.zip: no annotations.json"),
    (zip_bytes({"annotations.json": b"{}", "images/x": b"x", "images/x/y.png": b"y"}),
     "bad.zip: 'images/x' is a file but 'images/x/y.png' needs it to be a folder"),
    (zip_bytes({"annotations.json": b"{}", "images/" + "y" * 300 + "/a.png": b"y"}),
     "bad.zip: refusing 'images/yyy"),
], ids=["not a zip", "no annotations", "file and folder", "long name"])  # zip bytes hold the time: not ids
def test_unpack_names_the_upload_and_leaves_only_dest(tmpdir, data, expected):
    with uploads.TemporaryFolder() as folder:
        with pytest.raises(DatasetError) as err:
            uploads.unpack_dataset_zip(data, "bad.zip", folder.path / "data")
        assert str(err.value).startswith(expected)
        assert "mrcnn-upload-" not in str(err.value) and str(tmpdir) not in str(err.value)
        assert [p.name for p in tmpdir.iterdir()] == [folder.path.name]  # the zip's temporary file is gone
    assert not list(tmpdir.iterdir())


def test_naming_upload_replaces_folders_and_keeps_the_error_type(tmp_path):
    root = tmp_path / "mrcnn-eval-abc"
    with pytest.raises(DatasetError, match=r"^dataset shapes\.zip has errors: shapes\.zip/images/1\.png$"):
        with uploads.naming_upload("shapes.zip", root):
            raise DatasetError(f"dataset {root} has errors: {root}/images/1.png")


def test_a_user_name_is_never_a_path(tmpdir, tmp_path):
    """The name only labels messages: a traversal or absolute name writes nothing where it points."""
    target = tmp_path / "target"
    target.mkdir()
    for name in (TRAVERSAL, str(target / "abs.zip")):
        with uploads.TemporaryFolder() as folder:
            root = uploads.unpack_dataset_zip(dataset_zip(tmp_path), name, folder.path / "data")
            assert (root / "annotations.json").is_file() and root.is_relative_to(folder.path)
    assert not list(target.iterdir()) and not (tmp_path / "escape").exists()


def test_rejected_finetune_upload_names_it_and_leaves_nothing(tmpdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(tmp_path / "runs"))
    for _ in range(2):
        run_dir = finetune.new_run_dir()
        with uploads.saved_upload(dataset_zip(tmp_path, break_it=True)) as zip_path:
            with pytest.raises(DatasetError) as err:
                finetune.prepare_upload(zip_path, finetune.FinetuneSettings(), run_dir, display_name="bad.zip")
        message = str(err.value)
        assert "missing.png" in message and "bad.zip:" in message
        assert "mrcnn-upload-" not in message and str(tmp_path) not in message
        assert not run_dir.exists()
    assert not list(tmpdir.iterdir())


def test_a_finetune_upload_with_images_beside_annotations_json_is_split_and_loads(tmpdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(tmp_path / "runs"))
    folder = write_dataset(tmp_path / "flat", 4, seed=3, size=64)
    files = {("annotations.json" if f.name == "annotations.json" else f.name): f.read_bytes()
             for f in folder.rglob("*") if f.is_file()}  # docs/datasets.md: file_name relative to DIR/
    with uploads.saved_upload(zip_bytes(files)) as zip_path:
        plan = finetune.prepare_upload(zip_path, finetune.FinetuneSettings(), finetune.new_run_dir())
    assert len(load_dataset(plan.train_data)) + len(load_dataset(plan.val_dir)) == 4


# ---- every page that takes files, driven as a browser user (or an ill-willed one) would --------------------
def hostile_names(target) -> list[str]:
    """Names that would write into ``target`` if a name became part of a path: relative and absolute."""
    return ["../" * 30 + str(target / "up.zip").lstrip("/"), str(target / "abs.zip")]


def page_texts(at) -> str:
    return shown("\n".join(e.value for kind in ("markdown", "caption", "error", "success", "warning")
                           for e in at.get(kind) if isinstance(getattr(e, "value", None), str)))


def test_evaluate_uploads_stay_in_server_named_folders(env, tmpdir, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    at = open_page("ui/evaluate.py")
    at.radio(key="ev_source").set_value("Upload a COCO .zip").run()
    baseline = len(list(tmpdir.iterdir()))
    for name in hostile_names(target):
        at.file_uploader(key="ev_upload").upload(name, dataset_zip(tmp_path), "application/zip").run()
        at.button(key="ev_go").click().run()
        assert not list(target.iterdir()), "an upload was written where its name points"
        assert not at.exception, at.exception
        assert f"on {name}: 4 images" in page_texts(at)  # the user's name is shown, as given
        at.file_uploader(key="ev_upload").upload(name, b"not a zip", "application/zip").run()
        at.button(key="ev_go").click().run()
        assert f"{name} is not a readable zip file" in page_texts(at)
    assert not list(target.iterdir()) and not list(tmp_path.glob("*.zip"))
    assert len(list(tmpdir.iterdir())) == baseline + 1  # the dataset the page shows, in one folder


def test_evaluate_uploads_do_not_accumulate(env, tmpdir, tmp_path):
    at = open_page("ui/evaluate.py")
    at.radio(key="ev_source").set_value("Upload a COCO .zip").run()
    baseline = len(list(tmpdir.iterdir()))
    for _ in range(2):  # each path twice: two different good datasets, a broken one
        for n, broken in ((4, False), (5, False), (4, True)):
            at.file_uploader(key="ev_upload").upload("data.zip", dataset_zip(tmp_path, n, broken),
                                                     "application/zip").run()
            at.button(key="ev_go").click().run()
            assert not at.exception, at.exception
            assert len(list(tmpdir.iterdir())) == baseline + 1, "a dataset folder was left behind"
    errors = "\n".join(e.value for e in at.error)
    assert "data.zip" in errors and "missing.png" in errors
    assert "mrcnn-" not in errors and str(tmpdir) not in errors


def test_a_finetune_upload_the_server_cannot_store_is_one_message_and_leaves_nothing(env, tmpdir, tmp_path,
                                                                                     monkeypatch):
    import errno

    import mrcnn.files

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mrcnn.files, "atomic_write_bytes", disk_full)
    at = open_page("ui/finetune.py")
    at.radio(key="ft_source").set_value("Upload a COCO .zip").run()
    at.file_uploader(key="ft_upload").upload("pets.zip", dataset_zip(tmp_path), "application/zip").run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == ["pets.zip cannot be stored on the server: No space left on device"]
    assert not list(tmpdir.glob("mrcnn-finetune-*"))
    at.button(key="ft_start").click().run()
    assert "Choose a .zip file first." in [e.value for e in at.error]


def test_an_evaluated_upload_is_evaluated_again_after_a_page_switch_without_uploading_it_again(env, tmp_path):
    at = open_page("ui/evaluate.py")
    at.radio(key="ev_source").set_value("Upload a COCO .zip").run()
    at.file_uploader(key="ev_upload").upload("pets.zip", dataset_zip(tmp_path, 5), "application/zip").run()
    at.button(key="ev_go").click().run()
    first = at.session_state["ev_evaluation"]
    at.switch_page("ui/detect.py").run()
    at.switch_page("ui/evaluate.py").run()  # the uploader is empty again
    assert any("Using **pets.zip** (5 images)" in c.value for c in at.caption)
    at.button(key="ev_go").click().run()
    assert not at.exception, at.exception
    again = at.session_state["ev_evaluation"]
    assert again is not first and again.dataset is first.dataset  # evaluated again on the data already unpacked
    assert again.dataset_name == "pets.zip" and first.folder.path.is_dir()


def test_finetune_uploads_are_checked_named_and_cleaned_up(env, tmpdir, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    target = tmp_path / "target"
    target.mkdir()
    at = open_page("ui/finetune.py")
    at.radio(key="ft_source").set_value("Upload a COCO .zip").run()
    at.number_input(key="ft_steps").set_value(2).run()
    before = {p.name for p in tmpdir.iterdir()}
    runs = lambda: sorted((env / "runs").glob("finetune-*"))  # noqa: E731
    for name in hostile_names(target):
        runs_before = runs()
        at.file_uploader(key="ft_upload").upload(name, dataset_zip(tmp_path, 4, True), "application/zip").run()
        at.button(key="ft_start").click().run()
        assert not at.exception, at.exception
        errors = shown("\n".join(e.value for e in at.error))
        assert f"{name}: 4 images" in errors and "missing.png" in errors and "mrcnn-" not in errors
        assert runs() == runs_before  # a rejected upload leaves no run folder
        at.file_uploader(key="ft_upload").upload(name, dataset_zip(tmp_path), "application/zip").run()
        at.button(key="ft_start").click().run()
        assert not at.exception, at.exception
        job = wait_state(env / "runs", "finished")
        assert Path(job.run_dir, "upload", "annotations.json").is_file()  # the data lives with the run
        at = open_page("ui/finetune.py")
        at.radio(key="ft_source").set_value("Upload a COCO .zip").run()
        at.number_input(key="ft_steps").set_value(2).run()
    assert not list(target.iterdir()) and not list(tmp_path.glob("*.zip"))
    # what is left in the temp folder: at most the zip each session keeps, in a folder the server named
    left = [p for p in tmpdir.iterdir() if p.name not in before]
    assert all(p.name.startswith("mrcnn-finetune-") and [f.name for f in p.iterdir()] == ["upload.zip"] for p in left)
    assert len(left) <= len(hostile_names(target))


def test_a_finetune_upload_is_kept_across_pages_until_replaced_or_forgotten(env, tmpdir, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    kept = lambda: sorted(tmpdir.glob("mrcnn-finetune-*/upload.zip"))  # noqa: E731
    at = open_page("ui/finetune.py")
    at.radio(key="ft_source").set_value("Upload a COCO .zip").run()
    at.number_input(key="ft_steps").set_value(2).run()
    at.file_uploader(key="ft_upload").upload("first.zip", dataset_zip(tmp_path, 4), "application/zip").run()
    first = kept()
    assert len(first) == 1
    at.file_uploader(key="ft_upload").upload("pets.zip", dataset_zip(tmp_path, 5), "application/zip").run()
    assert len(kept()) == 1 and kept() != first  # replaced, not piled up
    at.switch_page("ui/detect.py").run()
    at.switch_page("ui/finetune.py").run()  # Streamlit's uploader is empty again; the zip is not lost
    assert not at.exception, at.exception
    assert any("Using **pets.zip**" in c.value for c in at.caption)
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    job = wait_state(env / "runs", "finished")
    assert Path(job.run_dir, "upload", "annotations.json").is_file()
    assert len(list(Path(job.run_dir, "upload", "images").iterdir())) == 5  # pets.zip's images, not first.zip's
    at.run()  # the run is over: the form is back, with the zip still kept for another run
    assert any("Using **pets.zip**" in c.value for c in at.caption) and len(kept()) == 1
    at.button(key="ft_forget_upload").click().run()
    assert kept() == [] and not any("Using **" in c.value for c in at.caption)
    at.button(key="ft_start").click().run()
    assert "Choose a .zip file first." in [e.value for e in at.error]


def test_detect_uploads_are_read_in_memory(env, tmpdir, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    at = open_page("ui/detect.py")
    baseline = len(list(tmpdir.iterdir()))
    for seed, name in enumerate(hostile_names(target)):
        image_name = name.replace(".zip", ".png")
        at.file_uploader[0].upload(image_name, png(scene(64, 80, seed=seed)), "image/png").run()
        assert not at.exception, at.exception
        assert image_name in page_texts(at)
        at.file_uploader[0].upload(image_name.replace(".png", "-bad.png"), b"not an image", "image/png").run()
        assert image_name.replace(".png", "-bad.png") in shown("\n".join(e.value for e in at.error))
    assert not list(target.iterdir())
    assert len(list(tmpdir.iterdir())) == baseline


def turn_180_by_exif(files: dict[str, bytes]) -> str:
    """Tag the zip's first image with EXIF orientation 3 (turned 180°, same size); its file_name."""
    name = sorted(n for n in files if n.startswith("images/"))[0]
    exif = Image.Exif()
    exif[0x0112] = 3
    out = io.BytesIO()
    Image.open(io.BytesIO(files[name])).save(out, "PNG", exif=exif.tobytes())
    files[name] = out.getvalue()
    return name.removeprefix("images/")


def test_evaluate_reports_the_annotations_it_skipped(env, tmp_path):
    folder = write_dataset(tmp_path / "degenerate", 2, seed=3, size=64)
    files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    ann = json.loads(files["annotations.json"])
    first = ann["annotations"][0]
    first["bbox"][2] = 0  # zero-width
    first["segmentation"] = [[10, 10, 10, 10, 10, 10]]  # three identical points
    files["annotations.json"] = json.dumps(ann).encode()
    turned = turn_180_by_exif(files)
    at = open_page("ui/evaluate.py")
    at.radio(key="ev_source").set_value("Upload a COCO .zip").run()
    at.file_uploader(key="ev_upload").upload("odd.zip", zip_bytes(files), "application/zip").run()
    at.button(key="ev_go").click().run()
    assert not at.exception, at.exception
    assert "Dataset report: 1 annotation skipped, 1 note" in [e.label for e in at.expander]
    assert f"annotation {first['id']}" in page_texts(at) and f"({turned} (turned 180°))" in page_texts(at)


def test_finetune_reports_the_annotations_it_skipped(env, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    folder = write_dataset(tmp_path / "degenerate", 6, seed=3, size=64)
    files = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    ann = json.loads(files["annotations.json"])
    first = ann["annotations"][0]
    first["bbox"][2] = 0
    first["segmentation"] = [[10, 10, 10, 10, 10, 10]]
    files["annotations.json"] = json.dumps(ann).encode()
    turned = turn_180_by_exif(files)
    at = open_page("ui/finetune.py")
    at.radio(key="ft_source").set_value("Upload a COCO .zip").run()
    at.number_input(key="ft_steps").set_value(2).run()
    at.file_uploader(key="ft_upload").upload("odd.zip", zip_bytes(files), "application/zip").run()
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    assert "Dataset report: 1 annotation skipped, 1 note" in [e.label for e in at.expander]
    assert f"annotation {first['id']}" in page_texts(at) and f"({turned} (turned 180°))" in page_texts(at)
