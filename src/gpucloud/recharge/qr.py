"""QR codes for payment URLs: a PNG for browsers and a text rendering for terminals."""

from __future__ import annotations

import io

import qrcode
from qrcode.image.pure import PyPNGImage


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
    """Two modules per character (qrcode's half-block terminal output); ``invert`` draws
    the ink in the light colour, for dark terminals."""
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(data)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=invert)
    return out.getvalue()
