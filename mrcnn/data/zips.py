"""Dataset zips unpacked safely: every member is checked before anything is written (docs/datasets.md)."""
from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

from mrcnn.errors import DatasetError

MAX_ZIP_BYTES = 2 * 1024 ** 3   # total uncompressed size a dataset zip may unpack to
MAX_ZIP_FILES = 200_000


def safe_extract_zip(zip_path: str | Path, dest_dir: str | Path, max_bytes: int = MAX_ZIP_BYTES,
                     max_files: int = MAX_ZIP_FILES) -> Path:
    """Unpack a dataset zip into ``dest_dir``; return the folder holding annotations.json.

    That folder is ``dest_dir`` itself or the zip's single top-level folder. Every member is checked
    before anything is written: absolute paths, ``..``, drive letters, symlinks, more than ``max_files``
    files or more than ``max_bytes`` uncompressed are refused with a DatasetError. ``__MACOSX/`` and
    ``.DS_Store`` entries are skipped.
    """
    zip_path = Path(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetError(f"{zip_path.name} is not a readable zip file: {err}") from err
    with zf:
        members: list[tuple[zipfile.ZipInfo, list[str]]] = []
        total = 0
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or ".." in parts or (parts and re.match(r"^[A-Za-z]:", parts[0])):
                raise DatasetError(f"{zip_path.name}: refusing unsafe path {info.filename!r} "
                                   "(absolute or leaving the extraction folder); nothing extracted")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{zip_path.name}: refusing symbolic link {info.filename!r}; nothing extracted")
            if not parts or info.is_dir() or parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
                continue
            total += info.file_size
            if total > max_bytes:
                raise DatasetError(f"{zip_path.name} unpacks to more than {max_bytes / 1e9:.1f} GB; nothing extracted")
            members.append((info, parts))
        if len(members) > max_files:
            raise DatasetError(f"{zip_path.name} holds {len(members)} files, more than {max_files}; nothing extracted")

        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        dest_real = dest.resolve()
        written = 0
        for info, parts in members:
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest_real):  # e.g. through a symlink already in dest
                raise DatasetError(f"{zip_path.name}: {info.filename!r} would be written outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:  # the sizes in the directory can lie
                            raise DatasetError(f"{zip_path.name} unpacks to more than {max_bytes / 1e9:.1f} GB")
                        dst.write(chunk)
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError) as err:
                raise DatasetError(f"{zip_path.name}: cannot extract {info.filename!r}: {err}") from err

    if (dest / "annotations.json").is_file():
        return dest
    tops = {parts[0] for _, parts in members}
    if len(tops) == 1 and (dest / next(iter(tops)) / "annotations.json").is_file():
        return dest / next(iter(tops))
    raise DatasetError(f"{zip_path.name}: no annotations.json at the top of the zip or in its single "
                       "top-level folder (expected annotations.json + images/)")


__all__ = ["safe_extract_zip", "MAX_ZIP_BYTES", "MAX_ZIP_FILES"]
