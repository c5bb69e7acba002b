"""The `mediret` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import MediretError, SearchError

DEFAULT_STORE = "indexes/default"
DEFAULT_ENCODER = "efficientnet-lite0"

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
    from .datasets import read_dataset
    from .encoders import load_encoder
    from .ingest import ingest as run_ingest

    if threads:
        import torch
        torch.set_num_threads(threads)
    scan = read_dataset(dataset, dataset_format)
    model = load_encoder(encoder, weights=weights, preprocess=preprocess, device=device, precision=precision)
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
        click.echo(f"split      {scheme}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
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


# ---- search and retrieval evaluation ----------------------------------------------------

# Kept literal so that `mediret --help` imports no numpy; tests check them against search.py.
INDEX_KINDS = ("exact", "hnsw", "ivf-pq")
SPLIT_SCHEMES = ("random", "group", "given")
SIMILARITY_TEXT = "cosine similarity on L2-normalised vectors (inner product)"


def index_options(func):
    """--index, --target-recall and --rebuild-index, shared by search and evaluate-retrieval."""
    func = click.option(
        "--target-recall", type=click.FloatRange(0.5, 1.0), default=None,
        help="recall@10 against exact search that the approximate index is tuned to (HNSW's "
             "efSearch; IVF-PQ's nprobe and shortlist). Lower is faster. Default: 0.99 for hnsw, "
             "0.95 for ivf-pq.")(func)
    func = click.option(
        "--rebuild-index", is_flag=True,
        help="Rebuild the approximate index even if a cached one fits the store.")(func)
    return click.option(
        "--index", "index_kind", type=click.Choice(INDEX_KINDS), default="exact", show_default=True,
        help="exact: flat inner product over every vector. hnsw / ivf-pq: approximate, built from "
             "the stored vectors on first use (recall against exact is reported) and cached in "
             "the store directory.")(func)


def _open_search_index(store, kind: str, rebuild: bool, target_recall: float | None = None):
    from .search import TARGET_RECALL, open_index

    def announce(n: int) -> None:
        click.echo(f"building {kind} index over {n:,} vectors (tuned to recall@10 "
                   f"{target_recall or TARGET_RECALL[kind]}; cached in the store for later searches)...",
                   err=True)

    index = open_index(store, kind, rebuild=rebuild, target_recall=target_recall, on_build=announce)
    if index.build_seconds is not None:
        recall = ", ".join(f"{k} {v:.3f}" for k, v in index.describe()["recall"].items())
        params = ", ".join(f"{k}={v}" for k, v in index.params.items())
        click.echo(f"built {kind} index in {index.build_seconds:.1f} s ({params}); {recall} "
                   f"against exact search"
                   + (f"; cached as {index.cache_file}" if index.cache_file else ""), err=True)
    return index


def _parse_ks(ctx, param, value: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,5,10, got {value!r}")
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"expected positive integers like 1,5,10, got {value!r}")
    return ks


@cli.command()
@click.argument("images", nargs=-1)
@store_option
@click.option("--id", "image_ids", multiple=True,
              help="Query with a stored image (its image_id, e.g. ISIC_0024306) instead of a file; "
                   "the image itself is never returned. Repeat for several queries.")
@click.option("-k", "--top", "k", default=10, show_default=True, type=click.IntRange(1),
              help="Number of hits.")
@click.option("--label", "-l", "labels", multiple=True,
              help="Only images with this label; repeat for any of several.")
@click.option("--split", default=None,
              help="Only images of this split (train, test; MedMNIST also val).")
@click.option("--split-scheme", type=click.Choice(SPLIT_SCHEMES), default=None,
              help="Split scheme --split refers to [default: given when the dataset has one, "
                   "else group].")
@click.option("--where", default=None,
              help="SQL condition over the images table, e.g. \"meta->>'sex' = 'male'\" "
                   "(columns: id, image_id, source, dataset, group_id, given_split, width, "
                   "height, meta).")
@click.option("--group", "groups", multiple=True,
              help="Only images of this group (patient/lesion id); repeatable.")
@click.option("--exclude-group", is_flag=True,
              help="Leave out every image of the query's group (patient/lesion).")
@click.option("--group-of", default=None,
              help="For a single image-file query: the image_id whose group --exclude-group leaves "
                   "out (default: the stored image with the same bytes, if any).")
@index_options
@click.option("--weights", "-w", default=None,
              help="Weights file the store was built with, when not the encoder's default "
                   "(default: the store's recorded weights file, if it exists).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the encoder.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the query and its hits as a PNG contact sheet (several queries: "
                   "one sheet each, numbered: hits.png -> hits-1.png, hits-2.png, ...).")
@output_format_option
@user_errors
def search(images, store_path, image_ids, k, labels, split, split_scheme, where, groups,
           exclude_group, group_of, index_kind, rebuild_index, target_recall, weights, device, sheet,
           output_format):
    """Find the stored images most similar to IMAGES (files) or to stored images (--id).

    Similarity is the cosine of L2-normalised embeddings (inner product).
    Filters are applied before ranking, so k hits come back whenever k images
    pass them. An IMAGE may also be a MedMNIST reference FILE.npz#SPLIT/INDEX.

    Several queries load the encoder once (most of a file query's time):
    one table each, or with --format json a list of results (one query: the
    result itself). A query file that cannot be read is reported and skipped,
    and the command then exits with status 1.

    \b
    Example:
      mediret search query.jpg -k 10 --store indexes/ham
      mediret search query.jpg --label mel --split train --sheet hits.png
      mediret search new/*.jpg -k 5 --format json > hits.json
      mediret search --id ISIC_0024306 -k 5 --exclude-group
      mediret search --id ISIC_0024306 --where "meta->>'sex' = 'male'" --format json
    """
    from .search import Filters, query_from_id
    from .search import search as run_search
    from .store import Store

    if bool(images) == bool(image_ids):
        raise click.UsageError("give either IMAGE files or --id IMAGE_ID (one of them)")
    if group_of and image_ids:
        raise click.UsageError("--group-of is for image-file queries; --id uses the stored group")
    if group_of and len(images) > 1:
        raise click.UsageError("--group-of applies to a single image-file query")
    filters = Filters(labels=tuple(labels), split=split, split_scheme=split_scheme, where=where,
                      groups=tuple(groups))
    given, failed = len(images or image_ids), []
    with Store.open(store_path) as store:
        index = _open_search_index(store, index_kind, rebuild_index, target_recall)
        if image_ids:
            queries = [(n, query_from_id(store, image_id)) for n, image_id in enumerate(image_ids, 1)]
        else:
            queries, failed = _file_queries(store, images, weights, group_of, device)
        results = [(n, run_search(store, query, k=k, filters=filters, exclude_group=exclude_group,
                                  index=index)) for n, query in queries]
    for n, result in results:
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        if sheet is not None:
            _draw_sheet(result, sheet if given == 1 else sheet.with_name(f"{sheet.stem}-{n}{sheet.suffix}"))
    if output_format == "json":
        print_json(results[0][1].to_dict() if given == 1 else [result.to_dict() for _, result in results])
    else:
        for n, (_, result) in enumerate(results):
            if n:
                click.echo()
            _print_search_result(result)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(images)} query images could not be read: "
                                   + ", ".join(failed))


def _file_queries(store, images: tuple[str, ...], weights, group_of, device) -> tuple[list, list[str]]:
    """(position among ``images`` from 1, Query) of each image file, and the files that failed.

    The encoder loads once, when the first file is found; its own errors (the store's
    weights) stop the command. A file that cannot be read is reported and skipped,
    unless it is the only one.
    """
    from .search import query_file, query_from_file, store_encoder

    queries, failed, encoder = [], [], None

    def skip(image: str, exc: SearchError) -> None:
        if len(images) == 1:
            raise exc
        failed.append(image)
        click.echo(f"error: {exc}; skipped", err=True)

    for n, image in enumerate(images, 1):
        try:
            query_file(image)
        except SearchError as exc:
            skip(image, exc)
            continue
        if encoder is None:
            encoder = store_encoder(store, weights, device)
        try:
            queries.append((n, query_from_file(store, image, weights=weights, group_of=group_of,
                                               device=device, encoder=encoder)))
        except SearchError as exc:
            skip(image, exc)
    return queries, failed


def _draw_sheet(result, path: Path) -> None:
    from .sheet import contact_sheet

    drawn = contact_sheet(result, path)
    click.echo(f"contact sheet: {drawn.path} ({drawn.layout.n_tiles} tiles; frames: blue "
               "query, green same label, red other label, grey query label unknown)"
               + (f"; {len(drawn.missing)} images not found, drawn as placeholders"
                  if drawn.missing else ""), err=True)


def _print_search_result(result) -> None:
    query = result.query
    described = query.source
    if query.image is not None:
        labels = ", ".join(query.image.labels) or "-"
        described += (f" (stored {query.image.image_id}, label {labels}, "
                      f"group {query.image.group_id or '-'})")
    click.echo(f"query      {described}")
    click.echo(f"searched   {result.candidates} images with {result.index_used} "
               f"{'' if result.index_used == 'exact' else 'index '}ranking by {SIMILARITY_TEXT}"
               + (f"; left out: {_group_text(result.excluded_group)}" if result.excluded_group
                  else ""))
    print_table([{"rank": h.rank, "id": h.image.image_id, "label": ", ".join(h.image.labels),
                  "group": h.image.group_id, "score": h.score, "path": h.image.source}
                 for h in result.hits], ["rank", "id", "label", "group", "score", "path"])


def _group_text(excluded_group: str) -> str:
    return excluded_group if excluded_group.startswith("image ") else f"group {excluded_group}"


RETRIEVAL_COLUMNS = ("precision", "map", "map_retrieved", "acc", "majority_vote",
                     "precision_denner", "precision_denner_macro")


@cli.command("evaluate-retrieval")
@store_option
@click.option("-k", "--ks", default="1,3,5,10", show_default=True, callback=_parse_ks,
              help="Cut-offs k, comma-separated.")
@click.option("--split", "scheme", type=click.Choice(SPLIT_SCHEMES), default=None,
              help="Split scheme whose test images are the queries and train images the "
                   "database [default: given when the dataset has one (MedMNIST), else group].")
@click.option("--queries", "query_split", default="test", show_default=True,
              help="Split whose images are the queries.")
@click.option("--database", "database_splits", default="train", show_default=True,
              help="Split(s) searched, comma-separated (e.g. train,val).")
@click.option("--exclude-group", is_flag=True,
              help="A query never retrieves images of its own group (patient/lesion).")
@index_options
@click.option("--ties", type=click.Choice(["first", "any"]), default="first", show_default=True,
              help="Majority-vote ties: the highest-ranked tied label, or correct if any tied "
                   "label is the query's (Mahbod et al.'s code).")
@output_format_option
@user_errors
def evaluate_retrieval(store_path, ks, scheme, query_split, database_splits, exclude_group,
                       index_kind, rebuild_index, target_recall, ties, output_format):
    """Measure retrieval: every test image queries the train images (Mahbod et al. 2024).

    Reports, per k, overall and per class: precision@k, mAP@k (two
    normalisations), ACC@k, majority vote@k (Mahbod et al.) and Denner et al.'s
    micro/macro precision@k with denominator min(k, class size). Relevant =
    same label (multi-label: at least one shared label). The definitions are
    printed with the results.

    \b
    Example:
      mediret evaluate-retrieval -k 1,5,10 --split group --store indexes/ham
      mediret evaluate-retrieval --store indexes/pneumonia --format json
      mediret evaluate-retrieval --split random --exclude-group --index hnsw
    """
    from .retrieval import evaluate_retrieval as run_evaluation
    from .store import Store

    with Store.open(store_path) as store:
        index = _open_search_index(store, index_kind, rebuild_index, target_recall)
        evaluation = run_evaluation(
            store, scheme=scheme, ks=ks, exclude_group=exclude_group, index=index,
            query_split=query_split,
            database_splits=[s.strip() for s in database_splits.split(",") if s.strip()],
            ties=ties)
    if output_format == "json":
        print_json(evaluation.to_dict())
        return
    _print_retrieval(evaluation)


def _print_retrieval(evaluation) -> None:
    metrics = evaluation.metrics
    index = evaluation.index
    click.echo(f"store      {evaluation.store} (encoder {evaluation.encoder})")
    click.echo(f"protocol   {evaluation.protocol}")
    recall = ", ".join(f"{k} {v}" for k, v in index["recall"].items())
    click.echo(f"index      {index['kind']}" + (f" ({recall} against exact)" if recall else ""))
    if metrics.n_queries_without_relevant:
        click.echo(f"note       {metrics.n_queries_without_relevant} queries have no relevant "
                   "image in the database (they score 0 on map and precision_denner)")
    click.echo("\noverall, in %")
    print_table([{"k": m.k, "n_queries": m.n_queries,
                  **{c: _percent(getattr(m, c)) for c in RETRIEVAL_COLUMNS}}
                 for m in metrics.overall])
    click.echo("\nper class, in %")
    print_table([{"class": name, "k": m.k, "n_queries": m.n_queries,
                  **{c: _percent(getattr(m, c)) for c in RETRIEVAL_COLUMNS[:-1]}}
                 for name, entries in metrics.per_class.items() for m in entries])
    click.echo("\ndefinitions")
    click.echo(f"  similarity: {SIMILARITY_TEXT}")
    for name, text in metrics.definitions.items():
        click.echo(f"  {name}: {text}")


def _percent(value) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


# ---- classify -----------------------------------------------------------------------------------


def _number_list(kind):
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


@cli.command("classify")
@store_option
@click.option("--clf", "-c", "clfs", multiple=True, default=("lr",), show_default=True,
              type=click.Choice(["lr", "svm", "linearsvc", "knn", "all"]),
              help="Classifier(s); repeat or use 'all' (lr, svm, knn). svm = SVC over kernel "
                   "linear and rbf (gamma scale, auto); linearsvc = LinearSVC over hinge and "
                   "squared_hinge; each grid-searched over --C.")
@click.option("--split", type=click.Choice(["random", "group", "given"]), default="random",
              show_default=True, help="random: the paper's image-level 80/20; group: no "
                                      "patient/lesion on both sides; given: the dataset's own "
                                      "(its test part is scored, the rest trains).")
@click.option("--cv", default=5, show_default=True, type=click.IntRange(2),
              help="CV folds of the grid search (group-disjoint with --split group).")
@click.option("--C", "c_grid", default="0.1,1,10,100", show_default=True,
              callback=_number_list(float), help="C values searched by lr/svm/linearsvc.")
@click.option("-k", "--neighbors", "k_grid", default="5,10,20", show_default=True,
              callback=_number_list(int), help="k values searched by knn.")
@click.option("--knn-weights", type=click.Choice(["uniform", "distance", "both"]), default="both",
              show_default=True, help="kNN votes: one each, 1/(1 - cosine), or search both.")
@click.option("--standardize/--no-standardize", default=False, show_default=True,
              help="z-score features (fitted on training folds) before lr/svm/linearsvc; "
                   "off as in the paper (the C grid suits the unit-length embeddings).")
@click.option("--jobs", "-j", default=1, show_default=True, type=int,
              help="Parallel fits of the grid search (-1: every core).")
@click.option("--seed", default=0, show_default=True, help="Seed of the CV folds and bootstrap.")
@click.option("--bootstrap", "n_bootstrap", default=1000, show_default=True,
              type=click.IntRange(0), help="Bootstrap resamples for the 95% CIs (0: none).")
@click.option("--external", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Score every image of this other store (same encoder and labels) instead of "
                   "the test split: external validation.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write result.json, ROC PNGs and summary.md to this folder.")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Keep the fitted classifiers in the store (for --predict).")
@click.option("--model", "-m", "model_name", default=None,
              help="Name to save under (default KIND-SPLIT), or, with --predict, the saved "
                   "classifier to use (default the newest).")
@click.option("--predict", "predict_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label these image files with a saved classifier instead of training.")
@click.option("--weights", "-w", default=None,
              help="With --predict: encoder weights file, when the store was built with one.")
@click.option("--device", default="cpu", show_default=True, help="With --predict: torch device.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@output_format_option
@user_errors
def classify_command(store_path, clfs, split, cv, c_grid, k_grid, knn_weights, standardize, jobs,
                     seed, n_bootstrap, external, report_dir, save, model_name, predict_paths,
                     weights, device, quiet, output_format):
    """Train LR / SVM / kNN on a store's embeddings and report test metrics with 95% CIs.

    The paper's protocol: grid search over C with 5-fold CV on the training
    split, refit, one evaluation on the test split (or on --external). AUC uses
    probabilities for lr/knn and the decision function for svm/linearsvc.

    \b
    Example:
      mediret classify --clf lr --store indexes/ham
      mediret classify --clf svm --split group
      mediret classify --clf knn -k 15
      mediret classify --clf all --report reports/ham
      mediret classify --clf lr --external indexes/ham-site2
      mediret classify --predict lesion.jpg --model lr-random
    """
    if predict_paths:
        if external or report_dir:
            raise click.UsageError("--predict labels images with a saved classifier; "
                                   "it cannot be combined with --external or --report")
        _classify_predict(store_path, predict_paths, model_name, weights, device, output_format)
        return
    from .classify import ClassifySettings, classify
    from .report import confusion_rows, header_lines, paper_rows, per_class_rows, result_document
    from .report import summary_rows, write_report

    kinds = ["lr", "svm", "knn"] if "all" in clfs else list(clfs)
    settings = ClassifySettings(
        split=split, cv=cv, C=c_grid, k=k_grid, standardize=standardize, seed=seed,
        knn_weights=("uniform", "distance") if knn_weights == "both" else (knn_weights,),
        jobs=jobs, n_bootstrap=n_bootstrap)
    progress = None if quiet else (lambda line: click.echo(line, err=True))
    result = classify(store_path, kinds, settings, external=external, save=save,
                      model_name=model_name, progress=progress)
    written = write_report(result, report_dir) if report_dir else []
    if output_format == "json":
        print_json(result_document(result))
    else:
        for line in header_lines(result):
            click.echo(line)
        click.echo()
        print_table(summary_rows(result))
        if paper_rows(result):
            click.echo()
            print_table(paper_rows(result))
        for model in result.models:
            click.echo(f"\n{model.kind}: per class")
            print_table(per_class_rows(model))
            click.echo(f"\n{model.kind}: confusion matrix")
            print_table(confusion_rows(model))
        saved = [m.saved_as for m in result.models if m.saved_as]
        if saved:
            click.echo(f"\nsaved in the store as: {', '.join(saved)}")
    for path in written:
        click.echo(f"wrote {path}", err=True)


def _classify_predict(store_path, paths, model_name, weights, device, output_format) -> None:
    from .classify import predict_images

    result = predict_images(store_path, paths, model_name=model_name, weights=weights,
                            device=device)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if output_format == "json":
        print_json(result.to_dict())
        return
    column = "probability" if result.score_source == "predict_proba" else "decision value"
    for image in result.images:
        click.echo(f"{image.image}: {', '.join(image.predicted) or '(no label)'}  "
                   f"(model {result.model}, {result.kind})")
        print_table([{"class": name, column: score} for name, score in image.scores.items()])

def main() -> None:
    cli(prog_name="mediret")


if __name__ == "__main__":
    sys.exit(main())
