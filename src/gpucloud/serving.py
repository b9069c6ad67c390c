"""Serve an app and its operational endpoints on two ports of one process (uvicorn).

The operational app (``/metrics``, the gateway's ``/v1/stats``, probes) listens on its
own port, which the chart does not publish through the component's Service, so tenants
and the internet reach only the main port (issue 16, finding 8).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn


def serve(app: Any, host: str, port: int, ops_app: Any, ops_host: str, ops_port: int,
          log_level: str = "warning") -> None:  # fmt: skip
    """Run both until SIGTERM/SIGINT; when either server stops, the other stops too."""

    async def both() -> None:
        main = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        )
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

    asyncio.run(both())
