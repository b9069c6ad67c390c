"""Model billing in the ledger, on SQLite and PostgreSQL: request rows and their charges
in one transaction, idempotent on the request id, each meter's postings summing to its
exact total rounded once; online time settled once under racing settlers; the import of
an old model-billing file."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from ledger_helpers import T0

from gpucloud.billing import model_online_charge, to_minor
from gpucloud.billing.model_charges import ModelPlan, UsageEvent
from gpucloud.crd.pricebook import price_book
from gpucloud.ledger import EntryKind, IdempotencyConflict, Ledger, open_ledger
from gpucloud.ledger.import_model_store import import_store, main
from gpucloud.testing.model_prices import PRICEBOOK_SPEC, PRODUCT

PB = price_book(PRICEBOOK_SPEC)  # single requests cost fractions of a fen
TEXT = ModelPlan("ns", "m", "owner", "Public", "Official", "TextGeneration", PRODUCT)
PERSONAL = ModelPlan("ns", "p", "owner", "Public", "Personal", None, PRODUCT)
PRIVATE = ModelPlan("ns", "priv", "owner", product=PRODUCT, gpus_per_replica=2)


def event(i: int, model: str = "m", status: int = 200, **kw: int) -> UsageEvent:
    ms = kw.pop("ms", 100)
    return UsageEvent(f"req-{i}", "ns", model, T0 + timedelta(seconds=i), ms, status, **kw)


def charged(led: Ledger, account: str, resource: str) -> int:
    return led.charges_by_resource(account).get(resource, 0)


def test_requests_are_charged_when_recorded_rounded_once(ledger: Ledger) -> None:
    events = [event(i, prompt_tokens=100 + i, completion_tokens=37) for i in range(60)]
    assert ledger.record_model_requests([(TEXT, e, None) for e in events[:25]], PB) == 25
    assert ledger.record_model_requests([(TEXT, e, None) for e in events[25:]], PB) == 35
    exact = Decimal("0.0137") * sum(e.tokens for e in events) / 1000
    assert ledger.model_exact_total("owner", "ns/m") == exact
    assert charged(ledger, "owner", "model/ns/m") == to_minor(exact) == 14
    assert ledger.balance("owner") == ledger.entries_sum("owner") == -14
    # A single request costs ~0.19 fen: separately rounded slices would post 0.
    assert to_minor(Decimal("0.0137") * events[0].tokens / 1000) == 0
    rows = ledger.model_requests("ns/m")
    assert [r["request_id"] for r in rows] == [e.request_id for e in events]
    assert Decimal(rows[-1]["cumulative"]) == exact


def test_a_batch_recorded_again_posts_nothing(ledger: Ledger) -> None:
    batch = [(PERSONAL, event(i, "p", ms=1234 + i), "caller") for i in range(9)]
    batch.append((PERSONAL, event(3, "p", ms=1), "caller"))  # the same id within a batch
    assert ledger.record_model_requests(batch, PB) == 9
    before = ledger.balance("caller")
    assert ledger.record_model_requests(batch, PB) == 0  # a gateway killed before forgetting
    assert ledger.balance("caller") == before
    exact = Decimal("0.0031") * sum(1234 + i for i in range(9)) / 1000
    assert charged(ledger, "caller", "model/ns/p") == to_minor(exact) == -before == 3
    assert "owner" not in {a.name for a in ledger.accounts()}  # the caller pays
    assert ledger.get_account("caller").currency == "CNY"


def test_failed_and_private_requests_cost_nothing(ledger: Ledger) -> None:
    video = ModelPlan("ns", "v", "owner", "Public", "Official", "VideoGeneration", PRODUCT)
    batch = [
        (video, event(1, "v", videos=2), None),
        (video, event(2, "v", videos=1), None),
        (video, event(3, "v", status=500, videos=1), None),
        (PRIVATE, event(4, "priv"), "caller"),  # online time pays, the owner
    ]
    assert ledger.record_model_requests(batch, PB) == 4
    assert charged(ledger, "owner", "model/ns/v") == to_minor(Decimal("1.2345") * 3) == 370
    assert charged(ledger, "owner", "model/ns/priv") == 0
    assert [r["account"] for r in ledger.model_requests("ns/priv")] == ["owner"]
    assert ledger.model_requests("ns/priv")[0]["amount"] is None


def test_concurrent_batches_sharing_requests_charge_each_once(ledger_url: str) -> None:
    """Two gateways (or a restarted one) draining overlapping batches at once."""
    images = ModelPlan("ns", "img", "owner", "Public", "Official", "ImageGeneration", PRODUCT)
    events = [event(i, "img", images=1 + i % 3) for i in range(120)]
    leds = [open_ledger(ledger_url) for _ in range(3)]
    errors: list[BaseException] = []

    def drain(led: Ledger, offset: int) -> None:
        try:
            for start in range(offset, 120, 10):
                chunk = events[start : start + 30]
                led.record_model_requests([(images, e, "caller") for e in chunk], PB)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(led, k * 5)) for k, led in enumerate(leds)]
    leds[0].ensure_account("caller")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    led = leds[0]
    keys = Counter(e.key for e in led.entries("caller", limit=10_000))
    assert max(keys.values()) == 1
    rows = led.model_requests("ns/img")
    assert len(rows) == 120
    exact = Decimal("0.0815") * sum(r["images"] for r in rows)
    assert Decimal(rows[-1]["cumulative"]) == exact
    assert charged(led, "caller", "model/ns/img") == to_minor(exact)
    assert led.balance("caller") == led.entries_sum("caller")
    for lg in leds:
        lg.close()


def test_request_stats_per_gateway_instance(ledger: Ledger) -> None:
    ledger.record_model_requests([(TEXT, event(i), None) for i in range(5)], PB, source="g1")
    ledger.record_model_requests([(TEXT, event(i), None) for i in range(5, 8)], PB, source="g2")
    arrivals, totals = ledger.model_request_stats("g1", T0 + timedelta(seconds=2))
    assert arrivals == [("ns/m", T0 + timedelta(seconds=s)) for s in (2, 3, 4)]
    assert totals == {"ns/m": (5, T0 + timedelta(seconds=4))}
    assert ledger.model_request_stats("g3", T0) == ([], {})
    known = ledger.model_requests_known([("ns/m", "req-1"), ("ns/m", "req-9"), ("x/y", "req-1")])
    assert known == {("ns/m", "req-1")}


def test_online_time_settles_to_the_exact_total_rounded_once(ledger: Ledger) -> None:
    ledger.ensure_account("owner")
    key = PRIVATE.key
    ledger.replica_online(key, "r0", T0)
    ledger.replica_online(key, "r0", T0)  # idempotent
    ledger.replica_online(key, "r1", T0 + timedelta(seconds=125))
    posted = [ledger.settle_model_online(PRIVATE, PB, T0 + timedelta(seconds=s)) for s in (1, 299)]
    assert ledger.settle_model_online(PRIVATE, PB, T0 + timedelta(seconds=299)) == 0  # a retry
    ledger.replica_offline(key, "r0", T0 + timedelta(seconds=433))
    ledger.replica_offline(key, "r1", T0 + timedelta(seconds=601))
    posted.append(ledger.settle_model_online(PRIVATE, PB, T0 + timedelta(seconds=700)))
    assert ledger.settle_model_online(PRIVATE, PB, T0 + timedelta(days=1)) == 0  # cold
    exact = model_online_charge(PB, PRODUCT, 2, [433, 601 - 125])
    resource = "model/ns/priv#online"
    assert charged(ledger, "owner", resource) == sum(posted) == to_minor(exact) == 364
    last = ledger.entries("owner", resource=resource)[-1]
    assert last.key == f"model-online:{key}:to:364"


def test_racing_settlers_post_once(ledger_url: str) -> None:
    leds = [open_ledger(ledger_url) for _ in range(4)]
    leds[0].ensure_account("owner")
    leds[0].replica_online(PRIVATE.key, "r0", T0)
    now = T0 + timedelta(seconds=3333)
    threads = [
        threading.Thread(target=led.settle_model_online, args=(PRIVATE, PB, now)) for led in leds
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exact = model_online_charge(PB, PRODUCT, 2, [3333])
    assert charged(leds[0], "owner", "model/ns/priv#online") == to_minor(exact)
    assert len(leds[0].entries("owner")) == 1
    for led in leds:
        led.close()


# -- the import of an old model-billing file ---------------------------------------------
OLD_SCHEMA = """
CREATE TABLE requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, meter TEXT NOT NULL, request_id TEXT NOT NULL,
    account TEXT NOT NULL, model TEXT NOT NULL, at TEXT NOT NULL,
    runtime_ms INTEGER NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, images INTEGER NOT NULL, videos INTEGER NOT NULL,
    amount TEXT, cumulative TEXT, posted INTEGER NOT NULL DEFAULT 0,
    UNIQUE (model, request_id)
);
CREATE TABLE replica_intervals (
    model TEXT NOT NULL, replica TEXT NOT NULL, start_at TEXT NOT NULL, end_at TEXT,
    PRIMARY KEY (model, replica, start_at)
);
"""


def old_store(path: Path, ledger: Ledger, requests: int, posted: int) -> Decimal:
    """A file as the old store left it, its first ``posted`` rows posted to ``ledger``
    under the old keys and amounts; returns the meter's exact total."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    total = Decimal(0)
    ledger.ensure_account("caller")
    for i in range(requests):
        amount = Decimal("0.0031") * (1234 + 17 * i) / 1000
        total += amount
        at = (T0 + timedelta(seconds=i)).isoformat()
        if i < posted:
            delta = to_minor(total) - to_minor(total - amount)
            if delta:
                ledger.post_entry(
                    "caller", EntryKind.CHARGE, -delta, f"model-request:ns/p:req-{i}",
                    resource="model/ns/p", at=T0,
                )  # fmt: skip
        db.execute(
            "INSERT INTO requests (meter, request_id, account, model, at, runtime_ms, status,"
            " prompt_tokens, completion_tokens, images, videos, amount, cumulative, posted)"
            " VALUES ('caller|ns/p', ?, 'caller', 'ns/p', ?, ?, 200, 0, 0, 0, 0, ?, ?, ?)",
            (f"req-{i}", at, 1234 + 17 * i, str(amount), str(total), int(i < posted)),
        )
    rows = [
        ("ns/priv", "r0", T0, T0 + timedelta(seconds=433)),
        ("ns/priv", "r0", T0 + timedelta(days=2), None),  # the same replica woken again
    ]
    for model, replica, start, end in rows:
        db.execute(
            "INSERT INTO replica_intervals VALUES (?, ?, ?, ?)",
            (model, replica, start.isoformat(), end and end.isoformat()),
        )
    db.commit()
    db.close()
    return total


def test_import_of_an_old_store_posts_each_key_once(ledger: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "model-billing.db"
    exact = old_store(path, ledger, requests=40, posted=25)
    assert 0 < charged(ledger, "caller", "model/ns/p") < to_minor(exact)
    assert import_store(path, ledger) == (40, 2)
    assert charged(ledger, "caller", "model/ns/p") == to_minor(exact)
    assert ledger.model_exact_total("caller", "ns/p") == exact
    before = ledger.entries("caller", limit=10_000)
    assert import_store(path, ledger) == (0, 2)  # again: nothing new
    assert ledger.entries("caller", limit=10_000) == before
    ivs = ledger.replica_intervals("ns/priv")
    assert [(iv.start, iv.end) for iv in ivs] == [
        (T0, T0 + timedelta(seconds=433)),
        (T0 + timedelta(days=2), None),
    ]
    # The meter goes on from the imported total.
    ledger.record_model_requests([(PERSONAL, event(99, "p", ms=777), "caller")], PB)
    later = exact + Decimal("0.0031") * Decimal("0.777")
    assert charged(ledger, "caller", "model/ns/p") == to_minor(later)


def test_import_command(ledger_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "usage.db"
    led = open_ledger(ledger_url)
    exact = old_store(path, led, requests=7, posted=0)
    assert main([str(path), "--ledger-url", ledger_url]) == 0
    assert "imported 7 new request row(s)" in capsys.readouterr().out
    assert charged(led, "caller", "model/ns/p") == to_minor(exact)
    assert main([str(tmp_path / "missing.db"), "--ledger-url", ledger_url]) == 2
    led.close()


def test_a_key_posted_with_other_content_is_a_conflict(ledger: Ledger) -> None:
    ledger.ensure_account("owner")
    ledger.post_entry(
        "owner", EntryKind.CHARGE, -5, "model-request:ns/m:req-1", resource="model/ns/m", at=T0
    )
    with pytest.raises(IdempotencyConflict):
        ledger.record_model_requests([(TEXT, event(1, prompt_tokens=10**6), None)], PB)
    assert ledger.model_requests("ns/m") == []  # the row and its charge: neither
