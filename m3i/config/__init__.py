"""The m3i config: one frozen dataclass per section, YAML presets, ``--set`` overrides.

    cfg = load_config("demo", config_file=None, overrides=["data.batch_size=32"])

Precedence, lowest first: dataclass defaults, the named preset (``m3i/presets/*.yaml``),
``--config FILE``, then each ``--set section.key=value`` in order, then typed ``values``::

    cfg = load_config("demo", overrides=args.overrides, values={"train.steps": 5})   # checked as --set is
    cfg = with_values(cfg, {"data.shards": uri})                                      # the same, on a built config

Values stay typed inside a process; :func:`m3i.config.overrides.command_line` and
``override_strings`` turn them into ``--set`` text where another process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
import typing
from typing import Any, Sequence

from m3i.config.core import apply_overrides, cap_message, from_dict, read_yaml_sections, to_dict
from m3i.config.data import DataConfig, ShardConfig
from m3i.config.evaluate import EvaluateConfig
from m3i.config.export import ExportConfig
from m3i.config.launch import LaunchConfig
from m3i.config.metrics import MetricsConfig
from m3i.config.model import ModelConfig, ObjectiveConfig
from m3i.config.overrides import command_line, override_strings, set_values
from m3i.config.promote import PromoteConfig
from m3i.config.train import CheckpointConfig, TrainConfig

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "LaunchConfig",
    "MetricsConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PromoteConfig",
    "ShardConfig",
    "TrainConfig",
    "command_line",
    "is_set",
    "load_config",
    "list_presets",
    "override_strings",
    "to_dict",
    "with_values",
]


@dataclass(frozen=True)
class Config:
    """Every section of an m3i run."""

    shard: ShardConfig = field(default_factory=ShardConfig)
    """``m3i shard``: raw images -> WebDataset shards."""

    data: DataConfig = field(default_factory=DataConfig)
    """The loader that feeds training and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The networks: image encoder, projector, predictor, EMA target, class and text heads."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The M3I objective: branches, weights, masking, image mixing and the two-view augmentation."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """``m3i train``: DeepSpeed engine, optimiser and schedule."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint policy: interval, retention, resume."""

    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Training metrics: the per-rank Prometheus endpoint and the final Pushgateway push."""

    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """``m3i launch``: scheduler, image, nodes x processes, resources and pod policy of a training job."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """``m3i export``: a checkpoint -> consolidated backbone weights, config and model card that plain timm loads."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """``m3i evaluate``: kNN and linear probe on frozen features of a held-out split, optional fine-tune."""

    promote: PromoteConfig = field(default_factory=PromoteConfig)
    """``m3i promote``: the gate a new model version must pass to replace its model's champion."""

    def __post_init__(self) -> None:
        # Checks that span sections; each section checks its own values.
        if self.model.global_pool == "token" and self.objective.use_img and self.objective.mix_images:
            raise ValueError(
                "model.global_pool='token' with objective.mix_images=true: a mixed input holds two images and "
                "one class token cannot pool each; allowed: global_pool avg, max or avgmax, or mix_images=false"
            )


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    root = resources.files("m3i") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))




def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: typing.Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        preset: Name of a packaged preset (see :func:`list_presets`), or ``None``.
        config_file: A YAML file with the same sections, applied over the preset.
        overrides: ``section.key=value`` strings applied next (values parsed as YAML).
        values: ``{"section.key": value}`` applied last, as Python values (a command's flags, a
            pipeline step's arguments); checked together with the rest, as ``--set`` is.

    Returns:
        The frozen, validated config.

    Raises:
        ValueError: On an unknown preset, section or key, a value a section rejects, or a
            config file that is not a YAML mapping of sections (naming its line and column);
            one line of at most about ``m3i.config.core.MAX_MESSAGE`` characters.
    """
    try:
        return from_dict(Config, set_values(_raw_config(preset, config_file, overrides), values or {}), section="config")
    except ValueError as e:
        _raise_capped(e)


_Cfg = typing.TypeVar("_Cfg")


def with_values(cfg: _Cfg, values: typing.Mapping[str, Any]) -> _Cfg:
    """``cfg`` (a :class:`Config` or one of its sections) with each ``section.key`` of ``values`` set.

    Checked as ``load_config`` checks a ``--set``: the value coerced to the field's type, the
    section's and the whole config's checks run again, and an error names the key::

        with_values(cfg, {"train.steps": 5, "data.shards": "s3://b/ds"})
        with_values(cfg.shard, {"shard.out": "/tmp/s", "shard.eval_fraction": 0.0})   # a section: its own keys

    Raises:
        ValueError: An unknown section or key, a key of another section, or a value the field or a check refuses.
    """
    try:
        if isinstance(cfg, Config):
            return from_dict(Config, set_values(to_dict(cfg), values), section="config")
        name = _SECTIONS.get(type(cfg))
        if name is None:
            raise TypeError(f"with_values takes a Config or one of its sections, not {type(cfg).__name__}")
        for key in values:
            if not (isinstance(key, str) and key.startswith(f"{name}.")):
                raise ValueError(f"override key {key!r} is not in section {name!r}, the one given")
        return from_dict(type(cfg), set_values({name: to_dict(cfg)}, values)[name], section=f"config.{name}")
    except ValueError as e:
        _raise_capped(e)


def is_set(key: str, preset: str | None = None, config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> bool:
    """Whether the preset, the config file or an override gives ``key`` (``section.name``) a value.

    Lets a command tell a value the user chose from a dataclass default it may replace with a
    better one (``m3i evaluate`` uses the data set the model records unless ``data.shards`` is set).

    Raises:
        ValueError: As :func:`load_config` does.
    """
    try:
        node: Any = _raw_config(preset, config_file, overrides)
    except ValueError as e:
        _raise_capped(e)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


_SECTIONS: dict[type, str] = {tp: name for name, tp in typing.get_type_hints(Config).items()}
"""Section class -> its name in :class:`Config` (``ShardConfig`` -> ``shard``)."""


def _raw_config(preset: str | None, config_file: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The merged sections of the preset, the file and the overrides, before defaults and validation."""
    data: dict[str, Any] = {}
    if preset:
        names = list_presets()
        if preset not in names:
            raise ValueError(f"preset={preset!r} does not exist; choose one of {names}")
        text = (resources.files("m3i") / "presets" / f"{preset}.yaml").read_text()
        data = _merge(data, read_yaml_sections(text, f"preset {preset} (m3i/presets/{preset}.yaml)"))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--config {str(path)!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: byte {e.start} is not UTF-8 text; expected a YAML file") from None
        data = _merge(data, read_yaml_sections(text, str(path)))
    return apply_overrides(data, overrides)


def _raise_capped(e: ValueError) -> typing.NoReturn:
    """Raise ``e`` again, its message cut to one line of bounded length if a section's check built a longer one."""
    text = cap_message(str(e))
    if text == str(e):
        raise e
    raise ValueError(text) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
