"""`mediret classify`: the paper's classifiers on a store's embeddings, and labelling new images."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (cli, number_list, output_format_option, print_json, print_table, store_option,
                     user_errors)

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
              callback=number_list(float), help="C values searched by lr/svm/linearsvc.")
@click.option("-k", "--neighbors", "k_grid", default="5,10,20", show_default=True,
              callback=number_list(int), help="k values searched by knn.")
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
    from ..classify import ClassifySettings, classify
    from ..report import confusion_rows, header_lines, paper_rows, per_class_rows, result_document
    from ..report import summary_rows, write_report

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
    from ..classify import predict_images

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
