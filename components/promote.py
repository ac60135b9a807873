"""``champion`` and ``promote``: where training starts, and the record of the gate's decision."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from m3i.pipeline import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def champion(
    storage_uri: str, model_name: str, start_from_champion: bool, preset: str, overrides: list, start: Output[Artifact],
) -> list:
    """Resolves, when the run runs, where training starts: the champion's export or random initialisation.

    Args:
        storage_uri: Root of the pipeline's storage; champions live under ``<storage_uri>/models/<name>``.
        model_name: The model whose champion training starts from.
        start_from_champion: Start from the champion (``train.init_from``, continued pre-training) when there is one.
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.
        start: JSON of the start point: the champion's version and export URI (empty: random init) and why.

    Returns:
        The train step's overrides: ``overrides`` plus ``train.init_from=<champion>`` when it starts from one.
    """
    import json

    from m3i.pipeline.promotion import start_point
    from m3i.pipeline.steps import run_uri

    s = start_point(run_uri(storage_uri, "models"), model_name, start_from_champion=start_from_champion, preset=preset, overrides=overrides)
    with open(start.path, "w") as f:
        json.dump({k: s[k] for k in ("champion", "init_from", "reason")}, f, indent=2)
    start.metadata.update({"champion": s["champion"], "init_from": s["init_from"]})
    print(s["reason"])
    return s["overrides"]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def promote(
    model: Input[Model],
    results: Input[Artifact],
    storage_uri: str,
    run_id: str,
    expected: str,
    fail_on_reject: bool,
    preset: str,
    overrides: list,
    event: Output[Artifact],
) -> str:
    """Records the gate's decision in the model's promotion log: moves the champion pointer, or logs the rejection.

    Decides again first, against the log as it is now (another run may have moved the champion since the gate).

    Args:
        model: The export step's manifest (the candidate).
        results: The evaluate step's results (the candidate's metrics.json).
        storage_uri: Root of the pipeline's storage.
        run_id: The KFP run id (filled in by KFP), recorded with the event.
        expected: The gate's decision, ``promote`` or ``reject``.
        fail_on_reject: Fail the step (and the run) after recording a rejection.
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides (``promote.*``: policy, registry, pushgateway).
        event: JSON of the recorded event: decision, reasons, log number, the champion after.

    Returns:
        The decision recorded: ``promote`` or ``reject``.
    """
    import json

    from m3i.pipeline.promotion import record_decision
    from m3i.pipeline.steps import run_uri

    with open(model.path) as f:
        exported = json.load(f)
    with open(results.path) as f:
        scored = json.load(f)
    r = record_decision(
        exported, scored["files"]["metrics.json"], run_uri(storage_uri, "models"), expected=expected, kfp_run_id=run_id,
        fail_on_reject=fail_on_reject, preset=preset, overrides=overrides,
    )
    with open(event.path, "w") as f:
        json.dump(r, f, indent=2)
    event.metadata.update({"decision": r["decision"], "seq": r["seq"], "champion": r["champion"]})
    print(json.dumps(r, indent=2))
    return r["decision"]
