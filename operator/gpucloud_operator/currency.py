"""One currency per bill: an Account's runs are priced by a price book in its currency.

The ledger keeps each account's balance in the Account's currency and rounds postings
to its minor unit; a price book in another currency would charge its figures as if
they were the account's (19.80 CNY an hour posted as 19.80 USD), inventing or losing
money. Nothing converts: a start, a model or a storage item whose price book prices in
another currency is refused, naming both fields.
"""

from __future__ import annotations

from typing import Any

from gpucloud.crd import SpecError, parse
from gpucloud.crd.account import AccountSpec
from gpucloud.ledger import Ledger, NotFound


def account_currency(ledger: Ledger, acct: dict[str, Any]) -> str | None:
    """The currency the Account's balance is kept in: the ledger account's once it
    exists (fixed at creation), else the spec's; None when the models refuse the spec
    and there is no ledger account yet (nothing can be billed)."""
    try:
        return ledger.get_account(acct["metadata"]["name"]).currency
    except NotFound:
        pass
    try:
        return parse(AccountSpec, acct.get("spec")).currency
    except SpecError:
        return None


def mismatch(account: str, account_currency: str, pricebook: str, pb_currency: str) -> str | None:
    """The refusal's message when the two currencies differ, else None."""
    if account_currency == pb_currency:
        return None
    return (
        f"Account {account!r} keeps its balance in {account_currency} (its spec.currency) "
        f"but PriceBook {pricebook!r} prices in {pb_currency} (its spec.currency): nothing "
        "is billed across currencies; an admin must use a price book in "
        f"{account_currency}"
    )
