"""The built-in page at /: recent streams, one followed live, a demo to try.

Plain HTML and JavaScript in page.html next to this module, no build step; it
uses only the public HTTP API (native SSE, the stream listing, POST /flows).
"""

from __future__ import annotations

from importlib.resources import files

from litestar import MediaType, Response, Router, get

PAGE = files("app.protocols").joinpath("page.html").read_bytes()


@get("/", include_in_schema=False)
async def page() -> Response[bytes]:
    # no-cache: a browser revalidates, so an upgraded service serves its new page.
    return Response(PAGE, media_type=MediaType.HTML, headers={"Cache-Control": "no-cache"})


router = Router(path="/", route_handlers=[page])
