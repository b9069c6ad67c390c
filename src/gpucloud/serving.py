"""Serve an app and its operational endpoints on two ports of one process (uvicorn).

The operational app (``/metrics``, the gateway's ``/v1/stats``, probes) listens on its
own port, which the chart does not publish through the component's Service, so tenants
and the internet reach only the main port (issue 16, finding 8).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn


def loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """With ``uvloop``, uvloop's event loop where it is installed (the gateway's image
    has it, as its extra requires): the loop uvicorn's own ``loop="auto"`` would pick,
    which running the servers in our own loop bypasses; the proxy's socket reads,
    writes and callbacks cost much less CPU. Else (or not installed) asyncio's."""
    if not uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(app: Any, host: str, port: int, ops_app: Any, ops_host: str, ops_port: int,
          log_level: str = "warning", *, uvloop: bool = False,
          proxy_headers: bool = True) -> None:  # fmt: skip
    """Run both until SIGTERM/SIGINT; when either server stops, the other stops too.
    ``uvloop``: on uvloop's event loop where installed (see ``loop_factory``).
    ``proxy_headers=False``: the main app never reads the client's address, so uvicorn's
    X-Forwarded-For middleware (a layer per request) is left out."""

    async def both() -> None:
        main = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=port, log_level=log_level, access_log=False,
                proxy_headers=proxy_headers,
            )
        )  # fmt: skip
        ops = uvicorn.Server(
            uvicorn.Config(
                ops_app, host=ops_host, port=ops_port, log_level=log_level, access_log=False,
                lifespan="off",
            )
        )  # fmt: skip
        tasks = [asyncio.create_task(main.serve()), asyncio.create_task(ops.serve())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        main.should_exit = ops.should_exit = True
        await asyncio.gather(*tasks)

    with asyncio.Runner(loop_factory=loop_factory(uvloop)) as runner:
        runner.run(both())
