"""Files that users upload: their bytes go to temporary files and folders whose names the server makes.

The name a user gave a file is only ever shown, never joined to a path (a name such as
``../../x.zip`` or ``/etc/x.zip`` must not decide where bytes are written), and messages name that
file rather than the server's temporary paths:

    with TemporaryFolder("mrcnn-eval-") as folder:
        root = unpack_dataset_zip(upload.getvalue(), upload.name, folder.path)   # DatasetError says "bad.zip: ..."
        with naming_upload(upload.name, folder.path):
            dataset = load_dataset(root)
    # the folder and everything in it is gone here, whichever way the block was left

A ``TemporaryFolder`` can also outlive one block (a page that browses an extracted dataset across
reruns): it is removed by ``close()``, or when nothing refers to it any more, or when the process exits.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

from mrcnn.data.zips import safe_extract_zip
from mrcnn.errors import MrcnnError


class TemporaryFolder:
    """A fresh folder in the system temp folder, named by the server (``prefix`` + random)."""

    def __init__(self, prefix: str = "mrcnn-upload-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        # Unlike tempfile.TemporaryDirectory, removal when garbage-collected is intended here (a session
        # that ends drops its folder), so it gives no ResourceWarning.
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def close(self) -> None:
        """Remove the folder and everything in it (again: nothing)."""
        self._remove()

    def __enter__(self) -> TemporaryFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def saved_upload(data: bytes, suffix: str = ".zip") -> Iterator[Path]:
    """The uploaded bytes in a fresh temporary file (a server-made name ending in ``suffix``), removed
    on leaving the block, error or not."""
    fd, name = tempfile.mkstemp(prefix="mrcnn-upload-", suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield path
    finally:
        path.unlink(missing_ok=True)


def name_upload_in(message: str, display_name: str, server_paths: list[str | Path]) -> str:
    """``message`` with every server path in ``server_paths`` (and a temporary file's bare name) replaced
    by the name the user gave the upload."""
    spellings = set()
    for path in map(Path, server_paths):
        spellings.update({str(path), str(path.resolve())})
        if path.suffix:  # a temporary file: messages often give only its name
            spellings.add(path.name)
    for spelling in sorted(spellings, key=len, reverse=True):  # longest first: a folder before its parent
        message = message.replace(spelling, display_name)
    return message


@contextlib.contextmanager
def naming_upload(display_name: str, *server_paths: str | Path) -> Iterator[None]:
    """MrcnnErrors raised in the block name the upload (``display_name``) instead of ``server_paths``."""
    try:
        yield
    except MrcnnError as err:
        renamed = name_upload_in(str(err), display_name, list(server_paths))
        if renamed == str(err):
            raise
        raise type(err)(renamed) from err


def unpack_dataset_zip(data: bytes, display_name: str, dest: str | Path) -> Path:
    """Unpack an uploaded dataset zip's bytes into ``dest`` (a server-made folder) with
    ``safe_extract_zip``; return the folder holding annotations.json. The bytes pass through a
    temporary file that is removed before this returns or raises; DatasetErrors name ``display_name``.
    What was unpacked before an error stays in ``dest``: its owner removes it."""
    with saved_upload(data) as zip_path, naming_upload(display_name, zip_path, dest):
        return safe_extract_zip(zip_path, dest)


__all__ = ["TemporaryFolder", "saved_upload", "name_upload_in", "naming_upload",
           "unpack_dataset_zip"]
