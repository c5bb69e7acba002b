"""What every command shares: the click group, the --store and --format options, option
parsers, error translation and plain-text tables."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from ..errors import MediretError

DEFAULT_STORE = "indexes/default"
DEFAULT_ENCODER = "efficientnet-lite0"
# Kept literal so that `mediret --help` imports no numpy; a test checks it against the store's.
SPLIT_SCHEMES = ("random", "group", "given")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def store_option(func):
    """The --store option shared by every command (env MEDIRET_STORE)."""
    return click.option(
        "--store", "-s", "store_path", type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_STORE, envvar="MEDIRET_STORE", show_default=True, show_envvar=True,
        help="Store directory (FAISS index + DuckDB database).")(func)


def output_format_option(func, flag: str = "--format"):
    """--format table|json, shared by every command that prints results."""
    names = (flag, "-f") if flag == "--format" else (flag,)
    return click.option(
        *names, "output_format", type=click.Choice(["table", "json"]),
        default="table", show_default=True, help="Print a table for people or JSON for programs.",
    )(func)


def user_errors(func):
    """Turn library errors into one-line click errors: no tracebacks for user mistakes."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MediretError as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print dicts as an aligned plain-text table."""
    if not rows:
        click.echo("(no rows)")
        return
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="mediret")
def cli():
    """Classify and search medical images with pre-trained embeddings.

    Embed a dataset once into a store (a FAISS index plus a DuckDB database of
    labels, patients/lesions and splits), then classify with LR/SVM/kNN or search
    for similar images.

    \b
    Example:
      mediret ingest ../shared/data/ham10000 --store indexes/ham
      mediret info --store indexes/ham
      mediret classify --clf lr --store indexes/ham
      mediret search query.jpg -k 10 --store indexes/ham
    """


def parse_ks(ctx, param, value: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,5,10, got {value!r}")
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"expected positive integers like 1,5,10, got {value!r}")
    return ks


def number_list(kind):
    """click callback: '0.1,1,10' -> (0.1, 1.0, 10.0), with a usage error naming the option."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got "
                                     f"'{value}'") from None
    return parse


def main() -> None:
    cli(prog_name="mediret")
