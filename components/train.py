"""``train``: M3I pre-training, in the step's own pod or as a Volcano Job / PyTorchJob / TrainJob it follows."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from m3i.pipeline import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    storage_uri: str,
    run_name: str,
    run_id: str,
    launcher: str,
    nodes: int,
    gpus_per_node: int,
    zero_stage: int,
    precision: str,
    backbone: str,
    steps: int,
    node_selector: dict,
    tolerations: list,
    preset: str,
    overrides: list,
    checkpoint: Output[Model],
) -> str:
    """Trains into ``<storage_uri>/runs/<run_name or run id>`` and returns the final checkpoint's URI.

    A retried step resumes from the run's latest complete checkpoint.

    Args:
        dataset: The shard step's manifest.
        storage_uri: Root of the pipeline's storage.
        run_name: Names the run's folder; empty uses the KFP run id.
        run_id: The KFP run id (filled in by KFP).
        launcher: ``inline`` (torchrun in this pod, one node) or ``volcano`` / ``pytorchjob`` / ``trainjob`` (a job this step submits, follows and deletes).
        nodes: Pods of a volcano/pytorchjob/trainjob job.
        gpus_per_node: GPUs (= processes) per node; 0 uses the preset's process count on CPU.
        zero_stage: DeepSpeed ZeRO stage; -1 keeps the preset's.
        precision: fp32, bf16 or fp16; empty keeps the preset's.
        backbone: timm/m3i backbone name; empty keeps the preset's.
        steps: Optimizer steps; 0 keeps the preset's.
        node_selector: Node selector of a job's pods (the inline step is placed by KFP).
        tolerations: Tolerations of a job's pods (Kubernetes toleration objects).
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.
        checkpoint: JSON manifest of the run: output URI, final checkpoint, steps, world size, losses.

    Returns:
        The final checkpoint's URI.
    """
    import json

    from m3i.pipeline.steps import run_uri, train_model

    with open(dataset.path) as f:
        data = json.load(f)
    m = train_model(
        data["uri"],
        run_uri(storage_uri, "runs", run_name or run_id),
        launcher=launcher,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        zero_stage=zero_stage,
        precision=precision,
        backbone=backbone,
        steps=steps,
        run_id=run_name or run_id,
        node_selector=node_selector,
        tolerations=tolerations,
        preset=preset,
        overrides=overrides,
    )
    with open(checkpoint.path, "w") as f:
        json.dump(m, f, indent=2)
    checkpoint.metadata.update({k: m[k] for k in ("uri", "checkpoint", "steps", "world_size", "launcher")})
    print(json.dumps(m, indent=2))
    return m["checkpoint"]
