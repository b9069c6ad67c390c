"""Node wipes for the node agents: ``GET /v1/nodes/{node}/wipes`` lists the folders the
agent of ``node`` must remove, ``POST /v1/nodes/{node}/wipes/{id}/done`` reports one done.
Only an agent whose token is bound to ``node`` may call them (docs/arrears.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from gpucloud.api.deps import Caller, State, agent_node
from gpucloud.api.guard import StrictRoute
from gpucloud.api.schemas import Problem, WipeDoneIn, WipeOut, WipesOut
from gpucloud.ledger import NotFound, WrongNode

router = APIRouter(route_class=StrictRoute, prefix="/v1", tags=["wipes"])
NodeName = Annotated[
    str, PathParam(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]
WipeId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem},
    403: {"model": Problem, "description": "not an agent, or an agent of another node"},
}


def own_node(node: str, caller: Caller, state: State) -> str:
    mine = agent_node(caller, state)
    if mine != node:
        raise HTTPException(403, f"node: the caller is the agent of node {mine!r}, not of {node!r}")
    return node


@router.get("/nodes/{node}/wipes", response_model=WipesOut, responses=_ERRORS)
async def list_wipes(node: NodeName, caller: Caller, state: State) -> WipesOut:
    """The folders the agent of ``node`` must remove, oldest first (at most 100). Each
    ``path`` is relative to the node's data root."""
    own_node(node, caller, state)
    wipes = await run_in_threadpool(state.ledger.pending_wipes, node)
    return WipesOut(node=node, wipes=[WipeOut.model_validate(w) for w in wipes])


@router.post(
    "/nodes/{node}/wipes/{wipe_id}/done",
    response_model=WipeOut,
    responses={
        **_ERRORS,
        403: {"model": Problem, "description": "not the agent of this node or of this wipe"},
        404: {"model": Problem, "description": "no such wipe"},
    },
)
async def wipe_done(
    node: NodeName, wipe_id: WipeId, body: WipeDoneIn, caller: Caller, state: State
) -> WipeOut:
    """Report a wipe done with the bytes it freed. Reporting it again is a no-op that
    returns the first report."""
    own_node(node, caller, state)
    now = state.settings.clock.now()
    try:
        done = await run_in_threadpool(
            state.ledger.complete_wipe, wipe_id, node, body.bytes_freed, now
        )
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except WrongNode as exc:
        raise HTTPException(403, str(exc)) from None
    return WipeOut.model_validate(done)
