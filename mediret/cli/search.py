"""`mediret search` and `mediret evaluate-retrieval`: similar images, and retrieval metrics."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SearchError
from ..index.kinds import KINDS, SIMILARITY, kind_names
from .common import (SPLIT_SCHEMES, cli, output_format_option, parse_ks, print_json, print_table,
                     store_option, user_errors)


def index_options(func):
    """--index, --target-recall and --rebuild-index, shared by search and evaluate-retrieval."""
    func = click.option(
        "--target-recall", type=click.FloatRange(0.5, 1.0), default=None,
        help="recall@10 against exact search that the approximate index is tuned to (HNSW's "
             "efSearch; IVF-PQ's nprobe and shortlist). Lower is faster. Default: "
             + ", ".join(f"{k.target_recall} for {k.name}" for k in KINDS.values() if k.approximate)
             + ".")(func)
    func = click.option(
        "--rebuild-index", is_flag=True,
        help="Rebuild the approximate index even if a cached one fits the store.")(func)
    return click.option(
        "--index", "index_kind", type=click.Choice(kind_names()), default="exact", show_default=True,
        help="; ".join(f"{k.name}: {k.summary}" for k in KINDS.values())
             + ". Approximate kinds are built from the stored vectors on first use (recall against "
               "exact is reported) and cached in the store directory.")(func)


def _open_search_index(store, kind: str, rebuild: bool, target_recall: float | None = None):
    from ..index import open_index

    def announce(n: int) -> None:
        click.echo(f"building {kind} index over {n:,} vectors (tuned to recall@10 "
                   f"{target_recall or KINDS[kind].target_recall}; cached in the store for later searches)...",
                   err=True)

    index = open_index(store, kind, rebuild=rebuild, target_recall=target_recall, on_build=announce)
    if index.build_seconds is not None:
        recall = ", ".join(f"{k} {v:.3f}" for k, v in index.describe()["recall"].items())
        params = ", ".join(f"{k}={v}" for k, v in index.params.items())
        click.echo(f"built {kind} index in {index.build_seconds:.1f} s ({params}); {recall} "
                   f"against exact search"
                   + (f"; cached as {index.cache_file}" if index.cache_file else ""), err=True)
    return index


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
@click.option("--field", "fields", multiple=True, metavar="FIELD=VALUE",
              help="Only images whose metadata field (or column image_id, dataset, group_id, "
                   "given_split, width, height) matches: sex=male, age>=60, localization=back|trunk "
                   "(any of), localization~arm (contains); operators = != < <= > >= ~. Repeatable.")
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
def search(images, store_path, image_ids, k, labels, split, split_scheme, fields, where, groups,
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
      mediret search --id ISIC_0024306 --field sex=male --field age>=50
      mediret search --id ISIC_0024306 --where "meta->>'sex' = 'male'" --format json
    """
    from ..query import query_from_id
    from ..search import search as run_search
    from ..store import FieldCondition, Filters, Store

    if bool(images) == bool(image_ids):
        raise click.UsageError("give either IMAGE files or --id IMAGE_ID (one of them)")
    if group_of and image_ids:
        raise click.UsageError("--group-of is for image-file queries; --id uses the stored group")
    if group_of and len(images) > 1:
        raise click.UsageError("--group-of applies to a single image-file query")
    try:
        conditions = tuple(FieldCondition.parse(text) for text in fields)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--field") from None
    filters = Filters(labels=tuple(labels), split=split, split_scheme=split_scheme, where=where,
                      groups=tuple(groups), fields=conditions)
    given, failed = len(images or image_ids), []
    with Store.open(store_path) as store:
        index = _open_search_index(store, index_kind, rebuild_index, target_recall)
        if image_ids:
            queries = [(n, query_from_id(store, image_id)) for n, image_id in enumerate(image_ids, 1)]
        else:
            queries, failed = _file_queries(store, images, weights, group_of, device)
        dicom = store.dicom_options()
        results = [(n, run_search(store, query, k=k, filters=filters, exclude_group=exclude_group,
                                  index=index)) for n, query in queries]
    for n, result in results:
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        if sheet is not None:
            _draw_sheet(result, sheet if given == 1 else sheet.with_name(f"{sheet.stem}-{n}{sheet.suffix}"),
                        dicom)
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
    from ..query import QueryEncoder, query_file, query_from_file

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
            encoder = QueryEncoder(store, weights, device)
            encoder.encoder  # loads now: its errors (the store's weights) stop the command
        try:
            queries.append((n, query_from_file(store, image, group_of=group_of, encoder=encoder)))
        except SearchError as exc:
            skip(image, exc)
    for warning in encoder.warnings if encoder is not None else ():
        click.echo(f"warning: {warning}", err=True)
    return queries, failed


def _draw_sheet(result, path: Path, dicom) -> None:
    from ..sheet import contact_sheet

    drawn = contact_sheet(result, path, dicom=dicom)
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
               f"{'' if result.index_used == 'exact' else 'index '}ranking by {SIMILARITY}"
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
@click.option("-k", "--ks", default="1,3,5,10", show_default=True, callback=parse_ks,
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
    from ..retrieval import evaluate_retrieval as run_evaluation
    from ..store import Store

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
    click.echo(f"  similarity: {SIMILARITY}")
    for name, text in metrics.definitions.items():
        click.echo(f"  {name}: {text}")


def _percent(value) -> str | None:
    return None if value is None else f"{100 * value:.2f}"
