"""`GET /docs`: an API index that works offline.

FastAPI's Swagger UI and ReDoc pages load their scripts from a CDN, so on the machines sparsedial targets
(no internet) they render blank. They are turned off (create_app); this page lists every route from the
app's own OpenAPI schema, rendered on the server with no script or external resource, and links the schema
(`/openapi.json`, for any OpenAPI tool) and the playground.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter()

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sparsedial API</title>
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
code{{background:#f3f3f3;padding:0 .25rem}}td{{padding:.2rem .6rem;vertical-align:top}}
.m{{font-weight:600;font-family:monospace}}</style></head><body>
<h1>sparsedial {version} &mdash; HTTP API</h1>
<p>Machine-readable schema: <a href="/openapi.json"><code>/openapi.json</code></a> (load it into any OpenAPI
tool). Try requests in the <a href="/">playground</a>. Every error body is
<code>{{"error": {{"message", "type", "param", "code"}}}}</code>.</p>
<table>{rows}</table></body></html>"""


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    schema = request.app.openapi()
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            summary = op.get("summary") or ""
            detail = (op.get("description") or "").split("\n\n")[0]
            rows.append(f'<tr><td class="m">{escape(method.upper())}</td><td><code>{escape(path)}</code></td>'
                        f"<td>{escape(summary)}<br><small>{escape(detail)}</small></td></tr>")
    page = _PAGE.format(version=escape(schema.get("info", {}).get("version", "")), rows="".join(rows))
    return HTMLResponse(page)
