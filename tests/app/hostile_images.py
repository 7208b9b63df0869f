"""A corpus of hostile and awkward image files, built in memory, for any test that feeds uploads to the service.

Every builder returns a `HostileFile` (a named tuple: name, data, expected_status, expected_code). Files the
service must accept have status 200 and code None; the image tests check their pixels. Bombs are written by hand
(struct + zlib) so that building them never allocates the image they declare. Builders are cached: each file is
made once per test session.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image


class HostileFile(NamedTuple):
    name: str
    data: bytes
    expected_status: int
    expected_code: str | None


def _encode(img: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, image_format, **options)
    return buffer.getvalue()


def gradient_image(width: int, height: int) -> Image.Image:
    """A smooth RGB test picture (JPEG compresses it well, so big ones stay small)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    red = np.broadcast_to(x, (height, width))
    green = np.broadcast_to(y, (height, width))
    blue = (red + green) / 2
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bytes(width: int, height: int, idat: bytes, extra_chunks: bytes = b"") -> bytes:
    """A PNG declaring `width` x `height` 8-bit RGB, whatever `idat` actually holds."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + extra_chunks + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _gif_bytes(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A one-frame GIF whose logical screen and first frame declare the given sizes; the pixel data is 1x1.

    The frame asks to be disposed to the background: Pillow allocates that background at the frame's size while
    *opening* the file, before any caller can look at the size.
    """
    palette = b"\x00\x00\x00\xff\xff\xff"
    graphic_control = b"\x21\xf9\x04" + bytes([2 << 2]) + b"\x00\x00\x00\x00"  # disposal method 2: background
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + palette
        + graphic_control
        + b","
        + struct.pack("<HHHHB", 0, 0, *frame, 0)
        + b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one 2-byte block, terminator
        + b";"
    )


def _small_jpeg() -> bytes:
    return _encode(gradient_image(64, 48), "JPEG", quality=90)


# --- refused before decoding -------------------------------------------------------------------------------------


@cache
def zero_bytes() -> HostileFile:
    return HostileFile("zero_bytes.jpg", b"", 422, "empty_file")


@cache
def svg() -> HostileFile:
    data = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"></svg>'
    return HostileFile("image.svg", data, 415, "unsupported_format")


@cache
def html() -> HostileFile:
    return HostileFile(
        "image.jpg", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", 415, "unsupported_format"
    )


@cache
def pdf_header() -> HostileFile:
    return HostileFile(
        "scan.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", 415, "unsupported_format"
    )


@cache
def zip_archive() -> HostileFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", _small_jpeg())
    return HostileFile("photos.zip", buffer.getvalue(), 415, "unsupported_format")


@cache
def plain_text_starting_with_bm() -> HostileFile:
    # "BM" is the BMP magic; only the BMP info-header check tells this apart from a bitmap.
    return HostileFile("notes.bmp", b"BMW and other cars, a list\n" * 4, 415, "unsupported_format")


@cache
def heic_like() -> HostileFile:
    return HostileFile(
        "IMG_0001.HEIC", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, 415, "unsupported_format"
    )


@cache
def png_bomb() -> HostileFile:
    """100,000 x 100,000 RGB (30 GB of pixels) in a few KB: a few zero rows, compressed."""
    width = height = 100_000
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 8, 9)
    return HostileFile("bomb.png", _png_bytes(width, height, idat), 413, "image_too_large")


@cache
def gif_bomb() -> HostileFile:
    """A 65,535 x 65,535 logical screen (4.3 gigapixels) in 43 bytes."""
    return HostileFile("bomb.gif", _gif_bytes((65_535, 65_535), (1, 1)), 413, "image_too_large")


@cache
def gif_frame_bomb() -> HostileFile:
    """A small logical screen whose first frame claims 20,000 x 20,000; Pillow grows the image to fit the frame."""
    return HostileFile("frame_bomb.gif", _gif_bytes((16, 16), (20_000, 20_000)), 413, "image_too_large")


@cache
def jpeg_bomb() -> HostileFile:
    """A valid small JPEG whose frame header (SOF0) is patched to claim 65,500 x 65,500."""
    data = bytearray(_small_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_500, 65_500)
    return HostileFile("bomb.jpg", bytes(data), 413, "image_too_large")


@cache
def bmp_bomb() -> HostileFile:
    """A BMP header claiming 60,000 x 60,000 at 24 bits, with no pixel data at all."""
    info_header = struct.pack("<IiiHHIIiiII", 40, 60_000, 60_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    file_header = b"BM" + struct.pack("<IHHI", 14 + len(info_header), 0, 0, 14 + len(info_header))
    return HostileFile("bomb.bmp", file_header + info_header, 413, "image_too_large")


@cache
def tiff_bomb() -> HostileFile:
    """A TIFF whose first IFD claims 100,000 x 100,000 8-bit gray in one strip of 16 bytes."""
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, 100_000),  # ImageWidth
        (257, 4, 1, 100_000),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets: right after the IFD
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, 100_000),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16
    return HostileFile("bomb.tiff", data, 413, "image_too_large")


@cache
def webp_bomb() -> HostileFile:
    """An animated WebP whose canvas is 16,384 x 16,384 (1 GB as RGBA) around one 64x48 frame."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)

    def u24(value: int) -> bytes:
        return value.to_bytes(3, "little")

    frame = _encode(gradient_image(64, 48), "WEBP", quality=50)[12:]  # the VP8 chunk, after the RIFF header
    body = (
        b"WEBP"
        + chunk(b"VP8X", b"\x02\x00\x00\x00" + u24(16_384 - 1) + u24(16_384 - 1))  # flag: animated
        + chunk(b"ANIM", b"\x00" * 6)
        + chunk(b"ANMF", u24(0) + u24(0) + u24(64 - 1) + u24(48 - 1) + u24(100) + b"\x00" + frame)
    )
    return HostileFile("bomb.webp", b"RIFF" + struct.pack("<I", len(body)) + body, 413, "image_too_large")


@cache
def tiny_1x1() -> HostileFile:
    return HostileFile("pixel.png", _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), 422, "image_too_small")


@cache
def wide_20000x1() -> HostileFile:
    return HostileFile("line.png", _encode(Image.new("RGB", (20_000, 1)), "PNG"), 413, "image_too_large")


# --- allowed format, broken data ---------------------------------------------------------------------------------


@cache
def truncated_jpeg() -> HostileFile:
    data = _encode(gradient_image(256, 256), "JPEG", quality=95)
    return HostileFile("truncated.jpg", data[: len(data) * 2 // 3], 422, "corrupt_image")


@cache
def truncated_png() -> HostileFile:
    data = _encode(gradient_image(256, 256), "PNG")
    return HostileFile("truncated.png", data[: len(data) // 2], 422, "corrupt_image")


@cache
def jpeg_magic_then_garbage() -> HostileFile:
    return HostileFile("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, 422, "corrupt_image")


@cache
def png_bad_crc() -> HostileFile:
    data = bytearray(_encode(gradient_image(32, 32), "PNG"))
    data[29] ^= 0xFF  # last byte of the IHDR checksum
    return HostileFile("bad_crc.png", bytes(data), 422, "corrupt_image")


@cache
def jpeg_scan_bomb() -> HostileFile:
    """A valid progressive JPEG with 1,000 extra copies of its smallest scan.

    Each scan makes libjpeg revisit every block: on a 36-megapixel image, 20,000 such scans (1.2 MB) take 11 s.
    This one is small, so even a decoder without the guard gets through it quickly.
    """
    data = _encode(gradient_image(64, 64), "JPEG", quality=75, progressive=True)
    starts = [offset for offset in range(len(data) - 1) if data[offset : offset + 2] == b"\xff\xda"]
    ends = [*starts[1:], len(data) - 2]  # each scan runs to the next one; the last to the end-of-image marker
    smallest = min(zip(starts, ends, strict=True), key=lambda scan: scan[1] - scan[0])
    scan = data[smallest[0] : smallest[1]]
    return HostileFile("many_scans.jpg", data[:-2] + scan * 1000 + data[-2:], 422, "corrupt_image")


@cache
def png_ztxt_bomb() -> HostileFile:
    """A compressed text chunk that would inflate to 100 MB; Pillow refuses to inflate past 1 MB."""
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 100_000_000, 9))
    idat = zlib.compress((b"\x00" + b"\x80" * 3 * 32) * 32)
    return HostileFile("ztxt_bomb.png", _png_bytes(32, 32, idat, ztxt), 422, "corrupt_image")


# --- must decode -------------------------------------------------------------------------------------------------


@cache
def jpeg_html_polyglot() -> HostileFile:
    """A valid JPEG with an HTML page after its end marker: it IS a JPEG, so it decodes (the HTML is ignored)."""
    return HostileFile(
        "polyglot.jpg", _small_jpeg() + b"<html><script>alert(document.cookie)</script></html>", 200, None
    )


@cache
def png_huge_exif() -> HostileFile:
    """A 32x32 PNG carrying a 6 MB eXIf chunk whose IFD claims 65,535 entries of garbage: the EXIF is ignored."""
    exif = b"MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(256)) * (6 * 4096)
    idat = zlib.compress((b"\x00" + b"\x80" * 3 * 32) * 32)
    return HostileFile("huge_exif.png", _png_bytes(32, 32, idat, _png_chunk(b"eXIf", exif)), 200, None)


@cache
def png_huge_text() -> HostileFile:
    """A 32x32 PNG with 6 MB of plain tEXt metadata."""
    text = _png_chunk(b"tEXt", b"Comment\x00" + b"lorem ipsum " * 500_000)
    idat = zlib.compress((b"\x00" + b"\x80" * 3 * 32) * 32)
    return HostileFile("huge_text.png", _png_bytes(32, 32, idat, text), 200, None)


@cache
def cmyk_jpeg() -> HostileFile:
    """Pure red in CMYK (no cyan, full magenta and yellow), as print workflows save it."""
    return HostileFile(
        "cmyk.jpg", _encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95), 200, None
    )


@cache
def png_16bit_gray() -> HostileFile:
    """A 16-bit grayscale ramp from 0 to 65,535 across the width."""
    ramp = np.tile(np.linspace(0, 65_535, 256).astype(np.uint16), (32, 1))
    return HostileFile("gray16.png", _encode(Image.fromarray(ramp), "PNG"), 200, None)


@cache
def palette_png_with_transparency() -> HostileFile:
    """Left half palette entry 0 (black, fully transparent), right half entry 1 (opaque red)."""
    img = Image.new("P", (64, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (32, 0, 64, 32))
    return HostileFile("logo.png", _encode(img, "PNG", transparency=bytes([0, 255])), 200, None)


@cache
def rgba_png_with_hidden_garbage() -> HostileFile:
    """Fully transparent pixels whose color channels hold garbage (black); only the alpha says 'nothing here'."""
    return HostileFile("sticker.png", _encode(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "PNG"), 200, None)


@cache
def animated_gif() -> HostileFile:
    """Two frames of different sizes and colors: red 48x32 first, then blue."""
    frames = [Image.new("RGB", (48, 32), (255, 0, 0)), Image.new("RGB", (48, 32), (0, 0, 255))]
    return HostileFile(
        "anim.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), 200, None
    )


@cache
def multipage_tiff() -> HostileFile:
    """Page one is green 40x30, page two is a larger blue page."""
    pages = [Image.new("RGB", (40, 30), (0, 255, 0)), Image.new("RGB", (80, 60), (0, 0, 255))]
    return HostileFile("scan.tiff", _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), 200, None)


@cache
def jpeg_exif_orientation_6() -> HostileFile:
    """Stored 64 wide x 32 high, left half red, right half blue, tagged 'rotate 90 degrees clockwise to display'."""
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return HostileFile("phone.jpg", _encode(img, "JPEG", quality=95, exif=exif), 200, None)


@cache
def jpeg_broken_exif() -> HostileFile:
    """A valid JPEG whose APP1 EXIF block is garbage after the 'Exif' signature."""
    return HostileFile(
        "broken_exif.jpg",
        _encode(gradient_image(64, 48), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff" + b"\xab" * 200),
        200,
        None,
    )


@cache
def large_jpeg_4000x3000() -> HostileFile:
    return HostileFile("large.jpg", _encode(gradient_image(4000, 3000), "JPEG", quality=85), 200, None)


@cache
def webp() -> HostileFile:
    return HostileFile("photo.webp", _encode(gradient_image(64, 48), "WEBP", quality=90), 200, None)


@cache
def bmp() -> HostileFile:
    return HostileFile("photo.bmp", _encode(gradient_image(64, 48), "BMP"), 200, None)


HOSTILE_FILES: tuple[Callable[[], HostileFile], ...] = (
    zero_bytes,
    svg,
    html,
    pdf_header,
    zip_archive,
    plain_text_starting_with_bm,
    heic_like,
    png_bomb,
    gif_bomb,
    gif_frame_bomb,
    jpeg_bomb,
    bmp_bomb,
    tiff_bomb,
    webp_bomb,
    tiny_1x1,
    wide_20000x1,
    truncated_jpeg,
    truncated_png,
    jpeg_magic_then_garbage,
    png_bad_crc,
    jpeg_scan_bomb,
    png_ztxt_bomb,
    jpeg_html_polyglot,
    png_huge_exif,
    png_huge_text,
    cmyk_jpeg,
    png_16bit_gray,
    palette_png_with_transparency,
    rgba_png_with_hidden_garbage,
    animated_gif,
    multipage_tiff,
    jpeg_exif_orientation_6,
    jpeg_broken_exif,
    large_jpeg_4000x3000,
    webp,
    bmp,
)


def all_hostile_files() -> list[HostileFile]:
    return [build() for build in HOSTILE_FILES]
