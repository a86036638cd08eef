"""In-memory files served as they are: ``/static/securepub.js``, and the base of the demo page."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Final

from twisted.web.resource import Resource
from twisted.web.server import Request

from securepub.server.api import error_body

__all__ = ["CSS", "HTML", "JS", "Files", "StaticFiles", "package_file"]

JS: Final = b"text/javascript; charset=utf-8"
CSS: Final = b"text/css; charset=utf-8"
HTML: Final = b"text/html; charset=utf-8"

_COMMON_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=63072000"),
    (b"server", b"securepub"),
)


def package_file(package: str, name: str) -> bytes:
    """A file shipped in ``package``'s ``static/`` folder (read once, at start)."""
    return resources.files(package).joinpath("static", name).read_bytes()


class Files(Resource):
    """A fixed allow-list of in-memory files, looked up by the rest of the path.

    Files are read once at start; nothing maps a request path to the file
    system, so there is nothing to traverse.
    """

    isLeaf = True

    def __init__(
        self,
        files: Mapping[bytes, tuple[bytes, bytes]],
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__()
        self._files = dict(files)
        self._headers = tuple(headers)

    def _key(self, request: Request) -> bytes | None:
        postpath = request.postpath or []
        if len(postpath) > 1:
            return None
        return postpath[0] if postpath else b""

    def render(self, request: Request) -> bytes:
        key = self._key(request)
        found = self._files.get(key) if key is not None else None
        if found is None:
            return error_body(request, "not_found", "no such resource")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return error_body(request, "method_not_allowed", "method not allowed here")
        content_type, body = found
        request.setResponseCode(200)
        for name, value in (*_COMMON_HEADERS, *self._headers):
            request.setHeader(name, value)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        # twisted.web drops the body of a HEAD response itself.
        return body


class StaticFiles(Files):
    """``/static/securepub.js``, always served, importable from other origins.

    A cross-origin ``<script type="module">`` needs CORS; the file is public
    and sent without credentials, so ``Access-Control-Allow-Origin: *``.
    """

    def __init__(self) -> None:
        super().__init__(
            {b"securepub.js": (JS, package_file("securepub.clients", "securepub.js"))},
            headers=(
                (b"cache-control", b"no-cache"),
                (b"access-control-allow-origin", b"*"),
                (b"cross-origin-resource-policy", b"cross-origin"),
            ),
        )
