"""``export``: a checkpoint -> timm-loadable backbone weights, config and model card."""

from kfp import dsl
from kfp.dsl import Model, Output

from m3i.pipeline import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export(checkpoint_uri: str, storage_uri: str, model_name: str, preset: str, overrides: list, model: Output[Model]):
    """Exports ``checkpoint_uri`` under ``<storage_uri>/models/<name>/v<step>-<sha8>``.

    Args:
        checkpoint_uri: A checkpoint (from train) or a run's output folder (its latest checkpoint).
        storage_uri: Root of the pipeline's storage.
        model_name: Name of the exported model; empty derives it from the backbone.
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.
        model: JSON manifest of the export: its URI, files, architecture (the network's name), timm constructor and the weights' sha256.
    """
    import json

    from m3i.pipeline.steps import export_model, run_uri

    m = export_model(checkpoint_uri, run_uri(storage_uri, "models"), name=model_name, preset=preset, overrides=overrides)
    with open(model.path, "w") as f:
        json.dump(m, f, indent=2)
    model.metadata.update({k: m[k] for k in ("uri", "name", "version", "step", "sha256", "architecture", "timm_architecture")})
    print(json.dumps(m, indent=2))
