"""The objective: per-branch losses, per-sample masks, branch switches, and the distributed reductions."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from m3i.config import ObjectiveConfig
from m3i.losses import clip_loss, combine, feature_std, masked_cross_entropy, target_covariance, unigrad_loss
from m3i.models import build_model
from tests.test_models import make_batch, tiny_cfg

# ----------------------------------------------------------------------------- image->image


def test_unigrad_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(10, 6, generator=g), F.layer_norm(torch.randn(10, 6, generator=g), (6,))
    cov = t.T @ t / 10
    want = (((p - t) ** 2).sum(1).mean() + 0.02 * torch.einsum("md,de,me->m", p, cov, p).mean()) / 6
    assert torch.allclose(target_covariance(t), cov, atol=1e-6)
    assert torch.allclose(unigrad_loss(p, t, 0.02), want, atol=1e-6)
    assert torch.allclose(unigrad_loss(p, t, 0.0), ((p - t) ** 2).sum(1).mean() / 6, atol=1e-6)


def test_unigrad_gradient_flows_to_predictions_only():
    p = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    unigrad_loss(p, t).backward()
    assert p.grad is not None and t.grad is None
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = unigrad_loss(empty, torch.zeros(0, 4))
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss.detach())


def test_feature_std_sees_collapse():
    same = F.layer_norm(torch.randn(1, 16).expand(50, 16), (16,))
    diverse = F.layer_norm(torch.randn(50, 16), (16,))
    assert float(feature_std(same)) < 1e-5 < 0.5 < float(feature_std(diverse))


# ----------------------------------------------------------------------------- image->category


def test_masked_cross_entropy_counts_labelled_only():
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, -1, 2, -1, 1])
    loss, count, correct = masked_cross_entropy(logits, labels, 0.1)
    keep = labels >= 0
    want = F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1)
    assert torch.allclose(loss, want) and int(count) == 3
    assert int(correct) == int((logits[keep].argmax(1) == labels[keep]).sum())
    loss.backward()
    assert logits.grad[~keep].abs().sum() == 0


def test_masked_cross_entropy_without_labels_is_zero_not_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    loss, count, _ = masked_cross_entropy(logits, torch.full((4,), -1))
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_masked_cross_entropy_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        masked_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))


# ----------------------------------------------------------------------------- image->text


def reference_clip(img, txt, scale):
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_clip_loss_over_captioned_rows():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    valid = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(2.0)
    loss, count = clip_loss(img, txt, valid, scale)
    assert int(count) == 4
    assert torch.allclose(loss, reference_clip(img[valid], txt[valid], scale), atol=1e-5)


def test_clip_loss_degenerate_batches():
    img = torch.randn(3, 4, requires_grad=True)
    txt = torch.randn(3, 4, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    loss, count = clip_loss(img, txt, torch.zeros(3, dtype=torch.bool), scale)
    assert float(loss.detach()) == 0.0 and int(count) == 0
    loss.backward()
    assert img.grad.abs().sum() == 0 and scale.grad is not None
    one, _ = clip_loss(img, txt, torch.tensor([False, True, False]), scale)
    assert float(one.detach()) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- combine / switches


@pytest.mark.parametrize("flags", [f for f in itertools.product([False, True], repeat=3) if any(f)])
def test_any_subset_of_branches_trains(flags):
    use_img, use_cls, use_txt = flags
    cfg = tiny_cfg(
        f"objective.use_img={use_img}",
        f"objective.use_cls={use_cls}",
        f"objective.use_txt={use_txt}",
        "objective.w_img=0.5",
        "objective.w_cls=2.0",
        "objective.w_txt=3.0",
    )
    model = build_model(cfg, num_classes=4)
    batch = make_batch(cfg, 6)
    if not use_img:
        batch = {k: v for k, v in batch.items() if k not in ("v2", "geom", "mask")}
    out = model(batch)
    want = 0.5 * out["loss_img"] + 2.0 * out["loss_cls"] + 3.0 * out["loss_txt"]
    assert torch.allclose(out["loss"], want)
    branches = ((use_img, "img", "predictor"), (use_cls, "cls", "cls_head"), (use_txt, "txt", "text_encoder"))
    for on, name, module in branches:
        assert hasattr(model, module) == on
        assert (float(out[f"loss_{name}"].detach()) > 0) == on
        assert (float(out[f"n_{name}"]) > 0) == on
    assert ("target_std" in out) == use_img and ("temperature" in out) == use_txt
    out["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_combine_uses_weights_and_switches():
    parts = {"loss_img": torch.tensor(1.0), "loss_cls": torch.tensor(2.0), "loss_txt": torch.tensor(4.0)}
    assert float(combine(parts, ObjectiveConfig(w_img=2.0, w_cls=0.5, w_txt=0.25))) == pytest.approx(4.0)
    assert float(combine(parts, ObjectiveConfig(use_img=False, use_txt=False))) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- per-sample masks on the model


@pytest.mark.parametrize("mix", [True, False])
def test_mixed_batch_counts_each_sample_in_its_branches(mix):
    cfg = tiny_cfg(f"objective.mix_images={mix}")
    model = build_model(cfg, num_classes=4)
    batch = make_batch(cfg, 7)  # labelled: 0, 3, 6; captioned: 1, 4
    out = model(batch)
    assert float(out["n_img"]) == 7 and float(out["n_cls"]) == 3 and float(out["n_txt"]) == 2
    for key, value in out.items():
        assert torch.isfinite(value), key


@pytest.mark.parametrize("mix", [True, False])
def test_all_unlabelled_batch_has_no_cls_or_txt_term(mix):
    cfg = tiny_cfg(f"objective.mix_images={mix}")
    model = build_model(cfg, num_classes=4)
    batch = make_batch(cfg, 5)
    batch["cls"] = torch.full((5,), -1)
    batch["has_txt"] = torch.zeros(5, dtype=torch.bool)
    batch["tokens"] = torch.zeros_like(batch["tokens"])
    out = model(batch)
    assert float(out["loss_cls"].detach()) == 0.0 and float(out["loss_txt"].detach()) == 0.0
    assert float(out["n_cls"]) == 0 and float(out["n_txt"]) == 0
    assert torch.allclose(out["loss"], cfg.objective.w_img * out["loss_img"])
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.cls_head.weight.grad.abs().sum() == 0  # in the graph, but with zero gradient
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.text_encoder.parameters())
    assert model.predictor.head.weight.grad.abs().sum() > 0


def test_single_sample_and_odd_batches():
    cfg = tiny_cfg()
    model = build_model(cfg, num_classes=4)
    for n in (1, 2, 3):
        out = model(make_batch(cfg, n))
        assert torch.isfinite(out["loss"]) and float(out["n_img"]) == n


def test_fixed_seed_gives_identical_loss():
    cfg = tiny_cfg()
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=4)
        losses.append(model(make_batch(cfg, 6, seed=3))["loss"].detach())
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    other = build_model(cfg, num_classes=4)(make_batch(cfg, 6, seed=3))["loss"].detach()
    assert not torch.equal(losses[0], other)


def test_bad_mask_is_reported():
    cfg = tiny_cfg()
    model = build_model(cfg, num_classes=4)
    batch = make_batch(cfg, 4)
    batch["mask"][0, :] = False
    with pytest.raises(ValueError, match="same masked count"):
        model(batch)


# ----------------------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(5)
    target = F.layer_norm(torch.randn(12, 8, generator=g), (8,))  # 6 tokens per rank
    pred = torch.randn(12, 8, generator=g)
    img, txt = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)  # 4 rows on rank 0, 5 on rank 1
    valid = torch.tensor([True, False, True, True, True, True, False, True, True])
    return target, pred, img, txt, valid


def _split(rank: int):
    target, pred, img, txt, valid = _data()
    tok = slice(0, 6) if rank == 0 else slice(6, 12)
    row = slice(0, 4) if rank == 0 else slice(4, 9)
    return target[tok], pred[tok], img[row], txt[row], valid[row]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        target, pred, img, txt, valid = _split(rank)
        img = img.clone().requires_grad_(True)
        scale = torch.tensor(2.5, requires_grad=True)
        loss_txt, count = clip_loss(img, txt, valid, scale)
        loss_txt.backward()
        result = {
            "cov": target_covariance(target),
            "loss_img": unigrad_loss(pred, target).detach(),
            "loss_txt": loss_txt.detach(),
            "count": count,
            "img_grad": img.grad,
            "scale_grad": scale.grad,
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    target, pred, img, txt, valid = _data()
    img = img.clone().requires_grad_(True)
    scale = torch.tensor(2.5, requires_grad=True)
    single_txt, single_count = clip_loss(img, txt, valid, scale)
    single_txt.backward()
    for r in ranks:
        assert torch.allclose(r["cov"], target_covariance(target), atol=1e-6)
        assert torch.allclose(r["loss_txt"], single_txt.detach(), atol=1e-6)
        assert int(r["count"]) == int(single_count) == 7
    # every rank computes the global loss; DDP's mean of the gathered gradients is the exact gradient
    grads = torch.cat([ranks[0]["img_grad"], ranks[1]["img_grad"]])
    assert torch.allclose(grads / 2, img.grad, atol=1e-6)
    assert torch.allclose((ranks[0]["scale_grad"] + ranks[1]["scale_grad"]) / 2, scale.grad, atol=1e-6)
    # the image loss is a per-rank mean over equal token counts with the global C
    mean_img = (ranks[0]["loss_img"] + ranks[1]["loss_img"]) / 2
    assert torch.allclose(mean_img, unigrad_loss(pred, target), atol=1e-6)
