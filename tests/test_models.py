"""The M3I model: registry and factory, shapes, gradients, EMA, positions, text encoder, export keys."""

from __future__ import annotations

import dataclasses
import math
import pickle
import socket

import pytest
import timm
import torch

from m3i.config import Config, load_config
from m3i.models import (
    EMATarget,
    M3IModel,
    Predictor,
    TextEncoder,
    backbone_kwargs,
    build_model,
    create_backbone,
    create_model,
    ema_momentum,
    grid_positions,
    list_models,
    encoder_tokens,
    patch_tokens,
    pool_tokens,
    same_image_mask,
    resolve_backbone,
)
from m3i.models.text_encoder import OpenClipTextEncoder, build_text_encoder
from m3i.text import CLIP_EOT_ID, CLIP_SOT_ID, CLIP_VOCAB_SIZE, ByteTokenizer, ClipTokenizer, build_tokenizer
from m3i.transforms import block_mask, num_masked

TINY_HEADS = [
    "model.proj_dim=32",
    "model.predictor_depth=1",
    "model.predictor_heads=4",
    "model.text_width=32",
    "model.text_depth=1",
    "model.text_heads=4",
    "model.text_max_len=32",
    "model.embed_dim=32",
]


def tiny_cfg(*overrides: str, backbone: str = "m3i_vit_micro", size: int = 32, patch: int = 8) -> Config:
    return load_config(
        None,
        overrides=[
            f"data.image_size={size}",
            f"model.patch_size={patch}",
            f"model.backbone={backbone}",
            *TINY_HEADS,
            *overrides,
        ],
    )


def make_batch(cfg: Config, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic collated batch: a third labelled, a third captioned, a third neither."""
    g = torch.Generator().manual_seed(seed)
    size, patch = cfg.data.image_size, cfg.model.patch_size
    grid = (size // patch, size // patch)
    count = num_masked(grid[0] * grid[1], cfg.objective.mask_ratio)
    tok = build_tokenizer(cfg.model)
    cls = torch.tensor([i % 4 if i % 3 == 0 else -1 for i in range(n)])
    txt = [f"caption {i} ünïcode" if i % 3 == 1 else "" for i in range(n)]
    geom = torch.stack(
        [torch.tensor([0.1 * (i % 3), 0.2, 0.8 + 0.1 * (i % 2), 0.7, float(i % 2)]) for i in range(n)]
    )
    return {
        "v1": torch.randn(n, 3, size, size, generator=g),
        "v2": torch.randn(n, 3, size, size, generator=g),
        "geom": geom,
        "mask": torch.stack([block_mask(g, grid, count, 4) for _ in range(n)]),
        "cls": cls,
        "tokens": tok.encode_batch(txt),
        "has_txt": torch.tensor([bool(t) for t in txt]),
    }


# ----------------------------------------------------------------------------- registry / factory


def test_registry_lists_the_variants():
    names = list_models()
    assert {"m3i_vit_micro", "m3i_vit_tiny", "m3i_vit_small", "m3i_vit_base"} <= set(names)
    assert resolve_backbone("m3i_vit_small").timm_name == "vit_small_patch16_224"
    assert resolve_backbone("vit_base_patch16_224").timm_name == "vit_base_patch16_224"
    assert create_model is build_model


@pytest.mark.parametrize("name", list_models())
def test_shapes_for_each_registered_backbone(name):
    cfg = tiny_cfg(backbone=name, size=32, patch=16)
    model = build_model(cfg, num_classes=5)
    n, d = 3, model.backbone.num_features
    batch = make_batch(cfg, n)
    with torch.no_grad():
        tokens = patch_tokens(model.backbone, batch["v1"])
        assert tokens.shape == (n, 4, d)
        assert model.encode(batch["v1"]).shape == (n, d)
        assert model.target(batch["v2"]).shape == (n, 4, cfg.model.proj_dim)
        assert model.embed_image(batch["v1"]).shape == (n, cfg.model.embed_dim)
        assert model.embed_text(batch["tokens"]).shape == (n, cfg.model.embed_dim)
        out = model(batch)
    keys = ("loss", "loss_img", "loss_cls", "loss_txt", "n_img", "n_cls", "n_txt")
    for key in (*keys, "target_std", "ema_momentum", "temperature", "acc_cls"):
        assert out[key].shape == () and torch.isfinite(out[key]), key


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_tiny_patch16_224"])
def test_any_timm_vit_name_is_accepted(name):
    cfg = tiny_cfg(backbone=name, size=32, patch=16)
    model = build_model(cfg, num_classes=2)
    out = model(make_batch(cfg, 2))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("name,match", [("not_a_model", "not known"), ("resnet18", "VisionTransformer")])
def test_unknown_or_non_vit_backbones_are_rejected(name, match):
    with pytest.raises(ValueError, match=match):
        create_backbone(tiny_cfg(backbone=name))


def _meta_backbone(cfg: Config):
    with torch.device("meta"):  # shapes only
        return create_backbone(cfg)


@pytest.mark.parametrize("name", list_models())
def test_a_variant_keeps_its_name_only_at_its_own_patch_and_image_size(name):
    from m3i.models.registry import architecture_name, spelled_name

    spec = resolve_backbone(name)
    with torch.device("meta"):
        own = timm.create_model(spec.timm_name, num_classes=0, **spec.kwargs)  # the variant as its name builds it
    size, patch = own.patch_embed.img_size[0], own.patch_embed.patch_size[0]
    for pool in ("avg", "max", "token"):  # pooling is not part of the name
        cfg = tiny_cfg(f"model.global_pool={pool}", "objective.mix_images=false", backbone=name, size=size, patch=patch)
        assert architecture_name(_meta_backbone(cfg), name) == name
    resized = _meta_backbone(tiny_cfg(backbone=name, size=64, patch=8))
    got = architecture_name(resized, name)
    width, depth, heads = own.embed_dim, len(own.blocks), own.blocks[0].attn.num_heads
    assert got == spelled_name(resized) == f"vit_w{width}_d{depth}_h{heads}_p8_64" and "patch16" not in got


def test_the_demo_backbone_is_named_from_its_real_dims():
    from m3i.models.registry import architecture_name

    cfg = load_config("demo")
    assert architecture_name(_meta_backbone(cfg), cfg.model.backbone) == "vit_w96_d4_h3_p8_32"
    demo64 = load_config("demo", overrides=["data.image_size=64"])
    assert architecture_name(_meta_backbone(demo64), demo64.model.backbone) == "vit_w96_d4_h3_p8_64"
    # An old export's config.json only has timm's constructor: that name is no claim on the network either.
    assert architecture_name(_meta_backbone(cfg), "vit_tiny_patch16_224") == "vit_w96_d4_h3_p8_32"


@pytest.mark.parametrize(
    "timm_name, claimed, want",
    [
        ("vit_base_patch16_224", "vit_base_patch16_224", "vit_base_patch16_224"),  # a timm name that builds it exactly
        ("vit_base_patch16_224", "m3i_vit_base", "m3i_vit_base"),
        ("vit_small_patch16_224", "vit_base_patch16_224", "vit_w384_d12_h6_p16_224"),  # a wrong claim
        ("vit_base_patch16_clip_224", "vit_base_patch16_224", "vit_w768_d12_h12_p16_224"),  # pre-norm: not the same network
        ("vit_little_patch16_reg1_gap_256", "", "vit_w320_d14_h5_p16_256_mlp1792_nocls_reg1"),
        ("vit_tiny_patch16_224", "resnet18", "vit_w192_d12_h3_p16_224"),  # not a ViT
        ("vit_tiny_patch16_224", "not_a_model", "vit_w192_d12_h3_p16_224"),
    ],
)
def test_architecture_name_keeps_a_true_claim_and_spells_out_the_rest(timm_name, claimed, want):
    from m3i.models.registry import architecture_name

    with torch.device("meta"):
        net = timm.create_model(timm_name, num_classes=0)
    assert architecture_name(net, claimed) == want


def test_patch_size_and_image_size_come_from_config():
    cfg = tiny_cfg(size=48, patch=8)
    bb = create_backbone(cfg)
    assert tuple(bb.patch_embed.grid_size) == (6, 6) and bb.patch_embed.patch_size == (8, 8)
    with pytest.raises(ValueError, match="multiple"):
        create_backbone(tiny_cfg(size=36, patch=8))


def test_category_only_without_classes_is_refused():
    cfg = tiny_cfg("objective.use_img=false", "objective.use_txt=false")
    with pytest.raises(ValueError, match="num_classes"):
        build_model(cfg)
    assert build_model(cfg, num_classes=3).use_cls


# ----------------------------------------------------------------------------- gradients / EMA


@pytest.mark.parametrize("mix", [True, False])
def test_gradients_reach_online_and_never_ema(mix):
    cfg = tiny_cfg(f"objective.mix_images={mix}")
    model = build_model(cfg, num_classes=4)
    model(make_batch(cfg, 7))["loss"].backward()
    online = {n: p for n, p in model.named_parameters() if not n.startswith("target.")}
    missing = [n for n, p in online.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for n, p in online.items() if n.endswith("weight") and p.ndim == 2)
    target = [p for n, p in model.named_parameters() if n.startswith("target.")]
    assert target and all(not p.requires_grad and p.grad is None for p in target)


def test_ema_target_is_saved_and_stays_in_eval():
    cfg = tiny_cfg("model.drop_path=0.5")
    model = build_model(cfg, num_classes=2)
    keys = model.state_dict().keys()
    assert any(k.startswith("target.backbone.") for k in keys) and "ema_m" in keys
    model.train()
    assert model.backbone.training and not model.target.training
    assert not any(m.training for m in model.target.modules())


def test_ema_update_math():
    cfg = tiny_cfg()
    model = build_model(cfg, num_classes=2)
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.target.backbone.parameters(), *model.target.projector.parameters()]
    assert all(torch.equal(o, t) for o, t in zip(online, target))  # starts as a copy
    with torch.no_grad():
        for t in target:
            t.fill_(2.0)
    model.update_ema(0.9)
    assert all(torch.allclose(t, 0.9 * 2.0 + 0.1 * o, atol=1e-6) for o, t in zip(online, target))
    before = [t.clone() for t in target]
    model.update_ema(1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))
    model.update_ema(0.0)
    assert all(torch.equal(t, o) for o, t in zip(online, target))
    assert float(model.ema_m) == 0.0


def test_momentum_schedule_end_points():
    assert ema_momentum(0, 100, 0.995) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.995) == pytest.approx(1.0)
    assert ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_momentum(500, 100, 0.99) == pytest.approx(1.0) and ema_momentum(-5, 100, 0.99) == pytest.approx(0.99)
    ms = [ema_momentum(s, 40, 0.9) for s in range(41)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    with pytest.raises(ValueError):
        ema_momentum(0, 0, 0.99)
    with pytest.raises(ValueError):
        ema_momentum(0, 10, 1.5)


def test_ema_step_uses_the_schedule():
    model = build_model(tiny_cfg("model.ema_m0=0.9"), num_classes=2)
    assert model.ema_step(0, 10) == pytest.approx(0.9)
    out = model(make_batch(tiny_cfg("model.ema_m0=0.9"), 2))
    assert float(out["ema_momentum"].detach()) == pytest.approx(0.9)
    assert model.ema_step(10, 10) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- embedding / export


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "token"])
def test_encode_matches_a_plain_timm_model_with_the_exported_weights(pool):
    mix = "objective.mix_images=false" if pool == "token" else "objective.mix_images=true"
    cfg = tiny_cfg(f"model.global_pool={pool}", mix)
    model = build_model(cfg, num_classes=2).eval()
    name, kwargs = backbone_kwargs(cfg)
    plain = timm.create_model(name, **kwargs).eval()
    plain.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = plain.forward_head(plain.forward_features(x), pre_logits=True)
        assert torch.allclose(model.encode(x), want, atol=1e-5)
        assert torch.allclose(pool_tokens(model.backbone, encoder_tokens(model.backbone, x)), want, atol=1e-5)
    assert kwargs["global_pool"] == pool


def test_pooling_a_subset_equals_pooling_those_patches_alone():
    for pool in ("avg", "max", "avgmax"):
        bb = create_backbone(tiny_cfg(f"model.global_pool={pool}")).eval()
        tokens = torch.randn(2, bb.num_prefix_tokens + 16, bb.num_features)
        w = torch.zeros(2, 16, dtype=torch.bool)
        w[0, :5] = True
        w[1, 7:] = True
        got = pool_tokens(bb, tokens, w)
        for r, idx in enumerate((torch.arange(5), torch.arange(7, 16))):
            alone = torch.cat([tokens[r : r + 1, : bb.num_prefix_tokens], tokens[r : r + 1, bb.num_prefix_tokens + idx]], 1)
            assert torch.allclose(got[r], pool_tokens(bb, alone)[0], atol=1e-6), pool


def test_token_pooling_with_mixed_images_is_refused():
    with pytest.raises(ValueError, match="global_pool='token' with objective.mix_images"):
        tiny_cfg("model.global_pool=token", "objective.mix_images=true")
    with pytest.raises(ValueError, match="model.global_pool='mean'"):
        tiny_cfg("model.global_pool=mean")


def test_patch_tokens_of_a_subset_match_gathered_positions():
    cfg = tiny_cfg("model.drop_path=0")
    bb = create_backbone(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 15], [3, 4, 9]])
    with torch.no_grad():
        sub = patch_tokens(bb, x, keep=keep)
        assert sub.shape == (2, 3, bb.num_features)
        # running on a subset is not the same as slicing the full output (attention sees fewer tokens) ...
        assert not torch.allclose(sub, patch_tokens(bb, x)[torch.arange(2)[:, None], keep], atol=1e-4)
        # ... but it is the same as running on images whose other patches do not exist: order-free
        perm = torch.tensor([[2, 0, 1], [1, 2, 0]])
        shuffled = patch_tokens(bb, x, keep=keep.gather(1, perm))
        assert torch.allclose(shuffled, sub.gather(1, perm[..., None].expand_as(sub)), atol=1e-5)


def test_no_weight_decay_names_exist():
    model = build_model(tiny_cfg(), num_classes=2)
    names = model.no_weight_decay()
    own = dict(model.named_parameters())
    assert {"backbone.pos_embed", "predictor.mask_token", "logit_scale"} <= names and names <= set(own)


# ----------------------------------------------------------------------------- predictor / positions / text


def test_predictor_uses_query_positions():
    torch.manual_seed(0)
    pred = Predictor(32, 1, 4).eval()
    grid_pos = grid_positions((4, 4))
    vis = torch.randn(1, 6, 32)
    a = pred(vis, grid_pos[None, :6], grid_pos[None, 6:])
    b = pred(vis, grid_pos[None, :6], grid_pos[None, 6:].flip(1))
    assert a.shape == (1, 10, 32)
    assert torch.allclose(a.flip(1), b, atol=1e-5)  # a query's output follows its position
    assert not torch.allclose(a, b, atol=1e-3)
    scaled = grid_pos[None, 6:].clone()
    scaled[..., 2:] = math.log(2.0)
    assert not torch.allclose(a, pred(vis, grid_pos[None, :6], scaled), atol=1e-3)


def test_text_encoder_ignores_padding_and_takes_empty_batches():
    torch.manual_seed(0)
    enc = TextEncoder(32, 2, 4, 48).eval()
    short, long = ByteTokenizer(24), ByteTokenizer(48)  # both fit the texts whole
    texts = ["a small red star", "ein grüner Kreis"]
    with torch.no_grad():
        a = enc(short.encode_batch(texts))
        b = enc(long.encode_batch(texts))
        assert torch.allclose(a, b, atol=1e-5)
        assert enc(long.encode_batch([])).shape == (0, 32)
        assert not torch.allclose(a[0], a[1], atol=1e-3)


@pytest.mark.parametrize(
    "kind,tokenizer,encoder", [("open_clip", ClipTokenizer, OpenClipTextEncoder), ("byte", ByteTokenizer, TextEncoder)]
)
def test_each_text_encoder_builds_tokenises_and_embeds(kind, tokenizer, encoder):
    cfg = tiny_cfg(f"model.text_encoder={kind}")  # text_max_len 32, width 32
    tok, enc = build_tokenizer(cfg.model), build_text_encoder(cfg.model)
    assert type(tok) is tokenizer and type(enc) is encoder
    ids = tok.encode("a red circle in the centre")
    assert ids.shape == (32,) and ids.dtype == torch.long
    assert int(ids.max()) < tok.vocab_size
    assert enc(tok.encode_batch(["a red circle", "two blue squares"])).shape == (2, 32)
    model = build_model(cfg, num_classes=2)
    assert type(model.text_encoder) is encoder
    assert model.embed_text(tok.encode_batch(["a red circle"])).shape == (1, cfg.model.embed_dim)


@pytest.mark.parametrize("kind", ["open_clip", "byte"])
def test_padding_does_not_change_a_captions_embedding(kind):
    torch.manual_seed(0)
    m = tiny_cfg(f"model.text_encoder={kind}", "model.text_depth=2").model  # text_max_len 32
    enc = build_text_encoder(m).eval()
    tok, short = build_tokenizer(m), build_tokenizer(dataclasses.replace(m, text_max_len=24))
    caption, longer = "a small red star!", "a large green circle next to a small blue square, seen from above"
    with torch.no_grad():
        alone = enc(short.encode_batch([caption]))  # [1, W]: padded to 24
        padded = enc(tok.encode_batch([caption]))  # padded to 32
        batched = enc(tok.encode_batch([caption, longer]))  # next to a longer caption
        assert torch.allclose(alone[0], padded[0], atol=1e-5)
        assert torch.allclose(alone[0], batched[0], atol=1e-5)
        assert not torch.allclose(batched[0], batched[1], atol=1e-3)
        assert enc(tok.encode_batch([])).shape == (0, m.text_width)


def test_open_clip_encoder_refuses_tokens_longer_than_its_context():
    enc = OpenClipTextEncoder(32, 1, 4, 16)
    with pytest.raises(ValueError, match="max_len=16"):
        enc(ClipTokenizer(17).encode_batch(["a red circle"]))


def test_default_config_builds_a_bert_base_sized_open_clip_text_tower():
    from m3i.models.groups import optimizer_group_names

    cfg = load_config(None)
    m = cfg.model
    assert (m.text_encoder, m.text_width, m.text_depth, m.text_heads, m.text_max_len) == ("open_clip", 768, 12, 12, 77)
    assert load_config("default").model == m  # the preset spells out the dataclass defaults
    with torch.device("meta"):  # no memory, no init cost: only the architecture
        enc = build_text_encoder(m)
    tower = enc.tower
    assert isinstance(enc, OpenClipTextEncoder) and enc.width == 768
    assert len(tower.transformer.resblocks) == 12 and tower.transformer.width == 768 and tower.heads == 12
    assert tower.context_length == 77 and tower.token_embedding.num_embeddings == CLIP_VOCAB_SIZE
    assert tower.text_projection is None and tower.pool_type == "argmax" and tower.attn_mask is not None  # causal
    assert 120e6 < sum(p.numel() for p in enc.parameters()) < 125e6  # BERT-Base-sized, with CLIP's vocabulary
    # Reading a ZeRO-0 mixed-precision checkpoint rebuilds the whole model on the meta device to name the optimizer groups.
    decay, no_decay = optimizer_group_names(cfg, 10)()
    assert "text_encoder.tower.positional_embedding" in no_decay
    assert "text_encoder.tower.token_embedding.weight" in decay


def test_clip_tokenizer_works_offline_and_pickles_small(monkeypatch):
    import m3i.text as text_module

    def no_network(*args, **kwargs):
        raise AssertionError("the CLIP tokenizer touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    text_module._clip_bpe.cache_clear()  # load the vocabulary again, under the block
    tok = ClipTokenizer(77)
    ids = tok.encode("A  red circle, in the CENTRE.")
    assert ids.shape == (77,) and int(ids[0]) == CLIP_SOT_ID
    end = int((ids == CLIP_EOT_ID).nonzero()[0])
    assert 3 < end < 12 and (ids[end + 1 :] == 0).all()
    assert tok.decode(ids) == "a red circle , in the centre ."
    cut = ClipTokenizer(8).encode("one two three four five six seven eight nine ten")
    assert cut.shape == (8,) and int(cut[-1]) == CLIP_EOT_ID  # truncated, still ends in <end>
    blob = pickle.dumps(tok)  # loader workers get the tokenizer pickled; the vocabulary stays behind
    assert len(blob) < 1000 and torch.equal(pickle.loads(blob).encode("A red circle."), tok.encode("A red circle."))
    assert tok.encode_batch([]).shape == (0, 77)


def test_unknown_text_encoder_is_refused():
    with pytest.raises(ValueError, match="text_encoder='bert'.*open_clip"):
        tiny_cfg("model.text_encoder=bert")


def test_ema_target_targets_are_layer_normalised():
    cfg = tiny_cfg()
    model: M3IModel = build_model(cfg, num_classes=2)
    assert isinstance(model.target, EMATarget)
    t = model.target(torch.randn(2, 3, 32, 32))
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-4)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-2)


def test_mixed_input_holds_a_on_visible_and_b_on_masked_patches(monkeypatch):
    import m3i.models.m3i as m3i_module

    cfg = tiny_cfg()
    model = build_model(cfg, num_classes=4)
    batch = make_batch(cfg, 5)  # pairs (0, 3), (1, 4); sample 2 has a blank partner
    seen: list[torch.Tensor] = []
    real = m3i_module.encoder_tokens

    def spy(backbone, images, keep=None, attn_mask=None):
        if backbone is model.backbone:
            seen.append(images.detach().clone())
        return real(backbone, images, keep, attn_mask)

    monkeypatch.setattr(m3i_module, "encoder_tokens", spy)
    model(batch)
    (x,) = seen
    assert x.shape == (3, 3, 32, 32)
    pixel_mask = batch["mask"][:3].view(3, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    b_side = torch.cat([batch["v1"][3:], torch.zeros_like(batch["v1"][:1])])
    assert torch.equal(x, torch.where(pixel_mask, b_side, batch["v1"][:3]))


def test_separate_attention_keeps_each_image_of_a_mixed_input_to_itself():
    """With mix_attention=separate, image A's tokens do not change when B's pixels do."""
    bb = create_backbone(tiny_cfg("model.drop_path=0")).eval()
    groups = torch.zeros(1, 16, dtype=torch.long)
    groups[0, 8:] = 1
    mask = same_image_mask(groups, bb.num_prefix_tokens)
    assert mask.shape == (1, 1, 16 + bb.num_prefix_tokens, 16 + bb.num_prefix_tokens)
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 16:] = torch.randn(1, 3, 16, 32)  # rows 2-3 of the 4 x 4 grid: patches 8-15, image B
    with torch.no_grad():
        a_x = encoder_tokens(bb, x, attn_mask=mask)[:, bb.num_prefix_tokens :][:, :8]
        a_y = encoder_tokens(bb, y, attn_mask=mask)[:, bb.num_prefix_tokens :][:, :8]
        joint = encoder_tokens(bb, y)[:, bb.num_prefix_tokens :][:, :8]
    # the class token is shared, so A hears B only through it; without it A is untouched
    if bb.num_prefix_tokens == 0:
        assert torch.allclose(a_x, a_y, atol=1e-5)
    assert (a_x - a_y).abs().max() < (a_x - joint).abs().max()
    cfg = tiny_cfg("objective.mix_attention=separate")
    model = build_model(cfg, num_classes=4)
    out = model(make_batch(cfg, 4))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="objective.mix_attention='both'"):
        tiny_cfg("objective.mix_attention=both")
