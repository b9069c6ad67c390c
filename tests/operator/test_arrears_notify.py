"""The webhook notifier against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from gpucloud_operator.notify import Notifier

from gpucloud.testing.webhook import Hook, running_hook


@pytest.fixture
def hook() -> Iterator[Hook]:
    with running_hook() as server:
        yield server


def test_delivers_json_in_order(hook: Hook) -> None:
    n = Notifier(backoff_s=0.01)
    for i in range(3):
        assert n.notify(hook.url, {"type": "Arrears", "seq": i})
    assert n.join(10)
    assert [m["seq"] for m in hook.received] == [0, 1, 2] and n.delivered == 3
    assert not n.notify("", {"type": "x"})  # no URL: nothing to do
    n.close()


def test_retries_with_backoff_then_delivers(hook: Hook) -> None:
    hook.fail_first = 2
    waits: list[float] = []
    n = Notifier(backoff_s=0.05, sleep=lambda s: (waits.append(s), time.sleep(s)))
    n.notify(hook.url, {"type": "LowBalanceWarning"})
    assert n.join(10)
    assert hook.attempts == 3 and hook.received == [{"type": "LowBalanceWarning"}]
    assert waits == [0.05, 0.1]  # exponential backoff
    n.close()


def test_gives_up_and_never_blocks_the_caller() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    n = Notifier(attempts=3, backoff_s=0.05)
    t0 = time.monotonic()
    for _ in range(5):
        n.notify(dead, {"type": "Arrears"})
    assert time.monotonic() - t0 < 0.1  # enqueued only: enforcement goes on at once
    assert n.join(20)
    assert n.failed == 5 and n.delivered == 0


def test_a_slow_server_does_not_block_notify(hook: Hook) -> None:
    hook.delay_s = 0.5
    n = Notifier(timeout_s=5)
    t0 = time.monotonic()
    n.notify(hook.url, {"type": "a"})
    n.notify(hook.url, {"type": "b"})
    assert time.monotonic() - t0 < 0.1
    assert n.join(10) and [m["type"] for m in hook.received] == ["a", "b"]
