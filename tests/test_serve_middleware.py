"""The API's middleware on a real FastAPI app, driven by httpx: a server bug is OpenAI's error
object with the CORS headers of every other answer (it used to leave them out, and a browser
page saw a bare CORS failure)."""

import asyncio
import logging

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bigjax.serving import middleware

PAGE = "https://chat.example.org"


def _app() -> FastAPI:
    app = FastAPI()
    middleware.add(app, max_body_bytes=64, allowed_origins=(PAGE,))

    @app.post("/bug")
    async def bug() -> JSONResponse:
        raise KeyError("slot 3")

    @app.post("/ok")
    async def ok() -> JSONResponse:
        return JSONResponse({"ok": True})

    return app


def test_a_server_bug_is_an_openai_error_a_browser_page_can_read(caplog):
    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            page = {"Origin": PAGE}
            return [
                await client.post("/bug", headers=page, json={}),
                await client.post("/ok", headers=page, json={}),
                await client.post("/ok", headers=page, content=b"x" * 65),
                await client.post("/bug", headers={"Origin": "https://evil.example.com"}),
            ]

    with caplog.at_level(logging.ERROR, logger="bigjax.serve"):
        bug, ok, too_big, other = asyncio.run(ask())
    assert [r.status_code for r in (bug, ok, too_big, other)] == [500, 200, 413, 500]
    assert bug.json() == {
        "error": {
            "message": "internal error: KeyError: 'slot 3'",
            "type": "server_error",
            "param": None,
            "code": 500,
        }
    }
    # every answer to the allowed page says it may read it, the bug's too; another page's not
    assert all(r.headers["access-control-allow-origin"] == PAGE for r in (bug, ok, too_big))
    assert "access-control-allow-origin" not in other.headers
    # the log has the traceback, once per bug
    failed = [r for r in caplog.records if r.getMessage() == "serve: request failed"]
    assert len(failed) == 2 and all(r.exc_info and r.exc_info[0] is KeyError for r in failed)
