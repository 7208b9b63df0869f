"""Hostile files the base corpus (tests/app/hostile_images.py) lacks: more polyglots, a JPEG whose EXIF
fills most of the per-file limit, and the extreme shapes at the edges of the limits.

`expected_status` 200 means "an image: must be answered"; for refusals a set of acceptable statuses is
given where the exact one depends on which header field the decoder reads first.
"""

from __future__ import annotations

import io
import struct
import zipfile
from functools import cache
from typing import NamedTuple

from PIL import Image

from tests.app.hostile_images import gradient_image


class ExtraFile(NamedTuple):
    name: str
    data: bytes
    statuses: frozenset[int]  # {200} for files that must decode

    @property
    def accepted(self) -> bool:
        return self.statuses == {200}


def _encode(img: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, image_format, **options)
    return buffer.getvalue()


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    assert len(payload) <= 65_533
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


@cache
def gif_javascript_polyglot() -> ExtraFile:
    """A GIF that is also a JavaScript file: width 10,799 is the bytes `/*`, the trailer is followed by `*/`.

    The browser-side trick (`<script src=image.gif>`); to the service it is a 10,799 x 16 GIF.
    """
    img = Image.new("P", (0x2A2F, 16), 0)
    img.putpalette([0, 0, 0, 200, 30, 30])
    img.paste(1, (0, 0, 5000, 16))
    data = _encode(img, "GIF")
    assert data[6:8] == b"/*"
    return ExtraFile("script.gif", data + b"*/=1;alert(document.domain);//", frozenset({200}))


@cache
def png_zip_polyglot() -> ExtraFile:
    """A PNG with a ZIP archive (holding an executable-looking file) appended: unzip and image viewers both open it."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("run.sh", "#!/bin/sh\nrm -rf ~\n")
    return ExtraFile("archive.png", _encode(gradient_image(48, 48), "PNG") + archive.getvalue(), frozenset({200}))


@cache
def jpeg_pdf_polyglot() -> ExtraFile:
    """A JPEG whose first segment is a comment holding a PDF document."""
    jpeg = _encode(gradient_image(64, 64), "JPEG", quality=90)
    pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    return ExtraFile("document.jpg", jpeg[:2] + _jpeg_segment(0xFE, pdf) + jpeg[2:], frozenset({200}))


@cache
def pdf_with_jpeg_inside() -> ExtraFile:
    """A PDF (by its first bytes) embedding a JPEG stream: not an image."""
    jpeg = _encode(gradient_image(64, 64), "JPEG", quality=90)
    data = b"%PDF-1.4\n3 0 obj<</Subtype/Image/Filter/DCTDecode>>stream\n" + jpeg + b"\nendstream endobj\n%%EOF\n"
    return ExtraFile("scan.pdf.jpg", data, frozenset({415}))


@cache
def html_with_gif_magic() -> ExtraFile:
    """An HTML page that starts with `GIF89a` to pass a naive magic-bytes check."""
    data = b"GIF89a<html><body><script>fetch('/v1/tasks')</script></body></html>"
    # Screen width from the bytes `<h` is 26,684 px: refused for its size, or as a corrupt GIF.
    return ExtraFile("page.gif", data, frozenset({413, 422}))


@cache
def jpeg_huge_exif() -> ExtraFile:
    """A 64x48 JPEG carrying 9.5 MB of metadata: a 64 KB EXIF block whose IFD claims 65,535 entries, then
    150 more APP1 segments of 64 KB. Under the 10 MB per-file limit, so it must be decoded, fast."""
    jpeg = _encode(gradient_image(64, 48), "JPEG", quality=90)
    exif = b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(256)) * 255
    filler = _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + b"<x:xmpmeta/>" * 5_400)
    return ExtraFile("huge_exif.jpg", jpeg[:2] + _jpeg_segment(0xE1, exif) + filler * 150 + jpeg[2:], frozenset({200}))


@cache
def smallest_allowed_16x16() -> ExtraFile:
    return ExtraFile("small16.png", _encode(gradient_image(16, 16), "PNG"), frozenset({200}))


@cache
def widest_allowed_12000x16() -> ExtraFile:
    """The most extreme aspect ratio the limits allow; the resize to 224 makes it a 168,000 x 224 image."""
    return ExtraFile("strip.png", _encode(Image.new("RGB", (12_000, 16), (30, 120, 200)), "PNG"), frozenset({200}))


@cache
def tall_1x20000() -> ExtraFile:
    return ExtraFile("column.png", _encode(Image.new("RGB", (1, 20_000)), "PNG"), frozenset({413}))


def extra_files() -> list[ExtraFile]:
    return [
        gif_javascript_polyglot(),
        png_zip_polyglot(),
        jpeg_pdf_polyglot(),
        pdf_with_jpeg_inside(),
        html_with_gif_magic(),
        jpeg_huge_exif(),
        smallest_allowed_16x16(),
        widest_allowed_12000x16(),
        tall_1x20000(),
    ]
