"""Image loading and validation: any file Pillow can read becomes an (H, W, 3) uint8 RGB array, or an ImageError.

    image = load_image("photo.jpg")            # a path, bytes, or a binary file-like (Streamlit's UploadedFile)
    image.array, image.name, image.width, image.height

What ``load_image`` does, in order: reads the bytes; parses only the header and refuses images with
more than ``max_pixels`` pixels before any pixel is decoded (decompression bombs included); decodes
the first frame (animated GIF/WebP, multi-page TIFF); applies the EXIF orientation; converts every
mode to RGB (transparency composited on white, 16/32-bit and float images scaled to 8 bits).
Every failure is an ``ImageError`` whose message starts with the file's name and says why, e.g.
``photo.jpg: file is truncated (could not decode image data)``; no PIL or OS error escapes.
"""
from __future__ import annotations

import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mrcnn.env_settings import env_number
from mrcnn.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "MRCNN_MAX_PIXELS"
# What the uploader offers; load_image itself reads anything Pillow can (GIF, PPM, ICO, ...).
SUPPORTED_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


@dataclass(eq=False)
class LoadedImage:
    """One decoded image: ``array`` is (H, W, 3) uint8 RGB after EXIF orientation."""

    array: np.ndarray
    name: str
    format: str | None = None  # Pillow's format name ("JPEG", "PNG", ...); None for arrays
    mode: str | None = None  # the file's own colour mode before conversion ("RGBA", "I;16", ...)

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), the order Detections.image_size uses."""
        return self.height, self.width


def max_pixels_from_env(default: int = DEFAULT_MAX_PIXELS) -> int:
    """The pixel limit: $MRCNN_MAX_PIXELS when set, ``default`` otherwise (SettingError for a bad value)."""
    return env_number(MAX_PIXELS_ENV, default, "pixels", whole=True)


def load_image(source: ImageSource, name: str | None = None, max_pixels: int | None = None) -> LoadedImage:
    """Read, check and decode one image; raise ImageError (message names the file) when it cannot be used.

    source: a path (str or Path), the file's bytes, or a binary file-like object (anything with
    ``getvalue()`` or ``read()``). name: what messages and ``LoadedImage.name`` call it (default: the
    path, the file-like's ``.name``, or "image"). max_pixels: width * height limit (default:
    $MRCNN_MAX_PIXELS or 40,000,000); Pillow's own bomb limit (2 * Image.MAX_IMAGE_PIXELS) still applies.
    """
    limit = max_pixels_from_env() if max_pixels is None else int(max_pixels)
    if limit < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels!r}")
    data, label, short_name = _read_source(source, name)
    if not data:
        raise ImageError(f"{label}: file is empty")

    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; our own limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageError(f"{label}: {_too_many_pixels(_pixels_in_message(err), limit)}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file (unrecognised format)") from None
    except Exception as err:  # noqa: BLE001 - plugins raise OSError, SyntaxError, ValueError, struct.error...
        if _looks_truncated(err) or _riff_truncated(data):
            raise ImageError(f"{label}: file is truncated (could not read the image header)") from None
        raise ImageError(f"{label}: not a readable image file ({_reason(err)})") from None

    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageError(f"{label}: image has no pixels ({width}x{height})")
        if width * height > limit:
            raise ImageError(f"{label}: {_too_many_pixels(width * height, limit, width, height)}")
        fmt, mode = im.format, im.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()  # Image.open stands on frame 0: the first frame of animated GIF/WebP and TIFF pages
        except Image.DecompressionBombError as err:
            raise ImageError(f"{label}: {_too_many_pixels(_pixels_in_message(err), limit)}") from None
        except MemoryError:
            raise ImageError(f"{label}: image is too large to decode in memory ({width}x{height})") from None
        except Exception as err:  # noqa: BLE001
            if _looks_truncated(err):
                raise ImageError(f"{label}: file is truncated (could not decode image data)") from None
            raise ImageError(f"{label}: file is corrupt (could not decode image data: {_reason(err)})") from None
        im = _apply_exif_orientation(im)
        try:
            array = _to_rgb_array(im)
        except Exception as err:  # noqa: BLE001
            raise ImageError(f"{label}: cannot convert colour mode {mode!r} to RGB ({_reason(err)})") from None
    return LoadedImage(array=array, name=short_name, format=fmt, mode=mode)


def image_from_array(array: np.ndarray, name: str = "array") -> LoadedImage:
    """Wrap an in-memory image as a LoadedImage: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha on white).

    uint8 is kept; bool becomes 0/255; other dtypes are scaled like the file modes (see ``_scale_to_uint8``).
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if a.dtype.kind not in "uif":
            raise ImageError(f"{name}: expected a numeric image array, got dtype {a.dtype}")
        a = _scale_to_uint8(a, "I;16" if a.dtype == np.uint16 else ("F" if a.dtype.kind == "f" else "I"))
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 4:
        a = _composite_on_white(Image.fromarray(np.ascontiguousarray(a), "RGBA"))
    return LoadedImage(array=np.ascontiguousarray(a, dtype=np.uint8).copy(), name=name)


# --- helpers -------------------------------------------------------------------------------------


def _read_source(source, name: str | None) -> tuple[bytes, str, str]:
    """(data, label for messages, short name for LoadedImage.name)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image"
        return bytes(source), label, label
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(source)
        short = name or path.name or str(source)
        try:
            if not path.exists():
                raise ImageError(f"{label}: file not found")
            if path.is_dir():
                raise ImageError(f"{label}: is a directory, not an image file")
            return path.read_bytes(), label, short
        except OSError as err:
            raise ImageError(f"{label}: cannot read file ({err.strerror or _reason(err)})") from None
    if hasattr(source, "getvalue") or hasattr(source, "read"):
        label = name or os.path.basename(str(getattr(source, "name", "") or "")) or "upload"
        try:
            if hasattr(source, "getvalue"):  # io.BytesIO, Streamlit's UploadedFile: whole content, any position
                data = source.getvalue()
            else:
                if getattr(source, "seekable", lambda: False)():
                    source.seek(0)
                data = source.read()
        except Exception as err:  # noqa: BLE001
            raise ImageError(f"{label}: cannot read upload ({_reason(err)})") from None
        if isinstance(data, str):
            raise ImageError(f"{label}: expected binary data, got text (open the file in 'rb' mode)")
        return bytes(data), label, label
    raise TypeError(f"load_image expects a path, bytes or a binary file-like object, got {type(source).__name__}")


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text if text else type(err).__name__


def _looks_truncated(err: BaseException) -> bool:
    text = str(err).lower()
    return (isinstance(err, (EOFError, struct.error)) or "truncated" in text or "early end" in text
            or "premature end" in text or "not enough data" in text)


def _riff_truncated(data: bytes) -> bool:
    """WebP (RIFF) files state their length; libwebp only says "could not create decoder object"."""
    return (len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
            and struct.unpack("<I", data[4:8])[0] + 8 > len(data))


def _pixels_in_message(err: BaseException) -> int | None:
    match = re.search(r"\((\d+) pixels\)", str(err))
    return int(match.group(1)) if match else None


def _too_many_pixels(pixels: int | None, limit: int, width: int | None = None, height: int | None = None) -> str:
    size = f"{width}x{height} = {pixels:,}" if width else (f"{pixels:,}" if pixels else "over Pillow's bomb limit")
    return f"image has too many pixels ({size}; the limit is {limit:,}, raise it with {MAX_PIXELS_ENV})"


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; an unreadable EXIF block leaves the pixels as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data" UserWarnings: the fallback below covers it
            return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF is common and never worth refusing the image
        return im


def _composite_on_white(rgba: Image.Image) -> np.ndarray:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High bit-depth pixels to 0..255.

    "I;16*": a 16-bit range, 65535 -> 255. "I" (32-bit int): kept when within 0..255, scaled as 16-bit
    when within 0..65535, stretched min..max otherwise. "F" (float): 0..1 -> 0..255, kept when within
    0..255, stretched min..max otherwise; NaN -> 0.
    """
    v = values.astype(np.float64)
    if mode.startswith("I;16"):
        out = v / 257.0
    else:
        finite = np.isfinite(v)
        v = np.where(finite, v, 0.0)
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = v * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = v
        elif mode != "F" and lo >= 0.0 and hi <= 65535.0:
            out = v / 257.0
        else:
            out = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(im), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
    if has_alpha:
        # P/L/RGB with a transparent colour key, LA, PA, RGBA, RGBa: Pillow turns all of them into RGBA.
        return _composite_on_white(im.convert("RGBA"))
    return np.array(im.convert("RGB"), dtype=np.uint8)  # L, 1, P, CMYK, YCbCr, HSV, RGBX, ...


__all__ = ["DEFAULT_MAX_PIXELS", "SUPPORTED_EXTENSIONS", "LoadedImage", "load_image", "image_from_array",
           "max_pixels_from_env"]
