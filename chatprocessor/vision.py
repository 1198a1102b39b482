"""Checks an attached image before it reaches a vision model.

Images arrive as base64 from untrusted senders, so each step is cheapest-first: the size
is capped from the text length before anything is decoded, the base64 is decoded strictly,
and only then does Pillow parse it, limited to a few formats and with its
decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) left on. Every failure is an
:class:`ImageRejected` (permanent: the job is dead-lettered with the reason).

Decoding and resampling cost CPU (up to some hundred milliseconds for a large photo): call
:func:`prepare_image` from a thread (``asyncio.to_thread``), not on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from chatprocessor.core.errors import ImageRejected

#: Formats Pillow may parse. Common photo and screenshot formats only: each extra plugin is
#: more parser code run on hostile bytes (TIFF, ICO, PSD, ... are refused, never parsed).
#: Largest canvas decoded (40 MP: any phone photo): every decoded copy of a bigger one
#: costs hundreds of MB, whatever the size of its file.
MAX_PIXELS = 40_000_000

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

#: Formats sent to the model as they came: the only ones every Ollama runner decodes (WEBP,
#: for one, is silently dropped by llama.cpp's stb_image: ollama#2457, #17755), so WEBP, GIF
#: and BMP are re-encoded.
_PASSTHROUGH = frozenset({"JPEG", "PNG"})

_PARSE_ORDER = sorted(ALLOWED_FORMATS)
_DATA_URL = re.compile(r"\s*data:(?:image/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*;base64,", re.I)
_NO_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


def _normalize(data: str) -> str:
    """Drop an optional ``data:image/...;base64,`` prefix and ASCII whitespace (MIME line
    breaks); every other character is left for the strict decoder to refuse."""
    prefix = _DATA_URL.match(data)
    return data[prefix.end() if prefix else 0 :].translate(_NO_WHITESPACE)


def decoded_size(data: str) -> int:
    """Bytes ``data`` (base64, optionally a data URL with line breaks) decodes to, computed
    from its length alone so an oversized image is refused without decoding it. Exact for
    valid base64; for invalid input it is only an estimate, and decoding then fails anyway."""
    text = _normalize(data)
    padding = len(text) - len(text.rstrip("="))
    return max(0, len(text) * 3 // 4 - min(padding, 2))


def _has_alpha(im: Image.Image) -> bool:
    """True when some pixel is at least partly transparent (an opaque alpha channel, as in
    most screenshots, does not count: such images are sent as the smaller JPEG)."""
    if not im.has_transparency_data:
        return False
    return im.convert("RGBA").getchannel("A").getextrema() != (255, 255)


def prepare_image(data: str, *, max_bytes: int, max_side: int = 0) -> str:
    """Checked, possibly downscaled image as plain base64 for a vision model.

    Refuses (ImageRejected, saying why) input that is not strict base64, decodes to more
    than ``max_bytes`` (checked before decoding), is not an image of ALLOWED_FORMATS, is
    truncated or corrupt, or has more pixels than Pillow's bomb guard allows. An image whose
    longer side exceeds ``max_side`` (when > 0) is shrunk to it, aspect ratio kept; JPEG and
    PNG otherwise go out byte for byte, other formats re-encoded (only the first frame of an
    animation is kept).
    """
    text = _normalize(data)
    size = decoded_size(text)
    if size > max_bytes:
        raise ImageRejected(f"image is {size} bytes, over the limit of {max_bytes} bytes")
    if not text:
        raise ImageRejected("image is empty")
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise ImageRejected(f"image is not valid base64: {exc}") from exc
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; refuse there too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=_PARSE_ORDER) as probe:
                probe.verify()  # structure and checksums; the object is unusable afterwards
            with Image.open(io.BytesIO(raw), formats=_PARSE_ORDER) as im:
                # A small file can declare a huge canvas: refuse before decoding a pixel.
                if im.width * im.height > MAX_PIXELS:
                    raise ImageRejected(
                        f"image has too many pixels: {im.width}x{im.height}, over {MAX_PIXELS}"
                    )
                im.load()  # decodes every pixel: catches truncation that verify() misses
                return _finish(im, raw, max_side)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        allowed = ", ".join(_PARSE_ORDER)
        raise ImageRejected(f"not an image in an allowed format ({allowed})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image has too many pixels: {exc}") from exc
    except Exception as exc:
        # Pillow's parsers raise a wide, undocumented range on hostile bytes (OSError,
        # SyntaxError, struct.error, EOFError, IndexError, ...).
        raise ImageRejected(f"not a usable image: {type(exc).__name__}: {exc}") from exc


def _finish(im: Image.Image, raw: bytes, max_side: int) -> str:
    """The base64 to send: ``raw`` itself when it may pass as is, else a re-encoding."""
    # Also checked here because catch_warnings is process-wide, hence racy across threads.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, limit {limit}")
    if im.format not in ALLOWED_FORMATS:
        raise ImageRejected(f"image format {im.format} is not allowed")
    shrink = max_side > 0 and max(im.size) > max_side
    if not shrink and im.format in _PASSTHROUGH:
        return base64.b64encode(raw).decode("ascii")
    # PNG only when transparency must survive, JPEG quality 90 otherwise. Re-encoding drops
    # EXIF, so its rotation is applied first to keep the photo upright.
    alpha = _has_alpha(im)
    out_im = ImageOps.exif_transpose(im).convert("RGBA" if alpha else "RGB")
    if shrink:
        out_im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if alpha:
        out_im.save(out, "PNG", optimize=True)
    else:
        out_im.save(out, "JPEG", quality=90)
    return base64.b64encode(out.getvalue()).decode("ascii")
