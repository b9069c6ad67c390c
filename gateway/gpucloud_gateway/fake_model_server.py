"""A small OpenAI-compatible model server with deterministic usage, for tests and benches.

``POST /v1/chat/completions`` (``stream: true`` sends server-sent events, with a final
``usage`` chunk when ``stream_options.include_usage`` is set), ``POST
/v1/images/generations`` (``n`` images), ``POST /v1/videos/generations`` (``n`` videos),
``GET /healthz``, ``GET /debug/headers`` (the request headers it got). A chat body's
``fake_latency_ms`` delays that answer (a slow model, for runtime billing). Token counts:
``prompt_tokens`` is the number of whitespace-separated
words in the messages, ``completion_tokens`` is ``max_tokens`` (default 16).

``--register FILE --key NS/MODEL`` adds this server's URL to a JSON endpoints map once it
listens and removes it on exit: the gateway's file endpoint source reads that map.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def count_prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            words += len(content.split())
    if isinstance(body.get("prompt"), str):
        words += len(body["prompt"].split())
    return words


def build_app(model: str, latency_ms: int = 0, token_ms: int = 0, die_after: int = 0) -> Starlette:
    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def chat(request: Request) -> Response:
        body = await body_of(request)
        prompt = count_prompt_tokens(body)
        completion = int(body.get("max_tokens") or 16)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        # a fake's knob: "fake_latency_ms" in the body stands for a slow model's work
        # (tests of per-second billing through a deployed image, which has no flags)
        delay_ms = int(body.get("fake_latency_ms") or latency_ms)
        if delay_ms:
            await asyncio.sleep(min(delay_ms, 60_000) / 1000)
        created = int(time.time())
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": " ".join(f"tok{i}" for i in range(completion)),
                            },
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            for i in range(completion):
                if die_after and i == die_after:  # a replica crashing mid-stream
                    await asyncio.sleep(0.05)  # let the chunks written so far leave
                    os._exit(1)
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if token_ms:
                    await asyncio.sleep(token_ms / 1000)
            if include_usage:
                final = {"id": "chatcmpl-fake", "choices": [], "usage": usage}
                yield f"data: {json.dumps(final)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def generations(request: Request, what: str) -> Response:
        body = await body_of(request)
        n = int(body.get("n") or 1)
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        key = "b64_json" if what == "image" else "url"
        data = [{key: f"fake-{what}-{i}"} for i in range(n)]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def images(request: Request) -> Response:
        return await generations(request, "image")

    async def videos(request: Request) -> Response:
        return await generations(request, "video")

    async def headers(request: Request) -> Response:
        return JSONResponse(dict(request.headers))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "model": model, "pid": os.getpid()})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
            Route("/v1/videos/generations", videos, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/debug/headers", headers),
        ]
    )


@contextlib.contextmanager
def _locked_map(path: Path) -> Any:
    """Read-modify-write the JSON endpoints map under an exclusive lock, atomically."""
    with open(path.with_suffix(path.suffix + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            current = {}
        yield current
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=1))
        tmp.replace(path)


def register(path: Path, key: str, url: str, add: bool) -> None:
    with _locked_map(path) as current:
        urls = [u for u in current.get(key, []) if u != url]
        current[key] = [*urls, url] if add else urls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    # PORT and MODEL_NAME: what the operator's model Deployments pass every replica
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0")),
                   help="0: any free port")  # fmt: skip
    p.add_argument("--model", default=os.environ.get("MODEL_NAME", "fake-model"))
    p.add_argument("--latency-ms", type=int, default=0, help="delay before each response")
    p.add_argument("--token-ms", type=int, default=0, help="delay between streamed tokens")
    p.add_argument(
        "--die-after", type=int, default=0, help="exit abruptly after streaming N tokens"
    )
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before listening")
    p.add_argument("--register", type=Path, help="JSON endpoints map to add this server to")
    p.add_argument("--key", help="the map key: NAMESPACE/MODEL")
    p.add_argument("--port-file", type=Path, help="write the bound port here")
    args = p.parse_args(argv)
    if args.register and not args.key:
        p.error("--register needs --key NAMESPACE/MODEL")

    time.sleep(args.startup_delay)  # a model loading its weights
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it a response written in two parts waits for a delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    url = f"http://{args.host}:{port}"
    app = build_app(args.model, args.latency_ms, args.token_ms, args.die_after)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if args.port_file:
            args.port_file.write_text(str(port))
        if args.register:
            register(args.register, args.key, url, add=True)
        print(f"listening {url}", flush=True)
        await task

    def stop(*_: Any) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(serve())
    finally:
        if args.register:
            register(args.register, args.key, url, add=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
