"""mrcnn.data.images: every colour mode to RGB, EXIF orientation, first frames, bombs and bad files named."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mrcnn.errors import ImageError
from mrcnn.data.images import DEFAULT_MAX_PIXELS, SUPPORTED_EXTENSIONS, LoadedImage, image_from_array, load_image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a width x height RGB image followed by a tiny IDAT: nothing to decompress."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def check_rgb(img: LoadedImage, h: int, w: int) -> np.ndarray:
    assert isinstance(img, LoadedImage)
    assert img.array.shape == (h, w, 3) and img.array.dtype == np.uint8
    assert (img.height, img.width, img.size) == (h, w, (h, w))
    assert img.array.flags.writeable and img.array.flags.c_contiguous
    return img.array


# --- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt, ext):
    arr = noise()
    path = tmp_path / f"pic.{ext}"
    path.write_bytes(encode(Image.fromarray(arr), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    img = load_image(path)
    np.testing.assert_array_equal(check_rgb(img, 48, 64), arr)
    assert img.name == f"pic.{ext}" and img.format == fmt and img.mode == "RGB"


def test_path_str_bytes_and_file_like_give_the_same_pixels(tmp_path):
    arr = noise(seed=1)
    data = encode(Image.fromarray(arr), "PNG")
    path = tmp_path / "same.png"
    path.write_bytes(data)

    class Upload(io.BytesIO):  # like Streamlit's UploadedFile: a BytesIO with a name, maybe already read
        name = "upload.png"

    upload = Upload(data)
    upload.read()
    plain_reader = io.BufferedReader(io.BytesIO(data))  # read() only, no getvalue()
    for source, name in [(str(path), "same.png"), (data, "image"), (bytearray(data), "image"),
                         (upload, "upload.png"), (plain_reader, "upload")]:
        img = load_image(source)
        np.testing.assert_array_equal(check_rgb(img, 48, 64), arr)
        assert img.name == name
    assert load_image(data, name="given.png").name == "given.png"


def test_jpeg_is_decoded_close_to_the_original():
    arr = np.full((32, 40, 3), (200, 30, 90), np.uint8)
    img = load_image(encode(Image.fromarray(arr), "JPEG", quality=95), "a.jpg")
    assert np.abs(check_rgb(img, 32, 40).astype(int) - arr).max() <= 3


def test_supported_extensions_cover_the_uploader_list():
    assert {"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"} <= set(SUPPORTED_EXTENSIONS)
    assert all(e == e.lower() and not e.startswith(".") for e in SUPPORTED_EXTENSIONS)


# --- colour modes --------------------------------------------------------------------------------


def test_rgba_is_composited_on_white():
    arr = np.zeros((4, 5, 4), np.uint8)
    arr[..., 0] = 255
    arr[0, :, 3] = 0  # transparent row -> white
    arr[1, :, 3] = 255  # opaque row -> red
    arr[2:, :, 3] = 128  # half -> pink
    out = check_rgb(load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), "a.png"), 4, 5)
    assert (out[0] == 255).all()
    assert (out[1] == (255, 0, 0)).all()
    assert np.abs(out[2].astype(int) - (255, 127, 127)).max() <= 1


def test_la_is_composited_on_white():
    arr = np.zeros((3, 3, 2), np.uint8)  # black
    arr[0, :, 1] = 255
    out = check_rgb(load_image(encode(Image.fromarray(arr, "LA"), "PNG"), "la.png"), 3, 3)
    assert (out[0] == 0).all() and (out[1:] == 255).all()


def test_palette_with_transparency():
    im = Image.new("P", (3, 2), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.putpixel((1, 1), 1)
    out = check_rgb(load_image(encode(im, "PNG", transparency=0), "p.png"), 2, 3)
    assert (out[0, 0] == 255).all()  # index 0 is transparent -> white
    assert tuple(out[1, 1]) == (0, 0, 255)


def test_palette_without_transparency_and_grey_and_bilevel():
    im = Image.new("P", (2, 2), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    assert tuple(load_image(encode(im, "PNG"), "p.png").array[0, 0]) == (10, 200, 30)
    grey = np.array([[0, 77], [200, 255]], np.uint8)
    out = load_image(encode(Image.fromarray(grey, "L"), "PNG"), "l.png").array
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    bits = Image.new("1", (3, 2), 0)
    bits.putpixel((2, 1), 1)
    out = load_image(encode(bits, "PNG"), "1.png").array
    assert out.dtype == np.uint8 and (out[1, 2] == 255).all() and (out[0, 0] == 0).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)  # 1000 -> 4, not clipped to 255
    img = load_image(encode(Image.fromarray(values), fmt), f"deep.{fmt.lower()}")
    assert img.mode.startswith("I;16")
    np.testing.assert_array_equal(img.array[0, :, 0], [0, 100, 255, 4])
    assert (img.array[..., 0] == img.array[..., 1]).all() and (img.array[..., 1] == img.array[..., 2]).all()


def test_32_bit_int_and_float_images():
    ints = Image.fromarray(np.array([[0, 1000, 65535]], np.int32))
    img = load_image(encode(ints, "TIFF"), "i.tif")
    assert img.mode == "I"
    np.testing.assert_array_equal(img.array[0, :, 0], [0, 4, 255])
    small = Image.fromarray(np.array([[0, 17, 255]], np.int32))  # 8-bit data in a 32-bit container: kept
    np.testing.assert_array_equal(load_image(encode(small, "TIFF"), "s.tif").array[0, :, 0], [0, 17, 255])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    img = load_image(encode(floats, "TIFF"), "f.tif")
    assert img.mode == "F"
    np.testing.assert_array_equal(img.array[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], np.float32))  # any other range: stretched
    np.testing.assert_array_equal(load_image(encode(wide, "TIFF"), "w.tif").array[0, :, 0], [0, 64, 255])


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    im = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    out = check_rgb(load_image(encode(im, fmt), f"c.{fmt.lower()}"), 4, 4)
    assert np.abs(out[0, 0].astype(int) - (255, 0, 0)).max() <= 3


# --- orientation and frames ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates(fmt):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored landscape: 20 high, 40 wide
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = load_image(encode(im, fmt, exif=exif.tobytes()), f"rot.{fmt.lower()}")
    out = check_rgb(img, 40, 20)
    # 90 degrees clockwise: the stored left (red) half becomes the top.
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_malformed_exif_does_not_refuse_the_image():
    arr = noise(8, 8)
    data = encode(Image.fromarray(arr), "PNG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    np.testing.assert_array_equal(load_image(data, "odd.png").array, arr)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (10, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = check_rgb(load_image(data, "anim.gif"), 6, 10)
    assert (out == (255, 0, 0)).all()


def test_animated_webp_gives_the_first_frame():
    frames = [Image.new("RGB", (10, 6), c) for c in ((0, 255, 0), (255, 0, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    out = check_rgb(load_image(data, "anim.webp"), 6, 10)
    assert (out == (0, 255, 0)).all()


# --- refusals ------------------------------------------------------------------------------------


def test_pixel_limit_refuses_before_decoding(monkeypatch):
    monkeypatch.delenv("MRCNN_MAX_PIXELS", raising=False)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    # 8000 x 8000 = 64 MP: over our 40 MP default, under Pillow's own limit. The header is all there is,
    # so reaching the decoder would say "truncated" instead.
    with pytest.raises(ImageError, match=r"^huge\.png: image has too many pixels \(8000x8000 = 64,000,000"):
        load_image(png_claiming(8000, 8000), "huge.png")
    with pytest.raises(ImageError, match="truncated"):  # the same lie under a raised limit reaches the decoder
        load_image(png_claiming(8000, 8000), "huge.png", max_pixels=70_000_000)


def test_decompression_bomb_is_an_image_error_not_a_pil_error():
    # 100k x 100k: Pillow itself raises DecompressionBombError while opening; it must come out as ImageError.
    with pytest.raises(ImageError, match=r"^bomb\.png: image has too many pixels \(10,000,000,000"):
        load_image(png_claiming(100_000, 100_000), "bomb.png")


def test_max_pixels_argument_and_environment(monkeypatch):
    data = encode(Image.fromarray(noise(10, 10)), "PNG")
    with pytest.raises(ImageError, match=r"small\.png: .*10x10 = 100; the limit is 99"):
        load_image(data, "small.png", max_pixels=99)
    assert load_image(data, "small.png", max_pixels=100).size == (10, 10)
    monkeypatch.setenv("MRCNN_MAX_PIXELS", "50")
    with pytest.raises(ImageError, match="the limit is 50"):
        load_image(data, "small.png")
    assert load_image(data, "small.png", max_pixels=1000).size == (10, 10)  # the argument wins


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nowhere\.jpg: file not found$"):
        load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: file is empty$"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match=r"^image: file is empty$"):
        load_image(b"")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a picture\n")
    with pytest.raises(ImageError, match=r"notes\.txt: not an image file"):
        load_image(path)
    with pytest.raises(ImageError, match=r"^photo\.jpg: not an image file"):  # a wrong extension changes nothing
        load_image(b"<html>nope</html>", "photo.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_truncated_files_are_named(fmt, keep):
    data = encode(Image.fromarray(noise(120, 160, seed=2)), fmt)
    cut = data[: int(len(data) * keep)]
    with pytest.raises(ImageError, match=rf"^photo\.{fmt.lower()}: file is truncated \(could not "):
        load_image(cut, f"photo.{fmt.lower()}")


def test_corrupt_data_never_leaks_a_raw_error():
    good = encode(Image.fromarray(noise(64, 64, seed=3)), "PNG")
    rng = np.random.default_rng(0)
    for trial in range(20):
        bad = bytearray(good)
        at = rng.integers(8, len(bad), 12)
        bad[at[0]:at[0] + 1] = b""  # drop a byte
        for i in at[1:]:
            bad[int(i) % len(bad)] ^= 0xFF
        try:
            load_image(bytes(bad), "x.png")
        except ImageError as err:
            assert str(err).startswith("x.png: ")


def test_text_mode_file_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abc")
    with open(path) as fh:
        with pytest.raises(ImageError, match="binary"):
            load_image(fh, "a.txt")


def test_unsupported_source_type():
    with pytest.raises(TypeError):
        load_image(12345)


# --- arrays --------------------------------------------------------------------------------------


def test_image_from_array():
    arr = noise(5, 7)
    img = image_from_array(arr, "cam")
    np.testing.assert_array_equal(check_rgb(img, 5, 7), arr)
    assert img.name == "cam" and img.array is not arr
    grey = image_from_array(np.full((3, 4), 9, np.uint8)).array
    assert grey.shape == (3, 4, 3) and (grey == 9).all()
    assert (image_from_array(np.ones((2, 2, 3), np.float32)).array == 255).all()
    assert (image_from_array(np.ones((2, 2), bool)).array == 255).all()
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> white
    assert (image_from_array(rgba).array == 255).all()
    with pytest.raises(ImageError, match="shape"):
        image_from_array(np.zeros((4, 4, 2), np.uint8), "two-channel")
