"""`tunepipe webchat`: one static page at `/`, served by the same app as the API.

The page streams from `/v1/chat/completions` itself, so the browser chat exercises exactly
the API clients get; a page instead of Gradio keeps the install small (no second web stack).
"""

from __future__ import annotations

import json
from importlib.resources import files

from fastapi.responses import HTMLResponse


def page(served) -> str:
    text = files("tunepipe.serve").joinpath("static/webchat.html").read_text(encoding="utf-8")
    model = served.model_ids[0].replace("<", "").replace('"', "")
    return (text.replace("__MODEL__", model).replace("__MAX_TOKENS__", str(served.defaults["max_tokens"]))
            .replace("__NEEDS_KEY__", json.dumps(bool(served.api_key))))


def add_webchat(app, served) -> None:
    html = page(served)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return html
