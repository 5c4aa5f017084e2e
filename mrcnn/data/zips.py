"""Dataset zips unpacked safely: every member is checked before anything is written (docs/datasets.md)."""
from __future__ import annotations

import os
import re
import stat
import zipfile
import zlib
from pathlib import Path

from mrcnn.errors import DatasetError, reason

MAX_ZIP_BYTES = 2 * 1024 ** 3   # total uncompressed size a dataset zip may unpack to
MAX_ZIP_FILES = 200_000
MAX_NAME_BYTES = 255            # one path component (NAME_MAX of common file systems)
# What reading a damaged or unusual zip raises besides BadZipFile: zlib.error (corrupt deflate data),
# NotImplementedError (a newer zip version or compression method), UnicodeDecodeError (a ValueError: a
# name flagged UTF-8 that is not), RuntimeError (encrypted), OSError and EOFError (truncated).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, ValueError, RuntimeError, OSError, EOFError)


def safe_extract_zip(zip_path: str | Path, dest_dir: str | Path, max_bytes: int = MAX_ZIP_BYTES,
                     max_files: int = MAX_ZIP_FILES) -> Path:
    """Unpack a dataset zip into ``dest_dir``; return the folder holding annotations.json.

    That folder is ``dest_dir`` itself or the zip's single top-level folder. Files beside annotations.json
    other than ``images/`` are unpacked into its ``images/`` folder, so both layouts of docs/datasets.md
    ("relative to DIR/images/ (or DIR/)") become ``DIR/images/...``. Every member is checked before
    anything is written: absolute paths, ``..``, drive letters, symlinks, a name that is both a file and a
    folder, names too long for the file system, more than ``max_files`` files or more than ``max_bytes``
    uncompressed are refused with a DatasetError. ``__MACOSX/`` and ``.DS_Store`` entries are skipped.
    Every other failure to read the zip is a DatasetError too, naming the zip and the member.
    """
    zip_path = Path(zip_path)
    name = zip_path.name
    try:
        zf = zipfile.ZipFile(zip_path)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{name}: a file name in the zip is marked UTF-8 but is not valid UTF-8 "
                           f"({err.reason} at byte {err.start}); nothing extracted") from err
    except _READ_ERRORS as err:
        raise DatasetError(f"{name} is not a readable zip file: {_reason(err)}") from err
    with zf:
        members = _checked_members(zf, name, max_bytes, max_files)
        prefix = _dataset_prefix([parts for _, parts in members], name)
        targets = _targets(members, prefix, name)

        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        dest_real = dest.resolve()
        written = 0
        for info, parts in targets:
            try:
                target = dest.joinpath(*parts)
                if not target.resolve().is_relative_to(dest_real):  # e.g. through a symlink already in dest
                    raise DatasetError(f"{name}: {info.filename!r} would be written outside the extraction folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:  # the sizes in the directory can lie
                            raise DatasetError(f"{name} unpacks to more than {max_bytes / 1e9:.1f} GB")
                        dst.write(chunk)
            except _READ_ERRORS as err:
                raise DatasetError(f"{name}: cannot extract {info.filename!r}: {_reason(err)}") from err
    return dest.joinpath(*prefix)


def _checked_members(zf: zipfile.ZipFile, name: str, max_bytes: int,
                     max_files: int) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """The members to unpack with their path parts; DatasetError for an unsafe or impossible one."""
    members: list[tuple[zipfile.ZipInfo, list[str]]] = []
    total = 0
    for info in zf.infolist():
        member = info.filename.replace("\\", "/")
        parts = [p for p in member.split("/") if p not in ("", ".")]
        if member.startswith("/") or ".." in parts or (parts and re.match(r"^[A-Za-z]:", parts[0])):
            raise DatasetError(f"{name}: refusing unsafe path {info.filename!r} "
                               "(absolute or leaving the extraction folder); nothing extracted")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetError(f"{name}: refusing symbolic link {info.filename!r}; nothing extracted")
        if any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in parts):
            raise DatasetError(f"{name}: refusing {info.filename[:60]!r}...: a file or folder name in it is "
                               f"longer than {MAX_NAME_BYTES} bytes; nothing extracted")
        if not parts or info.is_dir() or parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
            continue
        total += info.file_size
        if total > max_bytes:
            raise DatasetError(f"{name} unpacks to more than {max_bytes / 1e9:.1f} GB; nothing extracted")
        members.append((info, parts))
    if len(members) > max_files:
        raise DatasetError(f"{name} holds {len(members)} files, more than {max_files}; nothing extracted")
    return members


def _dataset_prefix(paths: list[list[str]], name: str) -> list[str]:
    """The path parts of the folder holding annotations.json: the zip's root or its single top folder."""
    files = {tuple(parts) for parts in paths}
    if ("annotations.json",) in files:
        return []
    tops = {parts[0] for parts in paths}
    if len(tops) == 1 and (*tops, "annotations.json") in files:
        return list(tops)
    raise DatasetError(f"{name}: no annotations.json at the top of the zip or in its single "
                       "top-level folder (expected annotations.json + images/); nothing extracted")


def _targets(members: list[tuple[zipfile.ZipInfo, list[str]]], prefix: list[str],
             name: str) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Where each member goes: a file beside annotations.json moves into images/ (unless images/ already
    holds that name, which file_name lookups would find first anyway). DatasetError when a path would be
    both a file and a folder (``d/x`` and ``d/x/y``), which the file system cannot hold."""
    n = len(prefix)
    taken = {tuple(parts) for _, parts in members}
    targets = []
    for info, parts in members:
        rest = parts[n:]
        if rest and rest != ["annotations.json"] and rest[0] != "images":
            moved = [*prefix, "images", *rest]
            if tuple(moved) not in taken:
                parts = moved
        targets.append((info, parts))
    files = {tuple(parts): info for info, parts in targets}
    for info, parts in targets:
        for k in range(1, len(parts)):
            if tuple(parts[:k]) in files:
                other = files[tuple(parts[:k])].filename
                raise DatasetError(f"{name}: {other!r} is a file but {info.filename!r} needs it to be a "
                                   "folder; nothing extracted")
    return targets


def _reason(err: BaseException) -> str:
    return f"{err} is not supported" if isinstance(err, NotImplementedError) else reason(err)


__all__ = ["safe_extract_zip", "MAX_ZIP_BYTES", "MAX_ZIP_FILES"]
