"""`mediret ingest`: a dataset folder or file -> a store."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .common import (DEFAULT_ENCODER, cli, output_format_option, print_json, store_option,
                     user_errors)

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
@click.option("--streams", default=None, type=click.IntRange(1),
              help="Batches the encoder runs at once on the CPU, each in its own thread on an "
                   "equal share of the torch threads (default: 2, or $MEDIRET_FORWARD_STREAMS). "
                   "1 runs one batch at a time: 1.05-1.25x slower on 2 cores, but it holds one batch's "
                   "activations instead of two (0.3-0.4 GB less for EfficientNet-Lite0 and "
                   "ResNet50 at batch 32).")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/test splits.")
@click.option("--test-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(1),
              help="Images between durable commits (what an interruption can lose); on large "
                   "stores commits also wait until they would take under 5% of the time.")
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Ingest only the first N new images (a quick trial).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--precision", type=click.Choice(["auto", "fp32"]), default="auto", show_default=True,
              help="auto: on a CPU with native bfloat16, run the encoder in bf16 if its embeddings of "
                   "the first batch match fp32 (cosine >= 0.9995); fp32: never.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@functools.partial(output_format_option, flag="--output")
@user_errors
def ingest(dataset, store_path, encoder, weights, preprocess, dataset_format, batch_size, workers,
           threads, streams, seed, test_fraction, commit_every, limit, device, precision, quiet,
           output_format):
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
    from ..datasets import read_dataset
    from ..encoders import load_encoder
    from ..ingest import ingest as run_ingest

    if threads:
        import torch
        torch.set_num_threads(threads)
    scan = read_dataset(dataset, dataset_format)
    model = load_encoder(encoder, weights=weights, preprocess=preprocess, device=device, precision=precision,
                         tune_allocator=True)
    if streams is not None:
        model.forward_streams = streams
        if model.device == "cpu" and model.threads_per_stream() < 1:
            import torch

            click.echo(f"note: --streams {streams} needs a torch thread per stream, and there are "
                       f"{torch.get_num_threads()} (--threads); running one batch at a time", err=True)
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
    if report.precision:
        click.echo(f"encoder arithmetic: {report.precision}")
    shown = 20
    for problem in report.problems[:shown]:
        click.echo(f"  {problem.kind}: {problem.path}: {problem.reason}")
    if len(report.problems) > shown:
        click.echo(f"  ... {len(report.problems) - shown} more; all are listed by "
                   f"`mediret info --problems --store {report.store}`")
