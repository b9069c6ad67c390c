"""``-o table|json|yaml``: one renderer for every listing and show command.

json and yaml print the data itself (the API's body, or the CLI's own dict), for scripts;
table is for people. Errors and progress go to stderr, so stdout stays parseable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console, RenderableType
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)
err_console = Console(highlight=False, soft_wrap=True, stderr=True)


class Format(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[
    Format, typer.Option("-o", "--output", help="table (for people), json or yaml (for scripts)")
]


def table(*columns: str) -> Table:
    """A table that folds long cells instead of cutting them (ids must stay whole)."""
    t = Table()
    for name in columns:
        t.add_column(name, overflow="fold")
    return t


def emit(data: Any, fmt: Format, human: Callable[[], RenderableType | str | None]) -> None:
    """Print ``data`` as json/yaml, or what ``human()`` builds for a table."""
    if fmt is Format.json:
        typer.echo(json.dumps(data, indent=2, default=str))
    elif fmt is Format.yaml:
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    else:
        shown = human()
        if shown is not None:
            console.print(shown)
