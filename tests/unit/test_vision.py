"""Image input safety: strict base64, size cap before decoding, format and bomb checks,
downscaling. Every image is built in memory with Pillow."""

from __future__ import annotations

import base64
import binascii
import io
import random
import warnings

import pytest
from PIL import Image

from chatprocessor.core.errors import ImageRejected, MalformedMessage
from chatprocessor.vision import ALLOWED_FORMATS, decoded_size, prepare_image

MB = 1 << 20


def make(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", **save: object) -> bytes:
    """An image of noise (so lossy formats and truncation have real data to work on)."""
    rng = random.Random(f"{fmt}{size}{mode}")
    im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    out = io.BytesIO()
    im.save(out, fmt, **save)
    return out.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def opened(result: str) -> Image.Image:
    """The image a model would receive, decoded strictly."""
    im = Image.open(io.BytesIO(base64.b64decode(result, validate=True)))
    im.load()
    return im


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_jpeg_and_png_pass_byte_for_byte(fmt: str) -> None:
    raw = make(fmt)
    result = prepare_image(b64(raw), max_bytes=MB, max_side=1024)
    assert result == b64(raw)
    assert opened(result).size == (64, 48)


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP"])
def test_other_formats_are_reencoded_for_the_model_same_size(fmt: str) -> None:
    result = prepare_image(b64(make(fmt)), max_bytes=MB)
    im = opened(result)
    assert im.format == "JPEG"  # opaque: Ollama's decoders read JPEG and PNG only
    assert im.size == (64, 48)


def test_allowed_formats_are_the_documented_ones() -> None:
    assert frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"}) == ALLOWED_FORMATS


def test_data_url_prefix_and_mime_line_breaks_are_accepted() -> None:
    raw = make("PNG", (200, 100))
    mime = base64.encodebytes(raw).decode("ascii")  # 76-character lines
    assert "\n" in mime.strip()
    for data in (
        f"data:image/png;base64,{mime}",
        f"  DATA:image/png;base64,{mime.replace(chr(10), chr(13) + chr(10))}  ",
        f"data:;base64,{b64(raw)}",
        f"data:image/png;charset=binary;base64,{b64(raw)}",
        f"\n\t{mime}\n",
    ):
        assert prepare_image(data, max_bytes=MB) == b64(raw)  # normalized: plain base64


# -- strict base64 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "abc$def",
        "not base64!",
        b64(make("PNG")).replace("+", "-").replace("/", "_") + "-_",  # URL-safe alphabet
        b64(make("PNG"))[:-4] + "QQ=\u00e9",  # non-ASCII
        "data:text/plain;base64," + b64(make("PNG")),  # not an image data URL
        "data:image/png," + b64(make("PNG")),  # percent-encoded data URL, not base64
        b64(make("PNG"))[:100] + "\x00" + b64(make("PNG"))[100:],
    ],
)
def test_characters_outside_the_base64_alphabet_are_rejected(data: str) -> None:
    with pytest.raises(ImageRejected, match="base64"):
        prepare_image(data, max_bytes=MB)


@pytest.mark.parametrize("data", ["QQ", "QQ=", "QQ==QQ==", "=QQQ", "QQ=Q"])
def test_bad_padding_is_rejected(data: str) -> None:
    with pytest.raises(ImageRejected, match="base64"):
        prepare_image(data, max_bytes=MB)


def test_empty_input_is_rejected() -> None:
    for data in ("", "  \n", "data:image/png;base64,"):
        with pytest.raises(ImageRejected, match="empty"):
            prepare_image(data, max_bytes=MB)


def test_image_rejected_is_a_permanent_malformed_message() -> None:
    assert issubclass(ImageRejected, MalformedMessage)
    assert ImageRejected.transient is False


# -- size cap --------------------------------------------------------------------------------


def test_size_cap_is_enforced_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversized image")

    monkeypatch.setattr(binascii, "a2b_base64", no_decoding)
    monkeypatch.setattr(base64, "b64decode", no_decoding)
    data = "A" * (40 * MB)  # 30 MiB once decoded
    with pytest.raises(ImageRejected, match=rf"{30 * MB} bytes, over the limit of {MB} bytes"):
        prepare_image(data, max_bytes=MB)


def test_size_cap_is_exact() -> None:
    raw = make("PNG")
    assert prepare_image(b64(raw), max_bytes=len(raw)) == b64(raw)
    with pytest.raises(ImageRejected, match=f"{len(raw)} bytes, over the limit of {len(raw) - 1}"):
        prepare_image(b64(raw), max_bytes=len(raw) - 1)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 57, 100, 1000])
def test_decoded_size_matches_real_decoding(length: int) -> None:
    raw = bytes(i % 256 for i in range(length))
    assert decoded_size(b64(raw)) == len(raw)
    assert decoded_size("data:image/png;base64," + base64.encodebytes(raw).decode()) == len(raw)


# -- not an image, wrong format --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"hello, this is plain text and certainly not a picture\n" * 10,
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        b"\x00" * 64,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
)
def test_non_images_are_rejected(raw: bytes) -> None:
    with pytest.raises(ImageRejected, match="not an image in an allowed format"):
        prepare_image(b64(raw), max_bytes=MB)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA", "PPM", "PDF"])
def test_formats_outside_the_allowed_set_are_rejected(fmt: str) -> None:
    raw = make(fmt, (32, 32))
    if fmt != "PDF":  # Pillow itself reads it: refused by policy, not by accident
        assert Image.open(io.BytesIO(raw)).format == fmt
    with pytest.raises(ImageRejected, match="not an image in an allowed format"):
        prepare_image(b64(raw), max_bytes=MB)


# -- decompression bombs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "cause"),
    [
        # 1600 pixels: between 1x and 2x the limit, where Pillow only warns
        (40, Image.DecompressionBombWarning),
        # 2500 pixels: over 2x the limit, where Pillow raises
        (50, Image.DecompressionBombError),
    ],
)
def test_decompression_bombs_are_rejected(
    monkeypatch: pytest.MonkeyPatch, side: int, cause: type[Exception]
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected, match="too many pixels") as caught:
        prepare_image(b64(make("PNG", (side, side))), max_bytes=MB)
    assert isinstance(caught.value.__cause__, cause)


def test_images_under_the_pixel_limit_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    raw = make("PNG", (30, 30))
    assert prepare_image(b64(raw), max_bytes=MB) == b64(raw)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_guard_holds_even_if_the_warning_filter_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """catch_warnings is process-wide; another thread may undo our filter mid-call."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: None)  # as vision sees it
    with pytest.raises(ImageRejected, match="too many pixels"):
        prepare_image(b64(make("PNG", (40, 40))), max_bytes=MB)


def test_the_production_guard_is_left_on() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS > 0


# -- downscaling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"), [((3000, 1000), (1024, 341)), ((1000, 3000), (341, 1024))]
)
def test_downscale_keeps_the_aspect_ratio(size: tuple[int, int], expected: tuple[int, int]) -> None:
    im = opened(prepare_image(b64(make("PNG", size)), max_bytes=50 * MB, max_side=1024))
    assert im.size == expected
    assert im.format == "JPEG"  # opaque


def test_transparency_is_kept_as_png_when_downscaling() -> None:
    im = Image.new("RGBA", (2000, 1000), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (0, 0, 1000, 1000))  # left half fully transparent
    out = io.BytesIO()
    im.save(out, "PNG")
    small = opened(prepare_image(b64(out.getvalue()), max_bytes=MB, max_side=500))
    assert (small.format, small.mode, small.size) == ("PNG", "RGBA", (500, 250))
    assert small.getchannel("A").getpixel((10, 125)) == 0
    assert small.getpixel((490, 125)) == (255, 0, 0, 255)


def test_opaque_alpha_channel_goes_out_as_jpeg() -> None:
    raw = make("PNG", (800, 400), mode="RGBA")  # alpha channel present, every pixel opaque
    small = opened(prepare_image(b64(raw), max_bytes=10 * MB, max_side=400))
    assert (small.format, small.size) == ("JPEG", (400, 200))


def test_transparent_gif_is_reencoded_as_png() -> None:
    im = Image.new("P", (40, 20), 0)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.paste(1, (0, 0, 20, 20))
    out = io.BytesIO()
    im.save(out, "GIF", transparency=0)
    result = opened(prepare_image(b64(out.getvalue()), max_bytes=MB))
    assert (result.format, result.size) == ("PNG", (40, 20))
    assert result.convert("RGBA").getchannel("A").getpixel((30, 10)) == 0


@pytest.mark.parametrize("max_side", [0, 64, 5000])
def test_no_downscale_when_small_enough_or_disabled(max_side: int) -> None:
    raw = make("JPEG", (64, 48))
    assert prepare_image(b64(raw), max_bytes=MB, max_side=max_side) == b64(raw)


def test_exif_rotation_is_applied_when_reencoding() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    raw = make("JPEG", (300, 100), exif=exif.tobytes())
    small = opened(prepare_image(b64(raw), max_bytes=MB, max_side=150))
    assert small.size == (50, 150)  # upright, as the sender saw it


# -- corrupt input ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_truncated_images_are_rejected(fmt: str) -> None:
    raw = make(fmt, (128, 128))
    with pytest.raises(ImageRejected):
        prepare_image(b64(raw[: len(raw) * 2 // 3]), max_bytes=MB)


def test_corrupt_bytes_only_ever_raise_image_rejected() -> None:
    rng = random.Random(7)
    raw = make("PNG", (16, 16))
    samples = [raw[:cut] for cut in range(1, len(raw), 7)]
    for _ in range(100):
        broken = bytearray(raw)
        for _ in range(4):
            broken[rng.randrange(8, len(broken))] = rng.randrange(256)
        samples.append(bytes(broken))
    samples += [rng.randbytes(rng.randrange(1, 300)) for _ in range(100)]
    rejected = 0
    for sample in samples:
        try:
            result = prepare_image(b64(sample), max_bytes=MB, max_side=8)
        except ImageRejected:
            rejected += 1
        else:
            assert max(opened(result).size) <= 8  # what passes is a sound image
    assert rejected > len(samples) // 2


def test_a_small_file_declaring_a_huge_canvas_is_refused_before_decoding() -> None:
    """A 1-bit PNG of 10000x5000 is a few KB but 50 MP: refused on its size, not decoded."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    assert len(data) < 200_000
    with pytest.raises(ImageRejected, match="too many pixels: 10000x5000"):
        prepare_image(data, max_bytes=10_000_000)
