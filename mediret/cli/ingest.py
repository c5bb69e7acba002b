"""`mediret ingest`: a dataset folder or file -> a store."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .common import (DEFAULT_ENCODER, cli, output_format_option, print_json, store_option,
                     user_errors)


def _window(ctx, param, value):
    """--window: a preset, file, minmax or CENTRE,WIDTH, as a usage error when it is none of them."""
    if value is None:
        return None
    from ..dicom import parse_window
    from ..errors import MediretError

    try:
        return parse_window(value)
    except MediretError as exc:
        raise click.BadParameter(str(exc)) from None


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
                   "(ham10000, odir, pad-ufes-20, medmnist, cbis-ddsm, chexpert, dicom, folder, csv).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="CSV of labels joined onto the images by --on (replacing the "
                                 "dataset's own); column --label-column, several labels as a|b.")
@click.option("--on", "join_on", default=None,
              help="Key --labels is joined on: image_id, path, group, PatientID (DICOM's group), "
                   "SOPInstanceUID, StudyInstanceUID or any meta field; the CSV column of that "
                   "name. Default: image_id.")
@click.option("--label-column", default="label", show_default=True, help="Label column of --labels.")
@click.option("--window", default=None, callback=_window,
              help="DICOM grey images: CENTRE,WIDTH in modality units (e.g. -600,1500), a CT "
                   "preset (bone, brain, lung, mediastinum, soft-tissue), 'minmax', or 'file' "
                   "(default: the file's VOI LUT or first window, else min..max). Recorded in the "
                   "store, for queries to be read the same way.")
@click.option("--frame", default=None, type=click.IntRange(1),
              help="Frame of multi-frame DICOM files, counted from 1 (default: the middle one). "
                   "Recorded in the store.")
@click.option("--group-tag", default=None,
              help="DICOM tag whose value is an image's group (default PatientID), e.g. StudyInstanceUID.")
@click.option("--keep-tag", "keep_tags", multiple=True,
              help="DICOM tag to copy into the store beside the kept ones (repeatable), e.g. "
                   "PatientName: identifying tags are never copied otherwise.")
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
def ingest(dataset, store_path, encoder, weights, preprocess, dataset_format, labels_csv, join_on,
           label_column, window, frame, group_tag, keep_tags, batch_size, workers, threads, streams,
           seed, test_fraction, commit_every, limit, device, precision, quiet, output_format):
    """Embed a dataset folder (or .npz / .csv file) into a store.

    The layout is detected from the files: HAM10000, ODIR-5K, PAD-UFES-20,
    CBIS-DDSM, CheXpert, MedMNIST .npz, a folder of DICOM files or a DICOMDIR,
    a folder per class, or a CSV of path,label[,group]. --labels joins labels
    from a CSV onto any of them. Re-running skips what is stored, so an interrupted
    ingest resumes where it stopped. Unreadable images and unmatched label rows
    are reported with their paths at the end and kept in the store's
    `problems` table.

    \b
    Example:
      mediret ingest ../shared/data/odir --encoder efficientnet-lite0 --store indexes/odir
      mediret ingest /data/export --labels findings.csv --on StudyInstanceUID --store indexes/ct
    """
    from ..datasets import FORMATS, detect_format, read_dataset
    from ..datasets.labels import join_labels
    from ..dicom import DicomOptions
    from ..encoders import load_encoder
    from ..ingest import ingest as run_ingest

    if join_on is not None and labels_csv is None:
        raise click.UsageError("--on names the key of --labels; give --labels FILE too")
    if threads:
        import torch
        torch.set_num_threads(threads)
    dicom = DicomOptions(window=window or "file", frame=frame)
    dataset_format = dataset_format or detect_format(dataset)
    options = {"group_tag": group_tag, "keep_tags": tuple(keep_tags) or None}
    options = {name: value for name, value in options.items() if value is not None}
    if "dicom" in getattr(FORMATS.get(dataset_format), "options", ()):
        options["dicom"] = dicom
    scan = read_dataset(dataset, dataset_format, **options)
    if labels_csv is not None:
        scan = join_labels(scan, labels_csv, join_on or "image_id", label_column)
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
                        progress=not quiet, limit=limit, dicom=dicom)
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
