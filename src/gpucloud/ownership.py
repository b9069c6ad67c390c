"""Which Account a namespace bills to, when two Accounts list the same namespace.

The Account that claimed it first (the older ``metadata.creationTimestamp``, then the
name, so the verdict never depends on list order) keeps it; a later one is not used for
that namespace and gets a ``NamespaceConflict`` condition naming the namespace and the
first Account. Pure: the operator passes its (cached) list of Accounts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Conflict:
    namespace: str
    owner: str  # the Account that keeps the namespace

    def message(self, account: str) -> str:
        return (
            f"spec.namespaces: namespace {self.namespace!r} is already claimed by Account "
            f"{self.owner!r} (created first); it bills there, not to {account!r}"
        )


def _claim_order(acct: Obj) -> tuple[str, str]:
    meta = acct.get("metadata") or {}
    # RFC 3339 UTC timestamps of one format sort as strings
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def claimed(acct: Obj) -> list[str]:
    """The namespaces an Account lists. Read as written, not through ``AccountSpec``: an
    Account whose spec its model refuses still holds its namespaces, so their bills never
    move to an Account that claimed them later; nothing bills to it until it is fixed
    (its readers refuse it, naming the field). For a valid spec the two reads agree."""
    return [ns for ns in (acct.get("spec") or {}).get("namespaces") or [] if isinstance(ns, str)]


def owners(accounts: Iterable[Obj]) -> dict[str, str]:
    """namespace -> the name of the Account it bills to."""
    out: dict[str, str] = {}
    for acct in sorted(accounts, key=_claim_order):
        for ns in claimed(acct):
            out.setdefault(ns, acct["metadata"]["name"])
    return out


def account_for(accounts: Iterable[Obj], namespace: str) -> Obj | None:
    """The Account ``namespace`` bills to, or None when no Account lists it."""
    listed = list(accounts)
    owner = owners(listed).get(namespace)
    return next((a for a in listed if a["metadata"]["name"] == owner), None)


def owned(accounts: Iterable[Obj], name: str) -> set[str]:
    """The namespaces that bill to Account ``name`` (those it claims, less conflicts)."""
    return {ns for ns, owner in owners(accounts).items() if owner == name}


def conflicts(accounts: Iterable[Obj], name: str) -> list[Conflict]:
    """The namespaces Account ``name`` lists but another Account claimed first."""
    listed = list(accounts)
    table = owners(listed)
    mine = next((a for a in listed if a["metadata"]["name"] == name), None)
    if mine is None:
        return []
    return [Conflict(ns, table[ns]) for ns in claimed(mine) if table.get(ns) != name]
