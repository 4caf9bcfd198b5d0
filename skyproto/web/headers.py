"""Response headers, set in one typed place (twisted.web's Request is untyped)."""

from __future__ import annotations

from twisted.web.http import Request

__all__ = ["set_headers"]


def set_headers(request: Request, **headers: bytes) -> None:
    """Set each header (``content_type=b"..."`` sets ``content-type``)."""
    for name, value in headers.items():
        request.setHeader(name.replace("_", "-").encode("ascii"),  # type: ignore[no-untyped-call]
                          value)
