"""The one place where untrusted bytes become a PIL image.

Every uploaded file goes through `decode_image`, which refuses bad input with an `ImageError` that carries a
machine-readable code (api/errors.py maps it to a status). Checks run cheapest first and all of them before any
pixel is decoded: file size, then magic bytes (Pillow never guesses the format), then the dimensions in the header
(and a JPEG's scan count). Only then is the image decoded (JPEGs at reduced scale when the caller allows it), its EXIF
orientation applied and its pixels converted to RGB.

Thread safety: `decode_image` and `resize_center_crop` keep no state between calls; each call works on its own
`BytesIO`. Global state is only set once, at import: Pillow's decoders for the six formats are registered and
Pillow's `Image.MAX_IMAGE_PIXELS` is set to None (see below).
"""

from __future__ import annotations

import importlib
import io
import re
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import ExifTags, Image

from app.errors import AppError, ErrorCode

# Register exactly the decoders we use, once, at import. Otherwise the first TIFF or WebP upload would make Pillow
# import all of its ~40 plugins lazily, inside a request.
for _plugin in ("Bmp", "Gif", "Jpeg", "Png", "Tiff", "WebP"):
    importlib.import_module(f"PIL.{_plugin}ImagePlugin")

# Pillow's own bomb guard runs inside `Image.open`, before we can apply the caller's limits. Between 1x and 2x its
# limit it only emits a DecompressionBombWarning, which cannot be caught thread-safely (`warnings.catch_warnings`
# swaps process-wide state) and would leak into logs (or fail the call under `-W error`). `decode_image` checks the
# caller's (stricter) limits itself, before Pillow allocates any pixel: from the header right after `Image.open`,
# and for GIF, whose plugin allocates while opening, even before. (libwebp reserves a WebP's canvas while opening,
# but with calloc, whose untouched pages cost no memory.) So Pillow's guard is switched off, process-wide: code that
# opens untrusted images must go through `decode_image`.
Image.MAX_IMAGE_PIXELS = None

# Beyond this aspect ratio the centre crop is taken from a central band first (`_central_band`).
MAX_EXACT_ASPECT: Final[int] = 8
ALLOWED_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_FORMAT_NAMES: Final = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF", "TIFF": "TIFF"}


# Exceptions Pillow's decoders raise on malformed data (struct.error and IndexError from header parsers, EOFError
# from short reads, ArithmeticError from nonsense header fields, Warning when warnings are errors, e.g. in pytest).
# Anything else is a bug in this module or in Pillow and should surface as one.
_DECODE_ERRORS: Final = (
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
    Image.DecompressionBombError,
    Warning,
)

_ORIENTATION_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Only used to say what a refused file looks like; it never lets anything through.
_KNOWN_OTHER_FORMATS: Final = (
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"\x00\x00\x00\x0cjxl ", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
)
_ISO_MEDIA_BRANDS: Final = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}
# The most EXIF a JPEG can carry (one APP1 segment). Parsing a bigger block, possible in PNG and WebP, costs about
# 60 ms per MB of garbage for an orientation we would then not trust anyway.
_MAX_EXIF_BYTES: Final = 65_535
# Each progressive JPEG scan makes libjpeg revisit every block, and a scan can be 46 bytes: 20,000 of them in
# 1.2 MB cost 11 s on one core (libjpeg-turbo's "LJT-01-003"). Encoders write 1 to ~12 scans; 500 is NVIDIA DALI's
# default limit for the same attack.
_MAX_JPEG_SCANS: Final = 500
_GIF_BLOCK_INTRODUCER: Final = re.compile(rb"[\x21\x2c\x3b]")
_BMP_INFO_HEADER_SIZES: Final = frozenset({12, 40, 52, 56, 64, 108, 124})


@dataclass(frozen=True)
class ImageLimits:
    """What one uploaded image may be; the defaults match the service settings."""

    max_file_bytes: int = 10 * 1024 * 1024
    min_side: int = 16
    max_side: int = 12_000
    max_pixels: int = 40_000_000


DEFAULT_LIMITS: Final = ImageLimits()


class ImageError(AppError, ValueError):
    """An upload that is not an acceptable image. `str(err)` is one line naming the problem (and the file)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


def sniff_format(data: bytes) -> str | None:
    """The allowed format `data` starts with (magic bytes only), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # classic TIFF and BigTIFF
        return "TIFF"
    # "BM" alone would accept any text starting with those letters; the info header size pins it down.
    if data.startswith(b"BM") and int.from_bytes(data[14:18], "little") in _BMP_INFO_HEADER_SIZES:
        return "BMP"
    return None


def decode_image(
    data: bytes,
    limits: ImageLimits = DEFAULT_LIMITS,
    *,
    filename: str | None = None,
    min_decode_side: int | None = None,
) -> Image.Image:
    """Decode an uploaded file into a fully loaded RGB image, or raise `ImageError`.

    `min_decode_side`: the smallest shortest side the caller needs (e.g. twice the model input). JPEGs much larger
    than that are decoded at 1/2, 1/4 or 1/8 scale, never below it. None decodes at full size.
    """
    if min_decode_side is not None and min_decode_side < 1:
        raise ValueError(f"min_decode_side must be >= 1, got {min_decode_side}")
    prefix = f"{_printable(filename)}: " if filename else ""

    if len(data) > limits.max_file_bytes:
        raise ImageError(
            ErrorCode.FILE_TOO_LARGE,
            f"{prefix}file is {len(data):,} bytes; the limit is {limits.max_file_bytes:,} bytes",
        )
    if not data:
        raise ImageError(ErrorCode.EMPTY_FILE, f"{prefix}file is empty (0 bytes)")
    image_format = sniff_format(data)
    if image_format is None:
        looks_like = _guess_other_format(data)
        allowed = ", ".join(_FORMAT_NAMES[name] for name in ALLOWED_FORMATS)
        raise ImageError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"{prefix}file is not an allowed image format{f' (it looks like {looks_like})' if looks_like else ''}; "
            f"allowed: {allowed}",
        )

    format_name = _FORMAT_NAMES[image_format]
    try:
        try:
            return _decode(data, image_format, limits, prefix, min_decode_side)
        except Warning as warning:
            # Only reachable when warnings are errors (as in the test suite). Pillow parses a JPEG's EXIF while
            # opening it and *warns* when the block is broken; a broken EXIF must not fail the image, so decode
            # again without the metadata segments, which is what happens (plus a logged warning) in production.
            if image_format != "JPEG" or isinstance(warning, Image.DecompressionBombWarning):
                raise
            return _decode(_without_jpeg_metadata(data), image_format, limits, prefix, min_decode_side)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable if someone re-enables Pillow's guard with a lower limit than ours.
        raise ImageError(ErrorCode.IMAGE_TOO_LARGE, f"{prefix}image has too many pixels ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            ErrorCode.CORRUPT_IMAGE, f"{prefix}{format_name} data is corrupt or truncated and cannot be decoded"
        ) from exc


def resize_center_crop(
    img: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize the shortest side to `size` (bicubic unless `resample` says otherwise, antialiased), then
    center-crop `size` x `size`.

    Pixel for pixel what open_clip's eval transform does to a PIL image (torchvision `Resize(size, BICUBIC)`
    then `CenterCrop(size)`; `BILINEAR` for the models whose preprocessing says so), without torchvision.
    Deliberately not faster tricks: PIL's `reducing_gap` and resizing only the crop `box` both change pixels
    (measured in docs/reliability.md). Large JPEGs are made cheap earlier, by
    `decode_image(..., min_decode_side=...)`.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = _central_band(img)
    width, height = img.size
    # torchvision: the short side becomes `size`, the long side int(size * long / short) (truncated).
    if width <= height:
        resized_width, resized_height = size, int(size * height / width)
    else:
        resized_width, resized_height = int(size * width / height), size
    resized = img.resize((resized_width, resized_height), resample)
    if resized.size == (size, size):  # a square image: the crop would be a copy of all of it
        return resized
    # torchvision's CenterCrop offsets (Python's round: half to even).
    left = round((resized_width - size) / 2.0)
    top = round((resized_height - size) / 2.0)
    return resized.crop((left, top, left + size, top + size))


def _central_band(img: Image.Image) -> Image.Image:
    """For a sliver (long side over MAX_EXACT_ASPECT x the short one), its central band of that aspect.

    The centre crop only ever shows the central short x short square, but resizing a 12,000 x 16 sliver
    whole would first make it 168,000 x 224 (seconds of CPU per image). The band keeps 3.5 short sides of
    margin on each side of that square, far beyond the bicubic filter's reach, so the crop sees the same
    pixels up to a sub-pixel shift; images up to MAX_EXACT_ASPECT stay pixel-exact with torchvision.
    """
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if long <= MAX_EXACT_ASPECT * short:
        return img
    band = MAX_EXACT_ASPECT * short
    start = (long - band) // 2
    box = (start, 0, start + band, height) if width > height else (0, start, width, start + band)
    return img.crop(box)


def _decode(
    data: bytes, image_format: str, limits: ImageLimits, prefix: str, min_decode_side: int | None
) -> Image.Image:
    # Counting the marker anywhere over-counts only by chance occurrences in metadata (about one per 64 KB).
    if image_format == "JPEG" and (scans := data.count(b"\xff\xda")) > _MAX_JPEG_SCANS:
        raise ImageError(
            ErrorCode.CORRUPT_IMAGE,
            f"{prefix}JPEG has {scans:,} scans; at most {_MAX_JPEG_SCANS} are decoded (encoders write fewer than 20)",
        )
    if image_format == "GIF":
        # Pillow's GIF plugin allocates the first frame's disposal background while *opening* the file, at the
        # size the frame declares (65,535 x 65,535 from a 43-byte file: 4 GB and ~10 s). Check that size first.
        _check_dimensions(_gif_canvas_size(data), limits, prefix)
    # `formats=[...]` stops Pillow from trying its other ~40 plugins on bytes we did not vouch for. For the other
    # formats, opening only parses the header: no pixel is allocated before the dimensions are checked.
    with Image.open(io.BytesIO(data), formats=[image_format]) as source:
        _check_dimensions(source.size, limits, prefix)
        if image_format == "JPEG" and min_decode_side is not None:
            # libjpeg's DCT scaling: decodes at 1/2, 1/4 or 1/8 scale, keeping both sides >= min_decode_side.
            source.draft("RGB", (min_decode_side, min_decode_side))
        source.load()  # GIF, TIFF, WebP and MPO: the file's first frame only; later frames are never read
        transpose = _exif_transpose_method(source)
        rgb = _to_rgb(source)
    return rgb if transpose is None else rgb.transpose(transpose)


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, prefix: str) -> None:
    width, height = size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{prefix}image is {width}x{height} px; the limit is {limits.max_side} px per side "
            f"and {limits.max_pixels:,} px in total",
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            ErrorCode.IMAGE_TOO_SMALL,
            f"{prefix}image is {width}x{height} px; each side must be at least {limits.min_side} px",
        )


def _exif_transpose_method(img: Image.Image) -> Image.Transpose | None:
    """The transpose that undoes the EXIF orientation, or None (also when the EXIF block is broken).

    Does what `ImageOps.exif_transpose` does, minus its full-image copy when there is nothing to rotate and its
    re-serialisation of the EXIF block (which can fail on the broken EXIF we want to tolerate).
    """
    if any(len(img.info.get(key, b"")) > _MAX_EXIF_BYTES for key in ("exif", "Raw profile type exif")):
        return None
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow's EXIF parser raises almost anything on garbage; a broken EXIF must not fail the image
        return None
    return _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image with the pixels of `img`."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_gray(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite over white rather than dropping alpha: fully transparent pixels often hold black or leftover
        # garbage that the encoder would otherwise see; white is what a viewer shows for a transparent logo/icon.
        rgba = img.convert("RGBA")
        composite = Image.new("RGB", rgba.size, (255, 255, 255))
        composite.paste(rgba, mask=rgba)  # blends by the alpha band; half the memory of Image.alpha_composite
        return composite
    # 1-bit, L, P, CMYK (Adobe's inverted CMYK is undone by the JPEG decoder), YCbCr; RGB is copied, which
    # detaches the result from the source file.
    return img.convert("RGB")


def _high_bit_depth_to_gray(img: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer and float gray pixels onto 0..255 (a plain convert("L") clips them to white)."""
    pixels = np.asarray(img)
    if img.mode.startswith("I;16"):
        # The top byte of the full 16-bit range, so a dark 16-bit photo stays dark and a bright one bright.
        return Image.fromarray((pixels >> 8).astype(np.uint8))
    values = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F" and low >= 0.0 and high <= 1.0:
        values *= 255.0
    elif low >= 0.0 and high <= 255.0:
        pass
    elif low >= 0.0 and high <= 65535.0:  # 16-bit samples stored as 32-bit integers (common in TIFF)
        values /= 257.0
    else:  # no conventional range: stretch what is there
        values = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _gif_canvas_size(data: bytes) -> tuple[int, int]:
    """The size Pillow gives a GIF on opening: its logical screen, grown to hold the first frame's extent."""
    width, height, flags = struct.unpack_from("<HHB", data, 6) if len(data) >= 11 else (0, 0, 0)
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global palette
    while position < len(data):  # walks blocks the way Pillow does, so both find the same first frame
        block = data[position]
        if block == 0x3B:  # trailer: no frame
            break
        if block == 0x21:  # extension: introducer, label, then length-prefixed sub-blocks up to an empty one
            position += 2
            while position < len(data) and data[position]:
                position += data[position] + 1
            position += 1
        elif block == 0x2C and position + 9 <= len(data):  # image descriptor
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, position + 1)
            return max(width, left + frame_width), max(height, top + frame_height)
        else:  # Pillow skips stray bytes one at a time; jump to the next block introducer in one go
            next_block = _GIF_BLOCK_INTRODUCER.search(data, position + 1)
            position = next_block.start() if next_block else len(data)
    return width, height


def _without_jpeg_metadata(data: bytes) -> bytes:
    """The JPEG without its APP1 (EXIF, XMP) and APP2 (ICC, MPF) segments; everything else is kept byte for byte."""
    kept = bytearray(data[:2])
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data follows, no more header segments
            break
        segment_end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker not in (0xE1, 0xE2):
            kept += data[position:segment_end]
        position = segment_end
    return bytes(kept + data[position:])


def _guess_other_format(data: bytes) -> str | None:
    head = data[:256].lstrip().lower()
    for magic, name in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic.lower()):
            return name
    if data[4:8] == b"ftyp":
        return _ISO_MEDIA_BRANDS.get(data[8:12], "an ISO media file")
    return None


def _printable(filename: str | None) -> str:
    """The client-supplied file name, safe to put into a one-line message (no control characters, bounded)."""
    text = "".join(char if char.isprintable() else "?" for char in filename or "")
    return text if len(text) <= 120 else text[:117] + "..."
