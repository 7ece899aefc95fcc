"""A minimal ASGI app for uvicorn's own listener (no SO_REUSEPORT; graceful
stop on SIGTERM is uvicorn's). Answers gen=N pid=P."""

import os

GENERATION = os.environ.get("RELOADER_GENERATION", "0")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"gen={GENERATION} pid={os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
