"""The `mediret` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import MediretError

DEFAULT_STORE = "indexes/default"
DEFAULT_ENCODER = "efficientnet-lite0"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def store_option(func):
    """The --store option shared by every command (env MEDIRET_STORE)."""
    return click.option(
        "--store", "-s", "store_path", type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_STORE, envvar="MEDIRET_STORE", show_default=True, show_envvar=True,
        help="Store directory (FAISS index + DuckDB database).")(func)


def output_format_option(func):
    """--format table|json, shared by every command that prints results."""
    return click.option(
        "--format", "-f", "output_format", type=click.Choice(["table", "json"]),
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


@cli.command()
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@store_option
@click.option("--encoder", "-e", default=DEFAULT_ENCODER, show_default=True,
              help="Encoder name (see `mediret encoders`).")
@click.option("--weights", "-w", default=None,
              help="Local weights file, or 'random' for random init (testing only). "
                   "Default: the encoder's own source (package, cache, download).")
@click.option("--preprocess", "-p", default=None,
              help="Preprocessing preset (imagenet, clip, median-mad, caffe-bgr, "
                   "efficientnet-lite). Default: the encoder's own.")
@click.option("--format", "dataset_format", default=None,
              help="Dataset layout; detected from the files when omitted "
                   "(ham10000, odir, pad-ufes-20, medmnist, cbis-ddsm, chexpert, folder, csv).")
@click.option("--batch-size", "-b", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Decoding threads running beside the encoder (0: decode inline).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="Torch threads for the encoder (default: torch's own choice).")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/test splits.")
@click.option("--test-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(1),
              help="Images between durable commits (what an interruption can lose).")
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Ingest only the first N new images (a quick trial).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@output_format_option
@user_errors
def ingest(dataset, store_path, encoder, weights, preprocess, dataset_format, batch_size, workers,
           threads, seed, test_fraction, commit_every, limit, device, quiet, output_format):
    """Embed a dataset folder (or .npz / .csv file) into a store.

    The layout is detected from the files: HAM10000, ODIR-5K, PAD-UFES-20,
    CBIS-DDSM, CheXpert, MedMNIST .npz, a folder per class, or a CSV of
    path,label[,group]. Re-running skips what is stored, so an interrupted
    ingest resumes where it stopped. Unreadable images and unmatched label rows
    are reported with their paths at the end and kept in the store's
    `problems` table.

    \b
    Example:
      mediret ingest ../shared/data/odir --encoder efficientnet-lite0 --store indexes/odir
    """
    from .datasets import read_dataset
    from .encoders import load_encoder
    from .ingest import ingest as run_ingest

    if threads:
        import torch
        torch.set_num_threads(threads)
    scan = read_dataset(dataset, dataset_format)
    model = load_encoder(encoder, weights=weights, preprocess=preprocess, device=device)
    if not quiet:
        click.echo(f"{scan.name}: {len(scan.records)} images found in {dataset}; encoder "
                   f"{model.spec.name} ({model.weights_source}), store {store_path}", err=True)
    report = run_ingest(scan, store_path, model, batch_size=batch_size, workers=workers, seed=seed,
                        test_fraction=test_fraction, commit_every=commit_every,
                        progress=not quiet, limit=limit)
    if output_format == "json":
        print_json(report.to_dict())
    else:
        _print_ingest_report(report)
    if report.interrupted:
        raise click.ClickException(
            f"interrupted: {report.added} images stored; run the same command again to resume")


def _print_ingest_report(report) -> None:
    click.echo(f"{report.dataset}: {report.found} found, {report.added} added, "
               f"{report.already_stored} already stored, {report.duplicates} duplicates, "
               f"{sum(p.kind != 'duplicate-content' for p in report.problems)} problems "
               f"in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)")
    shown = 20
    for problem in report.problems[:shown]:
        click.echo(f"  {problem.kind}: {problem.path}: {problem.reason}")
    if len(report.problems) > shown:
        click.echo(f"  ... {len(report.problems) - shown} more; all are listed by "
                   f"`mediret info --problems --store {report.store}`")


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
    from .store import Store

    with Store.open(store_path) as store:
        summary = store.info()
        listed = store.sql("SELECT ingest_run, kind, path, reason FROM problems "
                           "ORDER BY ingest_run, kind, path") if problems else []
    if output_format == "json":
        if problems:
            summary["problem_list"] = [dict(zip(("run", "kind", "path", "reason"), r))
                                       for r in listed]
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
        click.echo(f"split {scheme:<5}" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if summary["problems"]:
        click.echo("problems   " + ", ".join(f"{k} {v}" for k, v in summary["problems"].items()))
    for run, kind, path, reason in listed:
        click.echo(f"  run {run} {kind}: {path}: {reason}")


@cli.command()
@output_format_option
@user_errors
def encoders(output_format):
    """List the encoders: name, embedding dim, input size, preset, weights available offline?"""
    from .encoders import encoder_table

    rows = encoder_table()
    if output_format == "json":
        print_json(rows)
    else:
        print_table(rows)


def main() -> None:
    cli(prog_name="mediret")


if __name__ == "__main__":
    sys.exit(main())
