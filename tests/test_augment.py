"""Two-view transform, relative geometry, block masks, the byte tokenizer, the model/objective config."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import default_collate

from m3i.config import Config, load_config
from m3i.config.model import ModelConfig, ObjectiveConfig
from m3i.models import view_positions
from m3i.text import CLS_ID, EOS_ID, PAD_ID, ByteTokenizer
from m3i.data import normalize
from m3i.transforms import CropBox, block_mask, build_transform, num_masked, to_uint8, view_geometry

NO_COLOUR = [
    "objective.color_jitter=0",
    "objective.grayscale_prob=0",
    "objective.blur_prob=[0, 0]",
    "objective.solarize_prob=[0, 0]",
]


def cfg_of(*overrides: str, size: int = 64, patch: int = 8) -> Config:
    return load_config(None, overrides=[f"data.image_size={size}", f"model.patch_size={patch}", *overrides])


def gradient_image(width: int = 150, height: int = 110) -> Image.Image:
    """Red grows to the right, green grows down, blue is a diagonal: every pixel knows where it is."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def sample(img: Image.Image, cls: int = 3, txt: str = "a red circle") -> dict:
    return {"image": img, "cls": cls, "txt": txt, "source": "labelled", "key": "k"}


# ----------------------------------------------------------------------------- geometry


def test_view_geometry_exact_values():
    full = CropBox(0, 0, 100, 200)
    right_half = CropBox(0, 100, 100, 100)
    # v2 = right half, not flipped: x1 = 0.5 + 0.5 u
    assert view_geometry(full, False, right_half, False).tolist() == pytest.approx([0, 0.5, 1, 0.5, 0])
    # v2 flipped: its u=0 is the original column 200 -> x1 = 1 - 0.5 u
    assert view_geometry(full, False, right_half, True).tolist() == pytest.approx([0, 1.0, 1, 0.5, 1])
    # both flipped: v1's x is mirrored too -> x1 = 0 + 0.5 u, no relative flip
    assert view_geometry(full, True, right_half, True).tolist() == pytest.approx([0, 0.0, 1, 0.5, 0])
    # v1 flipped only
    assert view_geometry(full, True, right_half, False).tolist() == pytest.approx([0, 0.5, 1, 0.5, 1])
    # vertical offset and scale
    top = CropBox(10, 0, 50, 100)
    bottom = CropBox(35, 0, 25, 100)
    assert view_geometry(top, False, bottom, False).tolist() == pytest.approx([0.5, 0, 0.5, 1, 0])


def test_view_positions_identity_and_mirror():
    grid = (3, 4)
    ident = view_positions(torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]), grid)[0]
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    assert torch.allclose(ident[:, 0], rows.flatten(), atol=1e-5)
    assert torch.allclose(ident[:, 1], cols.flatten(), atol=1e-5)
    assert torch.allclose(ident[:, 2:], torch.zeros(12, 2))
    mirror = view_positions(torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]]), grid)[0]
    assert torch.allclose(mirror[:, 1], 3 - cols.flatten(), atol=1e-5)
    half = view_positions(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]]), (2, 2))[0]
    # v2 is v1's bottom-right quarter: its patch centres sit at v1 patch coordinates 0.75 + 0.5 k - 0.5
    assert torch.allclose(half[:, 0], torch.tensor([1.0, 1.0, 1.5, 1.5]) - 0.25, atol=1e-5)
    assert torch.allclose(half[:, 2], torch.full((4,), float(np.log(0.5))), atol=1e-6)


def test_relative_positions_match_image_content():
    """Every v2 patch centre, placed in v1 by the geometry, shows the same colour in v1."""
    size, patch = 64, 8
    grid = (size // patch, size // patch)
    cfg = cfg_of(*NO_COLOUR, size=size, patch=patch)
    t = build_transform(cfg)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    v2_xy = torch.stack([(cols.flatten() + 0.5) * patch, (rows.flatten() + 0.5) * patch], -1)  # [L, 2] pixels

    def at(img: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        grid_xy = (xy / size * 2 - 1)[None, None]  # [1, 1, M, 2]
        return F.grid_sample(img[None], grid_xy, mode="bilinear", align_corners=False)[0, :, 0].T  # [M, 3]

    checked, flips = 0, set()
    for seed in range(24):
        out = t(sample(gradient_image()), torch.Generator().manual_seed(seed))
        pos = view_positions(out["geom"][None], grid)[0]  # [L, 4] in v1 patch units
        v1_xy = torch.stack([(pos[:, 1] + 0.5) * patch, (pos[:, 0] + 0.5) * patch], -1)  # same points, v1 pixels
        inside = ((v1_xy > 2) & (v1_xy < size - 2)).all(-1)
        a, b = at(normalize(out["v2"]), v2_xy[inside]), at(normalize(out["v1"]), v1_xy[inside])
        # normalised units: one 8-bit step is ~0.017; allow a few steps of resampling error
        assert torch.allclose(a, b, atol=0.1), (seed, out["geom"], (a - b).abs().max())
        checked += int(inside.sum())
        flips.add(bool(out["geom"][4]))
    assert checked > 200 and flips == {False, True}


def test_geometry_covers_flips_and_crops():
    cfg = cfg_of(*NO_COLOUR)
    t = build_transform(cfg)
    geoms = torch.stack([t(sample(gradient_image()), torch.Generator().manual_seed(s))["geom"] for s in range(40)])
    assert 0 < geoms[:, 4].sum() < 40  # some relative flips, not all
    assert geoms[:, 2].std() > 0.05 and geoms[:, 0].abs().max() > 0.05  # crops differ in scale and offset


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.6), ((8, 8), 0.6), ((4, 4), 0.5), ((2, 2), 0.6)])
def test_block_mask_exact_count_and_reproducible(grid, ratio):
    count = num_masked(grid[0] * grid[1], ratio)
    masks = [block_mask(torch.Generator().manual_seed(s), grid, count, 16) for s in range(20)]
    assert all(m.dtype == torch.bool and m.shape == (grid[0] * grid[1],) for m in masks)
    assert all(int(m.sum()) == count for m in masks)
    again = block_mask(torch.Generator().manual_seed(3), grid, count, 16)
    assert torch.equal(again, masks[3])
    if grid[0] >= 8:
        assert len({tuple(m.tolist()) for m in masks}) > 10


def test_block_mask_is_blockwise():
    grid = (14, 14)
    m = block_mask(torch.Generator().manual_seed(0), grid, num_masked(196, 0.6), 16).view(grid).float()
    # masked patches mostly have masked neighbours (random masks would give ~0.6)
    neighbours = F.avg_pool2d(m[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    assert float((neighbours * m).sum() / m.sum()) > 0.75


def test_num_masked_bounds():
    assert num_masked(196, 0.6) == 118  # SiameseIM's 118 / 196
    assert num_masked(4, 0.01) == 1
    assert num_masked(4, 0.99) == 3


# ----------------------------------------------------------------------------- transforms


def test_train_transform_outputs_and_collate():
    cfg = cfg_of(size=32, patch=8)
    t = build_transform(cfg)
    items = [
        t(sample(gradient_image(), cls=c, txt=txt), torch.Generator().manual_seed(i))
        for i, (c, txt) in enumerate([(2, ""), (-1, "a blue star"), (-1, "")])
    ]
    b = default_collate(items)
    assert b["v1"].shape == (3, 3, 32, 32) and b["v2"].shape == (3, 3, 32, 32)
    assert b["v1"].dtype == b["v2"].dtype == torch.uint8  # normalised on the device (m3i.data.to_device)
    assert b["geom"].shape == (3, 5) and b["mask"].shape == (3, 16) and b["mask"].dtype == torch.bool
    assert b["cls"].tolist() == [2, -1, -1] and b["has_txt"].tolist() == [False, True, False]
    assert b["tokens"].shape == (3, cfg.model.text_max_len) and b["tokens"].dtype == torch.long
    assert (b["mask"].sum(1) == num_masked(16, cfg.objective.mask_ratio)).all()


def test_train_transform_uses_only_the_generator():
    t = build_transform(cfg_of())
    img = gradient_image()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    a = t(sample(img), torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    torch.rand(5)
    b = t(sample(img), torch.Generator().manual_seed(7))
    c = t(sample(img), torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["v1"], c["v1"])


def test_transform_pickles_and_survives_a_round_trip():
    t = build_transform(cfg_of())
    t2 = pickle.loads(pickle.dumps(t))
    a = t(sample(gradient_image()), torch.Generator().manual_seed(1))
    b = t2(sample(gradient_image()), torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_view_when_image_branch_off():
    out = build_transform(cfg_of("objective.use_img=false"))(sample(gradient_image()), torch.Generator())
    assert set(out) == {"v1", "cls", "tokens", "has_txt"}


def test_grey_input_is_made_rgb():
    grey = gradient_image().convert("L")
    out = build_transform(cfg_of())(sample(grey), torch.Generator().manual_seed(0))
    assert out["v1"].shape == (3, 64, 64)


def test_eval_transform_is_deterministic_centre_crop():
    cfg = cfg_of(size=32)
    t = build_transform(cfg, train=False)
    img = gradient_image(80, 40)
    a = t(sample(img, cls=5))
    b = t(sample(img, cls=5), torch.Generator().manual_seed(99))
    assert set(a) >= {"image", "cls"} and a["image"].shape == (3, 32, 32) and int(a["cls"]) == 5
    assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
    # a centre crop of a left-to-right ramp is symmetric about the middle in red
    red = normalize(a["image"])[0].mean(0)
    assert abs(float(red[:16].mean() + red[16:].mean()) / 2 - float(red.mean())) < 1e-5
    assert float(red[0]) < float(red[-1])


def test_to_uint8_keeps_the_pixels_and_normalize_centres_them():
    x = to_uint8(Image.new("RGB", (5, 4), (124, 116, 104)))
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 5) and x[:, 0, 0].tolist() == [124, 116, 104]
    assert normalize(x).abs().max() < 0.01  # the ImageNet mean maps to ~0


def test_image_size_must_divide_by_patch():
    with pytest.raises(ValueError, match="multiple of model.patch_size"):
        build_transform(cfg_of(size=36, patch=8))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_any_unicode():
    tok = ByteTokenizer(64)
    for text in ["a red circle", "un cœur rouge", "赤い丸", "🔴 circle", "Ελληνικά", ""]:
        ids = tok.encode(text)
        assert ids.shape == (64,) and ids.dtype == torch.long
        assert int(ids[0]) == CLS_ID
        assert tok.decode(ids) == text
        assert int(ids.max()) < tok.vocab_size
        n = len(text.encode("utf-8"))
        assert int(ids[n + 1]) == EOS_ID and (ids[n + 2 :] == PAD_ID).all()


def test_tokenizer_truncates_at_a_character_boundary():
    tok = ByteTokenizer(8)  # room for 6 bytes
    assert tok.decode(tok.encode("abcdefghij")) == "abcdef"
    # "é" is 2 bytes: "abcde" + half of "é" must drop the half
    assert tok.decode(tok.encode("abcdeé")) == "abcde"
    assert tok.decode(tok.encode("ab🔴cd")) == "ab🔴"  # 2 + 4 bytes fit exactly
    assert tok.decode(tok.encode("abc🔴")) == "abc"
    assert int(tok.encode("abcdefghij")[-1]) == EOS_ID
    with pytest.raises(ValueError, match="max_len"):
        ByteTokenizer(2)


def test_tokenizer_batch():
    tok = ByteTokenizer(16)
    assert tok.encode_batch(["a", "bc"]).shape == (2, 16)
    assert tok.encode_batch([]).shape == (0, 16)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (ObjectiveConfig, {"use_img": False, "use_cls": False, "use_txt": False}, "at least one branch"),
        (ObjectiveConfig, {"mask_ratio": 1.0}, "objective.mask_ratio"),
        (ObjectiveConfig, {"mask_ratio": 0.0}, "objective.mask_ratio"),
        (ObjectiveConfig, {"w_cls": -1.0}, "objective.w_cls"),
        (ObjectiveConfig, {"crop_scale": (0.8, 0.2)}, "objective.crop_scale"),
        (ObjectiveConfig, {"crop_scale": (0.0, 1.0)}, "objective.crop_scale"),
        (ObjectiveConfig, {"blur_prob": (1.0,)}, "objective.blur_prob"),
        (ObjectiveConfig, {"temperature_min": 0.5}, "temperature_min"),
        (ObjectiveConfig, {"label_smoothing": 1.0}, "objective.label_smoothing"),
        (ModelConfig, {"backbone": ""}, "model.backbone"),
        (ModelConfig, {"proj_dim": 66}, "model.proj_dim"),
        (ModelConfig, {"proj_dim": 64, "predictor_heads": 3}, "model.predictor_heads"),
        (ModelConfig, {"text_width": 64, "text_heads": 5}, "model.text_heads"),
        (ModelConfig, {"ema_m0": 1.5}, "model.ema_m0"),
        (ModelConfig, {"num_classes": -1}, "model.num_classes"),
    ],
)
def test_config_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_config_sections_load_from_overrides():
    cfg = load_config(None, overrides=["model.backbone=m3i_vit_tiny", "objective.use_txt=false", "objective.w_img=0.5"])
    assert cfg.model.backbone == "m3i_vit_tiny" and cfg.objective.use_txt is False and cfg.objective.w_img == 0.5
    assert cfg.model.ema_m0 == 0.995 and cfg.objective.mask_ratio == 0.6 and cfg.objective.unigrad_neg_weight == 0.02
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, overrides=["model.nope=1"])


@pytest.mark.parametrize("preset", ["demo", "default"])
def test_presets_carry_model_and_objective(preset):
    cfg = load_config(preset)
    assert cfg.data.image_size % cfg.model.patch_size == 0
    build_transform(cfg)
