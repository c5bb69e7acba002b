"""`mediret info` and `mediret encoders`: what a store holds, and which encoders there are."""

from __future__ import annotations

import click

from .common import cli, output_format_option, print_json, print_table, store_option, user_errors

@cli.command()
@store_option
@click.option("--problems", is_flag=True, help="List every input problem recorded at ingest.")
@output_format_option
@user_errors
def info(store_path, problems, output_format):
    """Show a store: images, labels, splits, encoder, size on disk, ingest problems.

    \b
    Example:
      mediret info --store indexes/odir
    """
    from ..store import Store

    with Store.open(store_path) as store:
        summary = store.info()
        listed = store.problems() if problems else []
    if output_format == "json":
        if problems:
            summary["problem_list"] = [vars(p) for p in listed]
        print_json(summary)
        return
    enc = summary["encoder"]
    click.echo(f"store      {summary['path']}")
    click.echo(f"encoder    {enc['name']} (dim {enc['dim']}, preprocess {enc['preprocess']}, "
               f"weights {enc['weights']})")
    click.echo(f"images     {summary['images']} ({summary['vectors']} vectors), "
               f"{summary['groups']} groups, datasets {', '.join(summary['datasets'])}"
               f"{', multi-label' if summary['multilabel'] else ''}")
    click.echo(f"on disk    {summary['size_bytes'] / 1e6:.1f} MB")
    click.echo("labels     " + ", ".join(f"{k} {v}" for k, v in summary["labels"].items()))
    for scheme, counts in summary["splits"].items():
        click.echo(f"split      {scheme}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if summary["problems"]:
        click.echo("problems   " + ", ".join(f"{k} {v}" for k, v in summary["problems"].items()))
    for p in listed:
        click.echo(f"  run {p.run} {p.kind}: {p.path}: {p.reason}")


@cli.command()
@output_format_option
@user_errors
def encoders(output_format):
    """List the encoders: name, embedding dim, input size, preset, weights available offline?"""
    from ..encoders import encoder_table

    rows = encoder_table()
    if output_format == "json":
        print_json(rows)
    else:
        print_table(rows)
