"""Pure decisions of the instance reconciler: timestamps, modes, settlement amounts,
storage windows and package terms, and the resource a product is requested as (the model
reconciler's too). No API calls, no clock: ``now`` is passed in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from gpucloud.billing import (
    BillingError,
    BillingMode,
    PackagePeriod,
    PriceBook,
    UnknownProduct,
    instance_storage_charge_exact,
    package_price,
    to_minor,
)
from gpucloud.gpu_kinds import GPU_RESOURCE


def resource_of(pb: PriceBook | None, product: str | None) -> str:
    """The extended resource ``product`` is requested as, from the price book: whole GPUs,
    a MIG profile or time-sliced shares (nvidia.com/gpu before the price book is read, or
    for a product it no longer lists). GPUInstance pods and ModelDeployment replicas
    alike; their nodes' product label is ``gpu_kinds.node_product(product, resource)``."""
    if pb is None or product is None:
        return GPU_RESOURCE
    try:
        return pb.gpu_price(product).unit_resource
    except UnknownProduct:
        return GPU_RESOURCE


# Phases that hold (or are about to hold) GPUs: they count against the instance limit.
ACTIVE_PHASES = frozenset({"Pending", "Starting", "Running", "Stopping"})
# Phases after which a start needs a new spec generation (the user asks again).
HALTED_PHASES = frozenset({"Preempted", "Expired"})

MODES = {
    "PayAsYouGo": BillingMode.PAY_AS_YOU_GO,
    "Spot": BillingMode.SPOT,
    "Package": BillingMode.PACKAGE,
}
PERIODS = {"Day": PackagePeriod.DAY, "Week": PackagePeriod.WEEK, "Month": PackagePeriod.MONTH}


def fmt(t: datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes timestamps."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def second(t: datetime) -> datetime:
    """Instants are kept to the whole second: billing is by the second, and a timestamp
    read back from status must equal the one used for a posting."""
    return t.astimezone(UTC).replace(microsecond=0)


def billing_key(billing: dict[str, Any]) -> str:
    """The billing mode in force, as stored in status.billingMode: "PayAsYouGo", "Spot"
    or "Package/Month" (a change of period is a mode switch too)."""
    mode = billing.get("mode", "PayAsYouGo")
    return f"Package/{billing['period']}" if mode == "Package" else mode


def mode_of(key: str) -> BillingMode:
    return MODES[key.split("/", 1)[0]]


def period_of(key: str) -> PackagePeriod:
    return PERIODS[key.split("/", 1)[1]]


def hourly_price(pb: PriceBook, product: str, mode: BillingMode) -> Decimal:
    """Per GPU-hour price of a metered mode."""
    return pb.gpu_price(product).hourly(mode)


def storage_windows(
    since: datetime, until: datetime, window_s: int
) -> Iterator[tuple[datetime, datetime]]:
    """Settlement windows [a, b) aligned to multiples of ``window_s`` since the epoch
    (clock hours for 3600), clipped to [since, until)."""
    start = int(since.timestamp())
    end = int(until.timestamp())
    cursor = start - start % window_s
    while cursor < end:
        nxt = cursor + window_s
        a, b = max(cursor, start), min(nxt, end)
        if b > a:
            yield datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(b, UTC)
        cursor = nxt


def storage_window_exact(
    pb: PriceBook,
    quota_gib: int,
    window: tuple[datetime, datetime],
    terms: list[dict[str, Any]],
) -> Fraction:
    """The exact charge of one storage window, excluding the seconds inside package terms.
    Not rounded: the windows of an instance add up in a ``RunningTotal``, which posts the
    delta of rounded cumulative totals (rounding each hour lost money). The exact
    rational, not its Decimal: a price per hour over seconds (x/3,600) often does not
    terminate, and a Decimal cut at its precision made the hours of a span sum to a hair
    under the half-fen tie the whole span sat on (a fen lost; property test)."""
    intervals = []
    for t in terms:
        a, b = parse(t["start"]), parse(t["end"])
        if a is not None and b is not None and b > a:
            intervals.append((a, b))
    return instance_storage_charge_exact(pb, quota_gib, window[0], window[1], intervals)


def active_term(terms: list[dict[str, Any]], now: datetime) -> dict[str, Any] | None:
    """The newest term if ``now`` is inside it."""
    if not terms:
        return None
    last = terms[-1]
    start, end = parse(last["start"]), parse(last["end"])
    assert start is not None and end is not None
    return last if start <= now < end else None


def not_offered(pb: PriceBook, product: str, key: str) -> str | None:
    """Why the billing mode ``key`` cannot be used for ``product`` (the PriceBook leaves
    spot or a package period out: not offered), or None."""
    price = pb.gpu_price(product)
    try:
        if mode_of(key) is BillingMode.SPOT:
            price.hourly(BillingMode.SPOT)
        elif mode_of(key) is BillingMode.PACKAGE:
            price.package_price(period_of(key))
    except BillingError as exc:
        return f"spec.billing: {exc}"
    return None


# Phases of an admitted start whose package term is charged once the pod runs.
ADMITTED_PHASES = frozenset({"Pending", "Starting"})


class Reservation(NamedTuple):
    minor: int  # the price the term will be posted at
    key: str  # the ledger key it will be posted under
    phase: str  # the instance's phase when it was seen


def reservations(
    instances: Iterable[dict[str, Any]], namespaces: set[str], pb: PriceBook, now: datetime
) -> dict[str, Reservation]:
    """uid -> what an account has committed but not been charged yet, which the one-hour
    rule and package purchases deduct (docs/billing.md): the term of a package start
    that was admitted (Pending/Starting, no term covering ``now``: the term is charged
    when the pod runs), and the next term of a running auto-renewing package whose term
    has ended (the renewal the next pass charges)."""
    out: dict[str, Reservation] = {}
    for inst in instances:
        meta, spec, st = inst["metadata"], inst.get("spec") or {}, inst.get("status") or {}
        if meta.get("namespace") not in namespaces or meta.get("deletionTimestamp"):
            continue
        terms = st.get("packageTerms") or []
        phase = st.get("phase")
        key = billing_key(spec.get("billing") or {})
        if phase in ADMITTED_PHASES and key.startswith("Package"):
            if active_term(terms, now) is not None:
                continue  # a paid term covers the start
        elif phase == "Running" and (spec.get("billing") or {}).get("autoRenew") and terms:
            key = st.get("billingMode") or ""
            end = parse(terms[-1]["end"])
            if not key.startswith("Package") or end is None or end > now:
                continue
        else:
            continue
        gpu = spec.get("gpu") or {}
        try:
            price = package_price(pb, gpu["product"], period_of(key), int(gpu.get("count", 1)))
        except (BillingError, KeyError):
            continue  # a product or period no longer offered: nothing will be charged
        key = f"package:{meta['uid']}:{len(terms) + 1}"  # as _buy_term posts it
        out[meta["uid"]] = Reservation(to_minor(price, pb.currency), key, phase)
    return out


def reminder_due(now: datetime, expiry: datetime, lead: timedelta) -> bool:
    """True while the term has not expired and ``lead`` or less remains (the seed: 7 days,
    for day, week and month packages alike)."""
    return timedelta(0) < expiry - now <= lead


def preempt_victim_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


# -- when a run's billing starts (docs/billing.md, "When a run is billed") ------------
def container_started(pod: dict[str, Any]) -> datetime | None:
    """The first container start the kubelet recorded for ``pod`` (kubelet's clock): the
    earliest ``state.running.startedAt`` or ``lastState.terminated.startedAt`` of its
    containers (a restarted container shows its current and its previous start only);
    else the time the pod turned Ready; None when Kubernetes recorded neither."""
    status = pod.get("status") or {}
    starts = [
        parse(((cs.get(which) or {}).get(state) or {}).get("startedAt"))
        for cs in status.get("containerStatuses") or []
        for which, state in (("state", "running"), ("lastState", "terminated"))
    ]
    known = [t for t in starts if t is not None]
    if known:
        return min(known)
    ready = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "Ready" and c.get("status") == "True"
        ),
        None,
    )
    return parse((ready or {}).get("lastTransitionTime"))


def billed_start(
    anchor: datetime | None,
    pod: dict[str, Any],
    now: datetime,
    waiting: datetime | None = None,
) -> datetime:
    """The instant a run's billing starts, on the operator's clock.

    ``anchor``: the operator's clock just before it created the pod (status
    ``podCreatedAt``, written before the create call, so the pod cannot be older).
    Kubernetes says how long after its creation the pod's container started
    (``creationTimestamp`` by the API server, the start by the kubelet: both trusted,
    neither writable by the tenant); that delay is added to the anchor. So the start
    does not depend on when the operator looked (it may have been down) nor on the two
    clocks agreeing (tests run the operator on an injected clock). ``waiting``: the last
    instant the operator saw the pod not scheduled (status ``podWaitingAt``): it had not
    started then, whatever the clocks say. Clamped to ``now``: never in the future.
    Without an anchor (a pod created by an older operator) or a start, billing starts
    ``now``, when the operator saw it running."""
    created = parse((pod.get("metadata") or {}).get("creationTimestamp"))
    started = container_started(pod)
    if anchor is None or created is None or started is None:
        return now
    at = anchor + max(timedelta(0), started - created)
    if waiting is not None:
        at = max(at, waiting)
    return min(at, now)


def second_up(t: datetime) -> datetime:
    """``t`` rounded up to the whole second."""
    whole = second(t)
    return whole if whole == t.astimezone(UTC) else whole + timedelta(seconds=1)
