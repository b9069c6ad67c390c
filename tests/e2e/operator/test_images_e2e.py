"""Images end to end on the kwok test bed: the operator process, a real SQLite ledger,
the real API and a real agent process for the node that held the instance's data. The
Image stays Creating until that agent copied the folder; it is Ready with the agent's
measured bytes, and its meter rates the agent's hourly measurement of the image at a
price that does not divide evenly; deleting it has the same agent remove the folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opharness import Harness, node_agent

from gpucloud.billing import to_minor
from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import REPO, Testbed

pytestmark = pytest.mark.e2e

L40S = "NVIDIA-L40S"
PRICE_TEXT = "7.37"  # per GiB-hour of image: odd on purpose
PRICE = Fraction(PRICE_TEXT)
PRICEBOOK = "images-e2e"


@pytest.fixture
def images(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    pb = yaml.safe_load((REPO / "examples/pricebook.yaml").read_text())
    pb["metadata"]["name"] = PRICEBOOK
    pb["spec"]["storage"]["imagePerGBHour"] = PRICE_TEXT
    testbed.apply([pb])
    h = Harness(
        testbed,
        namespace,
        tmp_path,
        data_root=tmp_path / "data",
        storage_interval_s=0.5,
        pricebook=PRICEBOOK,
    )
    h.setup()
    yield h
    h.close()
    testbed.kubectl("delete", "pricebook", PRICEBOOK, "--wait=false", check=False)


def image(h: Harness, name: str) -> dict[str, Any]:
    return get_json(h.tb, "image", name, "-n", h.ns).get("status") or {}


def disk_cursor(agent: str) -> datetime | None:
    """The start of the hour the agent measures next (None before its first look)."""
    try:
        cursor = httpx.get(f"{agent}/debug/state", timeout=2).json().get("disk_cursor")
    except httpx.HTTPError:
        return None
    return None if cursor is None else datetime.fromtimestamp(cursor, UTC)


def test_image_is_made_by_its_nodes_agent_and_billed_by_measured_bytes(images: Harness) -> None:
    h = images
    h.fund(50_00)
    h.start()
    h.instance("job", L40S)
    node = h.wait_phase("job", "Running")["volumeNode"]
    data = h.tmp / "data/instances" / h.ns / "job"  # the node's folder (kwok: no kubelet)
    (data / "ckpt").mkdir(parents=True)
    (data / "ckpt/model.pt").write_bytes(os.urandom(24_000_000))
    (data / "tenant.txt").write_text("mine\n")
    h.patch_spec("job", {"state": "Stopped"})
    h.wait_phase("job", "Stopped")
    h.advance(1033)  # not on an hour boundary
    h.tb.apply(
        [
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "Image",
                "metadata": {"name": "bak", "namespace": h.ns},
                "spec": {"sourceInstance": "job"},
            }
        ]
    )
    st = h.wait(lambda: (s := image(h, "bak")).get("phase") == "Creating" and s, "Creating")
    assert st["node"] == node and "waiting for the agent of node" in st["message"]
    (copy,) = h.ledger.pending_image_copies(node)
    assert (copy.source, copy.path) == (f"instances/{h.ns}/job", f"images/{h.ns}/bak")
    folder = h.tmp / "data/images" / h.ns / "bak"
    assert not folder.exists() and "meterId" not in image(h, "bak")
    copied_at = h.advance(7)
    with node_agent(h, node) as agent:
        st = h.wait(lambda: (s := image(h, "bak")).get("phase") == "Ready" and s, "Ready")
        done = h.ledger.get_image_copy(copy.subject)
        assert done is not None and done.outcome == "copied" and done.done_at == copied_at
        assert (folder / "tenant.txt").read_text() == "mine\n"
        assert st["usedBytes"] == done.bytes_used and done.bytes_used >= 24_000_000
        assert st["readyAt"] == st["billedSince"] == copied_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert "ImageCreated" in h.events("bak")
        meter = h.ledger.get_meter(st["meterId"])
        assert (meter.kind, meter.node, meter.opened_at) == ("image", node, copied_at)
        # the hour ends: the agent measures the image and the ledger rates it from the copy
        hour_end = copied_at.replace(minute=0, second=0) + timedelta(hours=1)
        h.wait(lambda: disk_cursor(agent) == hour_end - timedelta(hours=1), "the agent's hour")
        h.clock.set(hour_end + timedelta(seconds=5))
        key = f"meter:{st['meterId']}:"
        h.wait(lambda: h.entries(key), "the image's first hourly charge", timeout=90)
    seconds = int((hour_end - copied_at).total_seconds())
    meter = h.ledger.get_meter(st["meterId"])
    assert meter.quantity_rated == st["usedBytes"] * seconds  # measured bytes x seconds
    expected = to_minor(Fraction(st["usedBytes"] * seconds) * PRICE / (3600 * 2**30))
    assert expected > 0 and meter.posted_minor == expected
    assert -sum(e.amount_minor for e in h.entries(key)) == expected
    # deleting the Image: the same node's agent removes the folder
    h.tb.kubectl("delete", "image", "bak", "-n", h.ns, "--wait=false")
    h.wait(
        lambda: h.tb.kubectl("get", "image", "bak", "-n", h.ns, check=False).returncode,
        "the Image to go",
    )
    wipe = h.ledger.get_wipe(copy.subject)
    assert wipe is not None and (wipe.node, wipe.path) == (node, f"images/{h.ns}/bak")
    assert folder.exists()  # no agent running: nothing removed it
    with node_agent(h, node):
        h.wait(lambda: not folder.exists(), "the agent to remove the image folder")
    assert data.exists() and (data / "tenant.txt").read_text() == "mine\n"
