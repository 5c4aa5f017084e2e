"""Model zoo, checkpoints and the weights download: every failure is one clear message naming the file."""
from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import load_checkpoint, save_checkpoint
from mrcnn.errors import CheckpointError, ModelUnavailable, MrcnnError
from mrcnn.model.zoo import download_weights, list_models, load_model, resolve_device
from tests.helpers import CATEGORIES, TINY_LIGHT, shaped_state_dict


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model(TINY_LIGHT, len(CATEGORIES))
    return save_checkpoint(tmp_path / "tiny.pt", TINY_LIGHT, CATEGORIES, model.state_dict(),
                           {"steps": 3}, half=True)


def test_checkpoint_roundtrip_is_weights_only_and_rebuilds(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert ckpt["format"] == "mrcnn-checkpoint" and ckpt["version"] == 1
    loaded = load_model(str(tiny_ckpt), device="cpu")
    assert loaded.categories == CATEGORIES and loaded.arch["name"] == "light"
    assert not loaded.model.training and loaded.meta["steps"] == 3
    assert len(loaded.sha256) == 64
    assert next(loaded.model.parameters()).dtype == torch.float32  # fp16 storage loads as fp32


def test_no_temp_files_left_behind(tiny_ckpt):
    assert [p.name for p in tiny_ckpt.parent.iterdir()] == ["tiny.pt"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Temp files are created 0600; the finished file must be readable like any other (umask applies)."""
    import os
    import stat

    from mrcnn.files import atomic_write_bytes
    from mrcnn.model.checkpoint import save_checkpoint
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "card.json", b"{}")
        save_checkpoint(tmp_path / "m.pt", {"name": "light"}, ["__background__", "a"], {"w": torch.zeros(1)})
    finally:
        os.umask(old)
    for name in ("card.json", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("content,expected", [
    (b"", "file is empty"),
    (b"this is not a checkpoint at all", "not a PyTorch checkpoint"),
])
def test_garbage_files(tmp_path, content, expected):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(path)
    assert "bad.pt" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "nope.pt"))


def test_truncated_file(tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    tiny_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(tiny_ckpt)
    assert "tiny.pt" in str(err.value)


class Evil:
    """Any pickled class: weights_only loading must refuse it."""


def test_pickled_objects_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mrcnn-checkpoint", "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        load_checkpoint(path)


def test_foreign_dict_and_raw_state_dict(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"hello": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="not an mrcnn checkpoint"):
        load_checkpoint(path)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="raw state dict"):
        load_checkpoint(path)


def test_class_count_mismatch_names_keys(tmp_path):
    model = build_model(TINY_LIGHT, 6)
    path = tmp_path / "liar.pt"
    save_checkpoint(path, TINY_LIGHT, CATEGORIES, model.state_dict())  # 4 categories, 6-class weights
    with pytest.raises(CheckpointError, match="number of classes differs") as err:
        load_model(str(path))
    assert "cls_score" in str(err.value) and "liar.pt" in str(err.value)


def test_architecture_mismatch_names_first_keys(tmp_path):
    other = dict(TINY_LIGHT, depths=[2, 1, 1, 1])
    model = build_model(other, len(CATEGORIES))
    path = tmp_path / "arch.pt"
    save_checkpoint(path, TINY_LIGHT, CATEGORIES, model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected keys \\(first: backbone.body.layer1.1"):
        load_model(str(path))


def test_raw_torchvision_state_dict_with_named_architecture(tmp_path):
    sd = shaped_state_dict("maskrcnn_resnet50_fpn", 91)
    path = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    torch.save(sd, path)
    loaded = load_model("coco-r50-fpn", weights=path, device="cpu")
    assert loaded.categories[1] == "person" and len(loaded.categories) == 91
    v2 = tmp_path / "v2.pth"
    torch.save(sd, v2)
    with pytest.raises(CheckpointError, match="v2.pth: weights do not match the architecture"):
        load_model("coco-r50-fpn-v2", weights=v2)


def test_coco_weights_found_in_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    names = {i.name: i for i in list_models()}
    assert not names["coco-r50-fpn"].available and "download it from" in names["coco-r50-fpn"].reason
    assert not names["shapes"].available
    with pytest.raises(ModelUnavailable, match="coco-r50-fpn"):
        load_model("coco-r50-fpn")
    torch.save(shaped_state_dict("maskrcnn_resnet50_fpn", 91), tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    names = {i.name: i for i in list_models()}
    assert names["coco-r50-fpn"].available and len(names["coco-r50-fpn"].classes) == 80


def test_unknown_model_and_device():
    with pytest.raises(MrcnnError, match="unknown model 'nonesuch'"):
        load_model("nonesuch")
    with pytest.raises(MrcnnError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(MrcnnError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.fixture
def local_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields the base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()


def test_download_checks_hash_and_reports_progress(local_server, tmp_path):
    base, served = local_server
    payload = b"weights" * 300_000
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    (served / f"model-{prefix}.pth").write_bytes(payload)
    seen = []
    dest = tmp_path / "dest"
    path = download_weights(f"{base}/model-{prefix}.pth", dest, progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == payload
    assert seen[-1] == (len(payload), len(payload)) and len(seen) >= 2


def test_download_bad_hash_saves_nothing(local_server, tmp_path):
    base, served = local_server
    (served / "model-deadbeef.pth").write_bytes(b"not what the name promises")
    dest = tmp_path / "dest"
    with pytest.raises(ModelUnavailable, match="corrupt"):
        download_weights(f"{base}/model-deadbeef.pth", dest)
    assert not dest.exists() or not any(dest.iterdir())


def test_download_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="cannot download"):
        download_weights("http://127.0.0.1:9/model-abc.pth", tmp_path, timeout=2)


@pytest.mark.parametrize("arch, words", [
    (dict(TINY_LIGHT, fpn_channels=2_000_000), ["fpn_channels", "2000000"]),
    (dict(TINY_LIGHT, fpn_channels=-4), ["fpn_channels", "-4"]),
    (dict(TINY_LIGHT, min_size="big"), ["min_size", "'big'"]),
    (dict(TINY_LIGHT, bogus=1), ["bogus"]),
    ({"name": "resnet9000"}, ["architecture name", "resnet9000"]),
])
def test_absurd_architecture_in_a_checkpoint_is_named(tmp_path, arch, words):
    path = save_checkpoint(tmp_path / "absurd.pt", arch, CATEGORIES, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError) as err:
        load_model(str(path))
    assert "absurd.pt" in str(err.value) and all(w in str(err.value) for w in words), err.value


def test_strings_where_tensors_belong_are_named(tmp_path):
    path = tmp_path / "strings.pt"
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "arch": TINY_LIGHT, "categories": CATEGORIES,
                "state_dict": {"rpn.head.conv.0.0.weight": "a string"}, "meta": {}}, path)
    with pytest.raises(CheckpointError, match=r"strings.pt: state_dict\['rpn.head.conv.0.0.weight'\] is a str"):
        load_checkpoint(path)


def test_weights_must_be_of_the_named_models_architecture(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="tiny.pt: holds a 'light' model, but coco-r50-fpn is a "
                                              "'maskrcnn_resnet50_fpn' model"):
        load_model("coco-r50-fpn", weights=tiny_ckpt)
    r50 = save_checkpoint(tmp_path / "r50.pt", {"name": "maskrcnn_resnet50_fpn"}, CATEGORIES, {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="r50.pt: holds a 'maskrcnn_resnet50_fpn' model, but shapes"):
        load_model("shapes", weights=r50)
    assert load_model("shapes", weights=tiny_ckpt).name == "shapes"  # a fine-tuned light model is fine


def test_download_streams_into_a_temp_file_in_the_destination(local_server, tmp_path):
    base, served = local_server
    payload = bytes(range(256)) * 20_000  # 5 MB: several 1 MiB blocks
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    (served / f"model-{prefix}.pth").write_bytes(payload)
    dest = tmp_path / "dest"
    on_disk = []
    download_weights(f"{base}/model-{prefix}.pth", dest,
                     progress=lambda done, total: on_disk.append((done, sum(p.stat().st_size for p in dest.iterdir()))))
    assert len(on_disk) >= 5 and all(size == done for done, size in on_disk), on_disk
    assert [p.name for p in dest.iterdir()] == [f"model-{prefix}.pth"]


def test_download_cut_off_leaves_nothing(tmp_path, monkeypatch):
    class CutOff:
        headers = {"Content-Length": str(3 << 20)}
        blocks = [b"x" * (1 << 20)]

        def read(self, n):
            if self.blocks:
                return self.blocks.pop()
            raise ConnectionResetError(104, "Connection reset by peer")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: CutOff())
    dest = tmp_path / "dest"
    with pytest.raises(ModelUnavailable, match="cannot download .*Connection reset by peer"):
        download_weights("https://example.invalid/model-abc.pth", dest)
    assert list(dest.iterdir()) == []


def _broken(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a file can hold it but no model can run it."""
    if kind == "sparse":
        return tensor.to_sparse()
    if kind == "meta":
        return torch.empty(tensor.shape, device="meta")
    if kind == "complex":
        return tensor.to(torch.complex64)
    return torch.full_like(tensor, float(kind))  # "nan", "inf"


BROKEN = {"sparse": "is a sparse_coo tensor", "meta": "holds no values", "complex": "has dtype complex64",
          "nan": "holds NaN values", "inf": "holds infinite values"}


@pytest.mark.parametrize("kind", BROKEN)
def test_weights_no_model_can_run_are_named_without_warnings(tmp_path, kind, recwarn):
    """Sparse and meta tensors made load_state_dict raise a traceback, complex ones were cast with a raw torch
    warning, NaN or inf weights loaded and found nothing: each is one line naming the key."""
    sd = build_model(TINY_LIGHT, len(CATEGORIES)).state_dict()
    key = "roi_heads.box_head.fc6.weight"
    sd[key] = _broken(kind, sd[key])
    path = tmp_path / "broken.pt"
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "arch": TINY_LIGHT, "categories": CATEGORIES,
                "state_dict": sd, "meta": {}}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(str(path), device="cpu")
    assert str(err.value).startswith(f"{path}: state_dict[{key!r}] {BROKEN[kind]}"), str(err.value)
    assert "\n" not in str(err.value)
    assert [str(w.message) for w in recwarn] == []


def test_broken_weights_in_a_torchvision_file_are_named(tmp_path):
    sd = shaped_state_dict("maskrcnn_resnet50_fpn", 91)
    sd["rpn.head.conv.0.0.bias"] = torch.full((256,), float("nan"))
    path = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"state_dict\['rpn.head.conv.0.0.bias'\] holds NaN values"):
        load_model("coco-r50-fpn", weights=path, device="cpu")


def test_the_model_list_reads_no_weights_yet_names_what_it_can(tmp_path, monkeypatch):
    """The list maps the files (mmap) for their metadata: a sparse tensor is named there, NaN values at load."""
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(tmp_path / "runs"))
    for kind in ("sparse", "nan"):
        sd = build_model(TINY_LIGHT, len(CATEGORIES)).state_dict()
        sd["roi_heads.box_head.fc6.weight"] = _broken(kind, sd["roi_heads.box_head.fc6.weight"])
        (tmp_path / "runs" / kind).mkdir(parents=True)
        torch.save({"format": "mrcnn-checkpoint", "version": 1, "arch": TINY_LIGHT, "categories": CATEGORIES,
                    "state_dict": sd, "meta": {}}, tmp_path / "runs" / kind / "checkpoint.pt")
    listed = {Path(i.name).parent.name: i for i in list_models() if i.kind == "checkpoint"}
    assert not listed["sparse"].available and "sparse_coo tensor" in listed["sparse"].reason
    assert listed["nan"].available
    with pytest.raises(CheckpointError, match="holds NaN values"):
        load_model(listed["nan"].name, device="cpu")


@pytest.mark.parametrize("categories, message", [
    (["__background__", "circle", "circle", "square"], "category 'circle' is named more than once"),
    (["__background__", "circle", " ", "square"], "the name of category 2 is empty"),
    (["__background__", "circle", "star\nsquare", "ring"], r"the name of category 2 holds the control character '\\n'"),
    (["__background__", "circle", "__background__", "square"], "category '__background__' is named more than once"),
])
def test_class_names_must_be_distinct_and_non_empty(tmp_path, categories, message):
    """Repeated names loaded, then Detect and Inspect failed on them ("shape classes repeated")."""
    path = save_checkpoint(tmp_path / "dup.pt", TINY_LIGHT, categories, build_model(TINY_LIGHT, 4).state_dict())
    with pytest.raises(CheckpointError, match=f"dup.pt: {message}"):
        load_checkpoint(path)


def test_an_old_pickle_file_is_one_line_without_torchs_warning(tmp_path, recwarn):
    """torch.load warned "Detected pickle protocol 4" (with its source line) on stderr before the error."""
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"format": "mrcnn-checkpoint", "state_dict": {}}, protocol=4))
    with pytest.raises(CheckpointError, match="raw.pt: "):
        load_checkpoint(path)
    assert [str(w.message) for w in recwarn] == []
