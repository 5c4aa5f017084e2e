"""Files written safely: atomically (readers see the old file or the new one, never half of one)."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


# The mode a plain open() gives a new file; mkstemp's temp files are 0600. Read once at import: setting
# the umask per write would briefly change it for every thread of the app's server.
NEW_FILE_MODE = 0o666 & ~_read_umask()


# The temp file of a write to DIR/NAME is DIR/.NAME.XXXXXXXX.tmp (mkstemp's 8 random characters). A process
# killed mid-write leaves it behind: remove_stale_temp_files() finds exactly these names.
TEMP_FILE_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _temp_file_next_to(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that unfinished atomic writes left in ``folder`` (a checkpoint's is as large
    as the checkpoint) and return their paths. Only when nothing is writing into ``folder``."""
    removed = []
    for path in Path(folder).iterdir():
        if TEMP_FILE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def removing_new_empty_folders(folder: str | Path) -> Iterator[None]:
    """Around work that may create ``folder`` and its missing parents: when the block ends (done or failed),
    those of them still empty are removed, so a command that wrote nothing leaves no folder behind. Only
    folders missing when the block began; a folder that holds anything is kept."""
    missing, path = [], Path(folder).absolute()
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)  # deepest first: the order they can be removed in
        path = path.parent
    try:
        yield
    finally:
        for path in missing:
            try:
                path.rmdir()  # only an empty folder
            except FileNotFoundError:
                continue  # never made; a parent may have been
            except OSError:
                break  # holds something: its parents are not empty either


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new content, written as it comes (a video, frame by frame): renamed
    over ``path`` when the block ends, removed when it raises."""
    path = Path(path)
    fd, tmp = _temp_file_next_to(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file in the same folder + rename."""
    path = Path(path)
    fd, tmp = _temp_file_next_to(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
