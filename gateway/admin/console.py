"""The operator console: static files under `/ui` on the admin port.

The console is plain HTML, CSS and JavaScript shipped inside the package
(`gateway/admin/console_assets/`, no CDN, no build step). It holds no secret on the server side and
has no session of its own: the browser keeps the admin token in sessionStorage and sends it as
`Authorization: Bearer` to the same admin API the CLI uses, so every check (role, If-Match,
validation) is the API's, and no cookie exists for a cross-site request to ride on.

Every answer under `/ui` carries a Content-Security-Policy that allows scripts, styles and
fetches from this origin only, no inline script or style, no framing and no form posts; the
scripts build the page with DOM APIs and put operator-supplied strings in with `textContent`.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

ASSETS = "gateway.admin.console_assets"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every asset by file name, read once: the set is fixed when the package is installed."""
    found = {}
    for entry in resources.files(ASSETS).iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return found


def console_routes() -> list[Route]:
    """`/ui` (redirects to `/ui/`), `/ui/` (the page) and `/ui/<asset>`."""
    assets = _assets()

    def answer(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            return Response("not found\n", 404, headers=HEADERS, media_type="text/plain")
        body, media_type = found
        return Response(body, headers=HEADERS, media_type=media_type)

    async def page(request: Request) -> Response:
        return answer("index.html")

    async def asset(request: Request) -> Response:
        return answer(request.path_params["name"])

    async def to_page(request: Request) -> Response:
        return RedirectResponse("/ui/", 308, headers=HEADERS)

    return [
        Route("/ui", to_page, methods=["GET"]),
        Route("/ui/", page, methods=["GET"]),
        Route("/ui/{name}", asset, methods=["GET"]),
    ]
