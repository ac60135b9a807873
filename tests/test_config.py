import pytest

from m3i.config import Config, DataConfig, ShardConfig, list_presets, load_config, to_dict


def test_presets_ship_and_load():
    assert {"default", "demo"} <= set(list_presets())
    cfg = load_config("demo")
    assert cfg.data.image_size == 32 and cfg.model.global_pool == "max" and cfg.shard.max_samples_per_shard == 256
    assert isinstance(load_config(), Config)


def test_overrides_are_typed_and_ordered(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 8\n  shuffle: false\n")
    cfg = load_config("demo", f, ["data.batch_size=16", "shard.labelled=[a, b]", "data.verify_checksums=true", "shard.resize=null"])
    assert cfg.data.batch_size == 16  # --set wins over the file
    assert cfg.data.shuffle is False  # the file wins over the preset
    assert cfg.shard.labelled == ("a", "b")
    assert cfg.data.verify_checksums is True
    assert cfg.shard.resize is None
    assert to_dict(cfg)["shard"]["labelled"] == ["a", "b"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.batch_size=0", "data.batch_size=0 is out of range"),
        ("data.split=test", "data.split='test' is not allowed; choose one of ['train', 'eval']"),
        ("data.sources=[labelled, images]", "data.sources='images' is not allowed"),
        ("shard.eval_fraction=1.5", "shard.eval_fraction=1.5 is out of range; allowed [0.0, 1.0)"),
        ("shard.jpeg_quality=many", "shard.jpeg_quality='many' is not an integer"),
        ("data.shuffle=maybe", "data.shuffle='maybe' is not a boolean"),
        ("data.batchsize=3", "unknown key(s) ['batchsize']"),
        ("nosuch.key=1", "unknown key(s) ['nosuch']"),
        ("data=3", "config.data=3 must be a mapping"),
        ("shard.out=", "shard.out='' is not allowed"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, needle):
    with pytest.raises(ValueError) as e:
        load_config("demo", None, [override])
    assert needle in str(e.value)


def test_bad_preset_and_file(tmp_path):
    with pytest.raises(ValueError, match="preset='nope' does not exist; choose one of"):
        load_config("nope")
    with pytest.raises(ValueError, match="is not a file"):
        load_config(None, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping of sections"):
        load_config(None, bad)
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(None, None, ["data.batch_size"])


def test_sections_are_frozen():
    cfg = DataConfig()
    with pytest.raises(AttributeError):
        cfg.batch_size = 3  # type: ignore[misc]
    assert ShardConfig().max_bad_fraction == 0.01
