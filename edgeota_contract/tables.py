"""The one way the CLI prints data: ``--output table`` (for people) or ``--output json`` (for scripts).

Tables fit the terminal (80 columns when output is not a terminal): every cell folds or wraps instead of
running off the edge, long identifiers fold onto the next line, and text from the server is printed
literally (never read as rich markup). Detail views (``device show``, ``rollout status``) are sections of
aligned ``key  value`` lines followed by tables. Numbers are formatted by :mod:`edgeota_contract.humanize`.

Imports only the standard library, typer and rich (a component's ``cli.py`` may use it at module level).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from edgeota_contract.humanize import MISSING


class Output(StrEnum):
    """What a command prints: ``table`` for people, ``json`` (every field, stable names) for scripts."""

    table = "table"
    json = "json"


OUTPUT_HELP = "table (for people, fits the terminal) or json (every field, for scripts)"


def output_option() -> Any:
    """The ``--output/-o`` option every command that prints data takes."""
    return typer.Option(Output.table, "--output", "-o", help=OUTPUT_HELP, case_sensitive=False)


JSON_FLAG_HELP = "Same as --output json."


def chosen(output: Output, as_json: bool = False) -> Output:
    """``--output``, with an older ``--json`` flag meaning ``--output json``."""
    return Output.json if as_json else output


@dataclass(frozen=True)
class Col:
    """A column: its header, ``right`` for numbers, a ``min_width``, and ``no_wrap`` for short identifiers that
    read badly when broken (the other columns give way first)."""

    header: str
    right: bool = False
    min_width: int | None = None
    no_wrap: bool = False


def cell(value: object) -> Text:
    """A cell's text: ``None`` as ``-``, everything else ``str()``, never interpreted as markup."""
    if isinstance(value, Text):
        return value
    return Text(MISSING if value is None else str(value))


def table(columns: Sequence[object], rows: Iterable[Sequence[object]], title: str | None = None) -> Table:
    """A table whose cells fold to the console's width (``overflow="fold"``: long ids break onto more lines).

    ``columns``: a :class:`Col` or a header (``str``) each."""
    out = Table(
        box=box.SIMPLE_HEAD,
        title=title,
        title_justify="left",
        title_style="bold",
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    for column in columns:
        c = column if isinstance(column, Col) else Col(str(column))
        out.add_column(
            c.header, justify="right" if c.right else "left", overflow="fold", min_width=c.min_width, no_wrap=c.no_wrap
        )
    for row in rows:
        out.add_row(*(cell(v) for v in row))
    return out


def kv(pairs: Iterable[tuple[str, object]], title: str | None = None) -> RenderableType:
    """A section of aligned ``key  value`` lines (values fold; keys never wrap), under a bold ``title``."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in pairs:
        grid.add_row(Text(key), cell(value))
    if title is None:
        return grid
    return Group(Text(title, style="bold underline"), grid)


def note(text: str, style: str | None = None) -> Text:
    """A line of plain text (never markup)."""
    return Text(text, style=style or "")


def to_json(data: Any) -> Any:
    """Plain JSON data from response models (anything with ``model_dump``), lists and dicts of them."""
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json", exclude_none=False)
    if isinstance(data, list | tuple):
        return [to_json(d) for d in data]
    if isinstance(data, dict):
        return {k: to_json(v) for k, v in data.items()}
    return data


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout: plain text, never wrapped, so that scripts can parse it."""
    typer.echo(json.dumps(to_json(data), indent=2, default=str))


def print_renderables(console: Console, parts: Iterable[RenderableType]) -> None:
    """Print ``parts`` one after the other, a blank line between them."""
    for i, part in enumerate(parts):
        if i:
            console.print()
        console.print(part)
