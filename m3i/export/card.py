"""What goes beside the weights: timm's ``config.json``, the model card ``README.md``, ``SHA256SUMS``.

``config.json`` has the layout timm writes for the Hugging Face hub (``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``), so
``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the architecture
with the exact arguments and takes the preprocessing (input size, mean, std, crop) from it.

timm reads ``architecture`` as the constructor to call, so it has to be a timm model name,
and ``model_args`` may override every size in it (``vit_tiny_patch16_224`` with
``patch_size=8, img_size=32``). ``m3i_architecture``, first in the file, names the network
itself (:func:`m3i.models.registry.architecture_name`): the variant or timm name when that
name alone builds it, else one spelled from its dimensions (``vit_w96_d4_h3_p8_32``).
timm ignores the key; the card, ``export.json`` and ``m3i evaluate`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from m3i.revision import code_revision
from m3i.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CardFacts", "timm_config", "load_call", "render_card", "render_sums", "code_revision", "EVAL_CROP_PCT"]

EVAL_CROP_PCT = 0.875
"""The centre crop of :class:`m3i.transforms.EvalTransform` (bicubic resize of the short side to S / 0.875)."""


def timm_config(
    architecture: str, model_args: dict[str, Any], num_features: int, image_size: int, name: str = ""
) -> dict[str, Any]:
    """timm's hub ``config.json`` for a headless backbone trained on ``image_size`` px, ImageNet-normalised inputs.

    Args:
        architecture: The timm model name to construct it with.
        model_args: Its keyword arguments (they override the sizes the name implies).
        num_features: Width of the pooled embedding.
        image_size: Side of the square training input.
        name: What the network is (``m3i_architecture``); ``""`` takes ``architecture``.
    """
    return {
        "m3i_architecture": name or architecture,
        "architecture": architecture,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": dict(model_args),
        "pretrained_cfg": {
            "custom_load": False,
            "input_size": [3, image_size, image_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": EVAL_CROP_PCT,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def load_call(folder: str, architecture: str, model_args: dict[str, Any], image_size: int) -> tuple[str, str]:
    """The plain-timm lines that load an export: (from its folder with config.json, from the weights file alone)."""
    by_folder = f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()'
    args = "".join(f", {k}={v!r}" for k, v in model_args.items() if k != "num_classes")
    overlay = (
        f'dict(file="{folder}/model.safetensors", num_classes=0, input_size=(3, {image_size}, {image_size}), '
        f"mean={tuple(IMAGENET_MEAN)}, std={tuple(IMAGENET_STD)}, crop_pct={EVAL_CROP_PCT})"
    )
    by_file = f'model = timm.create_model("{architecture}", pretrained=True, pretrained_cfg_overlay={overlay}, num_classes=0{args}).eval()'
    return by_folder, by_file


@dataclass(frozen=True)
class CardFacts:
    """Everything the model card states; each fact comes from the checkpoint, the config or the export itself."""

    name: str
    version: str
    uri: str
    encoder: str
    dtype: str
    weights_source: str
    architecture: str
    """What the network is (:func:`m3i.models.registry.architecture_name`), e.g. ``vit_w96_d4_h3_p8_32``."""
    model_args: dict[str, Any]
    """timm's constructor arguments; with :attr:`timm_architecture` they build the network exactly."""
    num_features: int
    num_params: int
    image_size: int
    step: int
    planned_steps: int
    world_size: int
    samples_seen: int
    run_id: str
    checkpoint: str
    data_shards: str
    data_index_sha256: str | None
    inputs_sha256: str | None
    m3i_version_train: str
    m3i_version_export: str
    code_revision_train: str | None
    code_revision_export: str
    created: str
    weights_sha256: str
    train_config: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    evaluation_source: str = ""
    history_steps: int = 0
    """Rows of the run's ``history.jsonl`` shipped beside the weights (0: none)."""
    init_from: dict[str, Any] | None = None
    """The checkpoint metadata's ``init_from``: where the run's backbone started from, if not random."""
    timm_architecture: str = ""
    """The timm model name that constructs it with :attr:`model_args`; ``""``: :attr:`architecture` itself."""

    @property
    def constructor(self) -> str:
        """The timm name to call: :attr:`timm_architecture`, else :attr:`architecture`."""
        return self.timm_architecture or self.architecture


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_card(f: CardFacts) -> str:
    """The model card (``README.md``, Hugging Face style: YAML front matter, then Markdown)."""
    by_folder, by_file = load_call(f"/path/to/{f.name}/{f.version}", f.constructor, f.model_args, f.image_size)
    revision_train = f.code_revision_train or "not recorded in the checkpoint"
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags: [m3i, vision-transformer, self-supervised]",
        "---",
        "",
        f"# {f.name} {f.version}",
        "",
        f"An image encoder pre-trained with M3I (all-in-one: image->image, image->category, image->text), "
        f"exported from `{f.checkpoint}`: the **{f.encoder}** encoder in **{f.dtype}**, "
        f"{_network(f)}, no classifier (`num_classes=0`): "
        f"`model(x)` returns the pooled {f.num_features}-dimensional embedding.",
        "",
        "| fact | value |",
        "| --- | --- |",
        f"| architecture | `{f.architecture}`, {f.num_params:,} parameters |",
        f"| timm constructor | `{f.constructor}` with the model args below |",
        f"| model args | `{f.model_args}` |",
        f"| encoder | {f.encoder} (weights read from: {f.weights_source}) |",
        f"| dtype | {f.dtype} |",
        f"| training steps | {f.step} (of {f.planned_steps} planned), world size {f.world_size}, {f.samples_seen:,} samples seen |",
        f"| data index | `{f.data_shards}` |",
        f"| data index sha256 | `{f.data_index_sha256}` |",
        f"| inputs sha256 | `{f.inputs_sha256}` |",
        f"| run id | `{f.run_id}` |",
        *([f"| initialised from | {_init_from(f.init_from)} |"] if f.init_from else []),
        f"| m3i version | {f.m3i_version_train} (training), {f.m3i_version_export} (export) |",
        f"| code revision | {revision_train} (training), {f.code_revision_export} (export) |",
        f"| exported | {f.created} |",
        f"| weights sha256 | `{f.weights_sha256}` |",
        "",
        "## Load it with plain timm",
        "",
        f"Copy the folder `{f.uri}` to local disk (for `s3://`, e.g. `aws s3 cp --recursive`), then:",
        "",
        "```python",
        "import timm, torch",
        by_folder,
        "cfg = timm.data.resolve_data_config({}, model=model)   # input size, mean/std, crop from config.json",
        "transform = timm.data.create_transform(**cfg)",
        f"features = model(transform(image).unsqueeze(0))       # [1, {f.num_features}]",
        "```",
        "",
        "Without `config.json`, from the weights file alone"
        + ("" if f.constructor == f.architecture else f" (`{f.constructor}` is timm's constructor; the arguments make it `{f.architecture}`)")
        + ":",
        "",
        "```python",
        by_file,
        "```",
        "",
        "`num_classes=0` in the overlay keeps timm's load strict (any key or shape mismatch is an error).",
        "",
        "## Preprocessing",
        "",
        f"RGB, resize the short side to {round(f.image_size / EVAL_CROP_PCT)} px (bicubic), centre-crop {f.image_size} px, "
        f"scale to [0, 1], normalise with mean {tuple(IMAGENET_MEAN)} and std {tuple(IMAGENET_STD)}.",
        "",
        "## Evaluation",
        "",
    ]
    if f.evaluation:
        lines += [f"From `{f.evaluation_source}`:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(f.evaluation)]
    else:
        lines.append("Not yet evaluated.")
    lines += [
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(f.train_config, sort_keys=False).rstrip(),
        "```",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights, timm key names), `config.json` (timm architecture, arguments and preprocessing), "
        "this `README.md`, "
        + (f"`history.jsonl` (the training curves: one JSON row per optimizer step, {f.history_steps} rows, "
           "lr, loss parts and monitors), " if f.history_steps else "")
        + "`SHA256SUMS` (`sha256sum -c SHA256SUMS`), and `export.json` (the manifest, written last).",
        "",
    ]
    return "\n".join(lines)


def _network(f: CardFacts) -> str:
    """What the encoder is, and how timm builds it when its timm name is not its name."""
    if f.constructor == f.architecture:
        return f"timm `{f.architecture}` with the arguments below"
    return f"`{f.architecture}`, a timm VisionTransformer built as timm's `{f.constructor}` with the arguments below (which set its size)"


def _init_from(init: dict[str, Any]) -> str:
    """The ``initialised from`` row: which modules took whose weights."""
    step = f", step {init['step']}" if init.get("step") is not None else ""
    modules = ", ".join(f"`{m}`" for m in init.get("modules", []))
    return f"{modules} from `{init.get('uri')}` ({init.get('kind')} `{init.get('name')}`{step})"


def render_sums(hashes: dict[str, str]) -> str:
    """``sha256sum``'s format: one ``<hex>  <name>`` line per file."""
    return "".join(f"{h}  {name}\n" for name, h in sorted(hashes.items()))
