"""``evaluate``: kNN and linear-probe scores of the exported model on the held-out split, against random init."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from m3i.pipeline import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    storage_uri: str,
    run_name: str,
    run_id: str,
    knn_k: int,
    probe_epochs: int,
    finetune_steps: int,
    preset: str,
    overrides: list,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    figures: Output[HTML],
    results: Output[Artifact],
):
    """Scores ``model`` on ``dataset``'s eval split into ``<storage_uri>/evals/<run>``.

    Args:
        model: The export step's manifest.
        dataset: The shard step's manifest; its eval split is scored, its train split is the kNN bank and probe set.
        storage_uri: Root of the pipeline's storage.
        run_name: Names the results' folder; empty uses the KFP run id.
        run_id: The KFP run id (filled in by KFP).
        knn_k: Neighbours of the kNN classifier; 0 keeps the preset's.
        probe_epochs: Epochs of the linear probe; 0 keeps the preset's.
        finetune_steps: Steps of the optional fine-tune; 0 skips it, -1 keeps the preset's.
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.
        metrics: kNN and linear-probe top-1/top-5, feature spread, sample counts; the same at random init
            (``random_init_*``) and the gains over it (``knn_gain_top1``, ``probe_gain_top1``).
        confusion: The linear probe's confusion matrix on the held-out split.
        report: Markdown summary of the scores.
        figures: One HTML page with the scores, the confusion matrix and the training loss curves
            (when the model carries its history), the PNGs inline.
        results: metrics.json's content and the URIs of every file written.
    """
    import json

    from m3i.pipeline.steps import evaluate_model, run_uri

    with open(model.path) as f:
        exported = json.load(f)
    with open(dataset.path) as f:
        data = json.load(f)
    r = evaluate_model(
        exported["uri"],
        data["uri"],
        run_uri(storage_uri, "evals", run_name or run_id),
        k=knn_k,
        probe_epochs=probe_epochs,
        finetune_steps=finetune_steps,
        preset=preset,
        overrides=overrides,
    )
    for name, value in r["scalars"].items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(r["confusion"]["categories"], r["confusion"]["matrix"])
    with open(report.path, "w") as f:
        f.write(r["report"])
    with open(figures.path, "w") as f:
        f.write(r["html"])
    with open(results.path, "w") as f:
        json.dump({"metrics": r["metrics"], "files": r["files"]}, f, indent=2)
    results.metadata.update(r["scalars"])
    print(r["report"])
