"""``gate``: does the evaluated model replace its model's champion? Decides, records nothing."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from m3i.pipeline import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(
    model: Input[Model],
    results: Input[Artifact],
    storage_uri: str,
    run_id: str,
    preset: str,
    overrides: list,
    metrics: Output[Metrics],
    report: Output[Markdown],
    decision: Output[Artifact],
) -> str:
    """Gates ``model`` against the champion of its name under ``<storage_uri>/models`` (``promote`` config section).

    The champion is re-evaluated on the candidate's eval set when its recorded scores are on another one.

    Args:
        model: The export step's manifest (the candidate).
        results: The evaluate step's results (the candidate's metrics.json).
        storage_uri: Root of the pipeline's storage.
        run_id: The KFP run id (filled in by KFP).
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides (``promote.*`` is the policy).
        metrics: The decision (``promote`` 1 or 0), the primary score of the candidate and the champion, and its delta.
        report: Markdown: the decision and its reasons, every check, every score of both with its delta.
        decision: JSON of the decision, its reasons, the candidate and the champion.

    Returns:
        ``promote``, ``reject``, or ``champion`` (the candidate already is the champion: nothing to decide).
    """
    import json

    from m3i.pipeline.promotion import gate_model
    from m3i.pipeline.steps import run_uri

    with open(model.path) as f:
        exported = json.load(f)
    with open(results.path) as f:
        scored = json.load(f)
    g = gate_model(
        exported, scored["files"]["metrics.json"], run_uri(storage_uri, "models"), kfp_run_id=run_id, preset=preset, overrides=overrides,
    )
    for name, value in g["scalars"].items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as f:
        f.write(g["report"])
    doc = {k: g[k] for k in ("decision", "reasons", "candidate", "champion", "reevaluated")}
    with open(decision.path, "w") as f:
        json.dump(doc, f, indent=2)
    decision.metadata.update({"decision": g["decision"], "champion": g["champion"]})
    print(g["report"])
    return g["decision"]
