"""Image copies for the node agents: ``GET /v1/nodes/{node}/image-copies`` lists the
images the agent of ``node`` must make; ``POST .../image-copies/{id}/done`` reports one
made (with the bytes it uses), ``POST .../image-copies/{id}/failed`` one that cannot be.
Only an agent whose token is bound to ``node`` may call them, and only for copies of
that node (docs/api.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from gpucloud.api.deps import Caller, State
from gpucloud.api.guard import StrictRoute
from gpucloud.api.routes_wipes import NodeName, own_node
from gpucloud.api.schemas import (
    ImageCopiesOut,
    ImageCopyDoneIn,
    ImageCopyFailedIn,
    ImageCopyOut,
    Problem,
)
from gpucloud.ledger import ImageCopy, NotFound, WrongNode

router = APIRouter(route_class=StrictRoute, prefix="/v1", tags=["image-copies"])
CopyId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem},
    403: {"model": Problem, "description": "not an agent, or an agent of another node"},
}
_REPORT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": Problem, "description": "not the agent of this node or of this copy"},
    404: {"model": Problem, "description": "no such image copy"},
}


@router.get("/nodes/{node}/image-copies", response_model=ImageCopiesOut, responses=_ERRORS)
async def list_image_copies(node: NodeName, caller: Caller, state: State) -> ImageCopiesOut:
    """The images the agent of ``node`` must make, oldest first (at most 100). ``source``
    and ``path`` are relative to the node's data root."""
    own_node(node, caller, state)
    copies = await run_in_threadpool(state.ledger.pending_image_copies, node)
    return ImageCopiesOut(node=node, image_copies=[ImageCopyOut.model_validate(c) for c in copies])


async def _report(call: Callable[[], ImageCopy]) -> ImageCopyOut:
    try:
        done = await run_in_threadpool(call)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except WrongNode as exc:
        raise HTTPException(403, str(exc)) from None
    return ImageCopyOut.model_validate(done)


@router.post(
    "/nodes/{node}/image-copies/{copy_id}/done",
    response_model=ImageCopyOut,
    responses=_REPORT_ERRORS,
)
async def image_copy_done(
    node: NodeName, copy_id: CopyId, body: ImageCopyDoneIn, caller: Caller, state: State
) -> ImageCopyOut:
    """Report an image made, with the allocated bytes of its folder. A copy reported
    already (or cancelled) is returned as it stands: check ``outcome``."""
    own_node(node, caller, state)
    now = state.settings.clock.now()
    return await _report(
        lambda: state.ledger.complete_image_copy(copy_id, node, body.bytes_used, now)
    )


@router.post(
    "/nodes/{node}/image-copies/{copy_id}/failed",
    response_model=ImageCopyOut,
    responses=_REPORT_ERRORS,
)
async def image_copy_failed(
    node: NodeName, copy_id: CopyId, body: ImageCopyFailedIn, caller: Caller, state: State
) -> ImageCopyOut:
    """Report an image that cannot be made (its source folder is not on this node)."""
    own_node(node, caller, state)
    now = state.settings.clock.now()
    return await _report(lambda: state.ledger.fail_image_copy(copy_id, node, body.message, now))
