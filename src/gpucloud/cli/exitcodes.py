"""The CLI's exit codes: scripts branch on the kind of failure, not on its wording.

Printed by ``gpucloud --help`` and documented in docs/api.md; keep the three in step.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # invalid input (a bad amount, a bad manifest) or a refused request (400, 422)
    USAGE = 2  # a wrong command line (click's own code for usage errors)
    AUTH = 3  # no credentials, or the API refused them (401, 403)
    NOT_FOUND = 4  # 404, or the object waited for does not exist
    CONFLICT = 5  # 409: e.g. a voucher already reviewed
    SERVER = 6  # the API failed (5xx)
    UNREACHABLE = 7  # the API or the Kubernetes API server could not be reached
    TIMEOUT = 8  # `gpucloud wait` ran out of time
    FAILED = 9  # `gpucloud wait`: the object reached a final phase other than the one wanted


def for_status(status: int) -> ExitCode:
    """The exit code for an HTTP status (0: no answer at all)."""
    if status == 0:
        return ExitCode.UNREACHABLE
    if status in (401, 403):
        return ExitCode.AUTH
    if status == 404:
        return ExitCode.NOT_FOUND
    if status == 409:
        return ExitCode.CONFLICT
    if status >= 500:
        return ExitCode.SERVER
    return ExitCode.ERROR


HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.lower().replace('_', ' ')}" for c in ExitCode)
