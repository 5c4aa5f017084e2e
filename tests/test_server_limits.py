"""The server's limits from its environment (mrcnn.env_settings): a bad value is one line naming the variable,
in the app instead of its pages, and from a command that reads it, with exit status 2 and nothing written."""
from __future__ import annotations

import pytest

from mrcnn.env_settings import env_number
from mrcnn.errors import SettingError


@pytest.mark.parametrize("raw, kind, expected", [(None, {}, 7), (" 2.5 ", {}, 2.5), ("3", {"whole": True}, 3),
                                                 ("0", {"zero": True}, 0.0), ("1_000", {"whole": True}, 1000)])
def test_a_limit_is_the_variable_or_the_default(monkeypatch, raw, kind, expected):
    if raw is None:
        monkeypatch.delenv("MRCNN_TEST_LIMIT", raising=False)
    else:
        monkeypatch.setenv("MRCNN_TEST_LIMIT", raw)
    assert env_number("MRCNN_TEST_LIMIT", 7, "things", **kind) == expected


@pytest.mark.parametrize("raw, kind", [("0", {}), ("-2", {"zero": True}), ("1.5", {"whole": True}), ("nan", {}),
                                       ("inf", {"zero": True}), ("lots", {})])
def test_a_bad_limit_names_the_variable(monkeypatch, raw, kind):
    monkeypatch.setenv("MRCNN_TEST_LIMIT", raw)
    with pytest.raises(SettingError, match=rf"^MRCNN_TEST_LIMIT must be a .* of things .*got {raw!r}$"):
        env_number("MRCNN_TEST_LIMIT", 7, "things", **kind)


@pytest.mark.parametrize("name, raw, says", [
    ("MRCNN_MAX_PIXELS", "lots", "MRCNN_MAX_PIXELS must be a whole number of pixels (1 or more), got 'lots'"),
    ("MRCNN_MAX_PIXELS", "0", "MRCNN_MAX_PIXELS must be a whole number of pixels (1 or more), got '0'"),
    ("MRCNN_MAX_MODEL_UPLOAD_MB", "-1", "MRCNN_MAX_MODEL_UPLOAD_MB must be a whole number of megabytes (1 or more)"),
    ("MRCNN_MAX_VIDEO_SECONDS", "nan", "MRCNN_MAX_VIDEO_SECONDS must be a number of seconds (above 0), got 'nan'"),
    ("MRCNN_MAX_VIDEO_MB", "1e999", "MRCNN_MAX_VIDEO_MB must be a number of megabytes (above 0), got '1e999'"),
    ("MRCNN_TRACE_CACHE_GB", "inf", "MRCNN_TRACE_CACHE_GB must be a number of gigabytes (0 or more), got 'inf'"),
])
def test_every_bad_server_limit_is_one_line_in_the_app_and_the_cli(monkeypatch, tmp_path, capsys, name, raw, says):
    """Each limit from the environment: the app names it instead of showing a page (before, a bad pixel or
    model-file limit failed the page's import with a traceback); a command that reads it exits with 2."""
    from streamlit.testing.v1 import AppTest

    from mrcnn.cli import main
    from tests.test_app import APP

    monkeypatch.setenv(name, raw)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith(f"The server is misconfigured: {says}")
    inputs = {"MRCNN_MAX_PIXELS": "x.png", "MRCNN_MAX_VIDEO_SECONDS": "x.mp4"}  # what `predict` reads for each
    if name in inputs:
        (tmp_path / inputs[name]).write_bytes(b"never read: the limit is checked first")
        capsys.readouterr()
        assert main(["predict", str(tmp_path / inputs[name]), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {says}\n" and not (tmp_path / "out").exists()
