"""QR codes for payment URLs: a PNG for browsers and a text rendering for terminals."""

from __future__ import annotations

import io

import qrcode
from qrcode.image.pure import PyPNGImage


def _matrix(data: str) -> list[list[bool]]:
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(data)
    qr.make(fit=True)
    return qr.get_matrix()


def qr_png(data: str, box_size: int = 6) -> bytes:
    qr = qrcode.QRCode(
        border=4, box_size=box_size, error_correction=qrcode.constants.ERROR_CORRECT_M
    )
    qr.add_data(data)
    qr.make(fit=True)
    buf = io.BytesIO()
    qr.make_image(image_factory=PyPNGImage).save(buf)
    return buf.getvalue()


def qr_text(data: str, invert: bool = True) -> str:
    """Two modules per character (upper/lower half blocks), dark-on-light by default."""
    matrix = _matrix(data)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    # On a dark terminal the "ink" must be drawn as the light colour, hence invert.
    glyph = {
        (False, False): "█" if invert else " ",
        (True, False): "▄" if invert else "▀",
        (False, True): "▀" if invert else "▄",
        (True, True): " " if invert else "█",
    }
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        lines.append("".join(glyph[(t, b)] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines) + "\n"
