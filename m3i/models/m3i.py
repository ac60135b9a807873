"""The M3I model: one image encoder, three targets, one forward that returns the loss parts.

    model = build_model(cfg, num_classes=8)
    parts = model(batch)                 # {"loss", "loss_img", "loss_cls", "loss_txt", monitors...}
    parts["loss"].backward(); opt.step()
    model.update_ema(ema_momentum(step, total_steps, cfg.model.ema_m0))
    features = model.encode(images)      # [N, D] pooled embedding of the online encoder

Image->image with ``objective.mix_images`` [paper]: the batch is split in halves; sample
``i`` of the first half (image A) and sample ``i`` of the second half (image B) make one
input, A's v1 on the unmasked patches and B's v1 on the masked ones. The encoder sees the
full mixed input once. A predicts its own view v1 where it is hidden; B predicts its other
view v2 at every v2 patch, placed by v2's geometry in v1. Each image's global embedding is
the pool of its own patches, so the category and text branches get one embedding per
sample from the same forward. An odd sample out has no partner: a blank fills its masked
patches. [choice: halves, blank partner, per-image pooling]

Without mixing it is SiameseIM [sim]: the encoder sees v1's visible patches only and the
predictor predicts all of v2.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from m3i.config import Config
from m3i.losses import clip_loss, combine, feature_std, masked_cross_entropy, unigrad_loss
from m3i.models.ema import EMATarget, ema_momentum
from m3i.models.heads import Predictor, Projector
from m3i.models.pos_embed import grid_positions, view_positions
from m3i.models.registry import create_backbone
from m3i.models.text_encoder import build_text_encoder
from m3i.models.vit import encoder_tokens, pool_tokens, same_image_mask

__all__ = ["M3IModel"]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of each sequence: ``[B, L, C], [B, K] -> [B, K, C]``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class M3IModel(nn.Module):
    """Online encoder -> projector -> predictor, EMA target, class head, text encoder.

    Args:
        cfg: The run config (``model``, ``objective``, ``data.image_size``).
        num_classes: Classes of the category head; ``None`` takes ``cfg.model.num_classes``.
            0 leaves the category branch out.

    Raises:
        ValueError: If no branch is left (only ``use_cls`` on and no classes), or the
            backbone cannot be built.
    """

    def __init__(self, cfg: Config, num_classes: int | None = None) -> None:
        super().__init__()
        m, o = cfg.model, cfg.objective
        self.objective = o
        self.num_classes = m.num_classes if num_classes is None else int(num_classes)
        self.ema_m0 = m.ema_m0
        self.use_img = o.use_img
        self.use_cls = o.use_cls and self.num_classes > 0
        self.use_txt = o.use_txt
        if not (self.use_img or self.use_cls or self.use_txt):
            raise ValueError(
                f"objective.use_cls is the only branch on but num_classes={self.num_classes}; "
                "give model.num_classes > 0 or turn on use_img / use_txt"
            )
        self.mix = o.use_img and o.mix_images

        self.backbone = create_backbone(cfg)
        dim = self.backbone.num_features
        self.grid = tuple(self.backbone.patch_embed.grid_size)
        self.patch_size = m.patch_size
        if self.use_img:
            self.projector = Projector(dim, m.proj_dim, m.projector_depth, m.predictor_heads)
            self.predictor = Predictor(m.proj_dim, m.predictor_depth, m.predictor_heads)
            self.target = EMATarget(self.backbone, self.projector)
            self.register_buffer("grid_pos", grid_positions(self.grid), persistent=False)  # [L, 4]
            self.register_buffer("ema_m", torch.tensor(float(m.ema_m0)))
        if self.use_cls:
            self.cls_head = nn.Linear(dim, self.num_classes)
            nn.init.trunc_normal_(self.cls_head.weight, std=0.02)
            nn.init.zeros_(self.cls_head.bias)
        if self.use_txt:
            self.text_encoder = build_text_encoder(m)  # [N, T] -> [N, text_width]
            self.image_proj = nn.Linear(dim, m.embed_dim, bias=False)
            self.text_proj = nn.Linear(m.text_width, m.embed_dim, bias=False)
            nn.init.normal_(self.image_proj.weight, std=dim**-0.5)
            nn.init.normal_(self.text_proj.weight, std=m.text_width**-0.5)
            # Shape [1], not a 0-d scalar: DeepSpeed's broadcast views every parameter as bytes.
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / o.temperature_init)]))
            self.max_logit_scale = math.log(1.0 / o.temperature_min)
        if getattr(getattr(cfg, "train", None), "zero_stage", 0) == 3:
            self._register_zero3_external_parameters()

    def _register_zero3_external_parameters(self) -> None:
        """Tell ZeRO-3 to gather the ViTs' own tokens and positions for this module's forward.

        :func:`m3i.models.vit.encoder_tokens` reads ``cls_token`` / ``reg_token`` / ``pos_embed``
        without calling the ViT's ``forward``, where ZeRO-3 would otherwise gather them.
        """
        import deepspeed

        backbones = [self.backbone] + ([self.target.backbone] if self.use_img else [])
        for bb in backbones:
            for name in ("cls_token", "reg_token", "pos_embed"):
                param = getattr(bb, name, None)
                if isinstance(param, nn.Parameter):
                    deepspeed.zero.register_external_parameter(self, param)

    # ------------------------------------------------------------------ public helpers

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """Move the EMA target toward the online encoder + projector: ``t = m t + (1 - m) o``."""
        if self.use_img:
            self.target.update(self.backbone, self.projector, momentum)
            self.ema_m.fill_(momentum)

    def ema_step(self, step: int, total_steps: int) -> float:
        """Apply the cosine-scheduled EMA update for ``step`` and return the momentum used."""
        m = ema_momentum(step, total_steps, self.ema_m0)
        self.update_ema(m)
        return m

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled global embedding of the online encoder: ``[N, 3, H, W] -> [N, D]``.

        The same as the exported timm backbone's ``forward_head(forward_features(x), pre_logits=True)``.
        """
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding in the shared image-text space: ``[N, E]``."""
        return F.normalize(self.image_proj(self.encode(images)), dim=-1)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embedding of byte tokens ``[N, T]``: ``[N, E]``."""
        return F.normalize(self.text_proj(self.text_encoder(tokens)), dim=-1)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should not be weight-decayed (positions, tokens, temperature)."""
        names = {
            "backbone.pos_embed",
            "backbone.cls_token",
            "backbone.reg_token",
            "predictor.mask_token",
            "text_encoder.pos_embed",
            "text_encoder.tower.positional_embedding",
            "logit_scale",
        }
        own = {n for n, _ in self.named_parameters()}
        return names & own

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss parts and monitors of one batch.

        Args:
            batch: Collated output of :class:`m3i.transforms.TwoViewTransform`: ``v1`` ``[N, 3, S, S]``,
                ``v2``, ``geom`` ``[N, 5]``, ``mask`` ``[N, L]`` (image branch), ``cls`` ``[N]``,
                ``tokens`` ``[N, T]``, ``has_txt`` ``[N]``.

        Returns:
            ``loss`` (to backpropagate), ``loss_img``, ``loss_cls``, ``loss_txt``, the per-branch sample
            counts ``n_img``, ``n_cls``, ``n_txt`` of this rank, and when the branch is on ``target_std``,
            ``ema_momentum``, ``acc_cls``, ``temperature``. All scalars; all but the losses detached.
        """
        batch = self._in_compute_dtype(batch)
        v1 = batch["v1"]
        n = v1.shape[0]
        zero = v1.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        monitors: dict[str, torch.Tensor] = {}

        if self.use_img:
            emb, pred, tgt = (self._mixed if self.mix else self._masked)(batch)
            parts["loss_img"] = unigrad_loss(pred, tgt, self.objective.unigrad_neg_weight)
            monitors["n_img"] = zero + n
            monitors["target_std"] = feature_std(tgt)
            monitors["ema_momentum"] = self.ema_m.detach().float().clone()
        else:
            emb = pool_tokens(self.backbone, encoder_tokens(self.backbone, v1))  # [N, D]
            parts["loss_img"] = zero
            monitors["n_img"] = zero

        if self.use_cls:
            logits = self.cls_head(emb)  # [N, K]
            loss, count, correct = masked_cross_entropy(logits, batch["cls"], self.objective.label_smoothing)
            parts["loss_cls"] = loss
            monitors["n_cls"] = count
            monitors["acc_cls"] = correct / count.clamp_min(1.0)
        else:
            parts["loss_cls"] = zero
            monitors["n_cls"] = zero

        if self.use_txt:
            parts["loss_txt"], monitors["n_txt"] = self._text(batch, emb)
            monitors["temperature"] = (-self.logit_scale.detach()[0].clamp(max=self.max_logit_scale)).exp()
        else:
            parts["loss_txt"] = zero
            monitors["n_txt"] = zero

        out = {"loss": combine(parts, self.objective), **parts}
        out.update({k: v.detach().float() for k, v in monitors.items()})
        return out

    def compute_dtype(self) -> torch.dtype:
        """The dtype the encoder's weights hold: float32, or bf16/fp16 inside a DeepSpeed bf16/fp16 engine."""
        return self.backbone.patch_embed.proj.weight.dtype

    def _in_compute_dtype(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` with the views in :meth:`compute_dtype`; everything else as given.

        DeepSpeed runs a bf16/fp16 module without autocast (on CUDA it even turns an outer
        autocast off), so no float32 input may reach a low-precision weight. The geometry
        stays as given: positions are computed in float32 (see :class:`Predictor`).
        """
        dtype = self.compute_dtype()
        views = {k: batch[k].to(dtype) for k in ("v1", "v2") if k in batch and batch[k].is_floating_point() and batch[k].dtype != dtype}
        return {**batch, **views} if views else batch

    # ------------------------------------------------------------------ branches

    def _mask(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mask = batch["mask"].bool()  # [N, L]
        counts = mask.sum(dim=1)
        k = int(counts[0]) if mask.shape[0] else 0
        if mask.shape[1] != self.grid[0] * self.grid[1] or bool((counts != k).any()):
            raise ValueError(
                f"batch['mask'] must be [N, {self.grid[0] * self.grid[1]}] with the same masked count per row; "
                f"got shape {tuple(mask.shape)} and counts {counts.tolist()}"
            )
        return mask, k

    def _masked(self, batch: dict[str, torch.Tensor]):
        """SiameseIM: visible patches of v1 -> all patches of v2. Returns (emb [N, D], pred, target [M, Dp])."""
        v1, v2, geom = batch["v1"], batch["v2"], batch["geom"]
        mask, k = self._mask(batch)
        num = mask.shape[1]
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first
        vis = order[:, : num - k]  # [N, L-k]
        z = encoder_tokens(self.backbone, v1, keep=vis)  # [N, P+L-k, D]
        emb = pool_tokens(self.backbone, z)  # [N, D]
        z = z[:, self.backbone.num_prefix_tokens :]  # [N, L-k, D]
        pred = self.predictor(self.projector(z), self.grid_pos[vis], view_positions(geom, self.grid))  # [N, L, Dp]
        tgt = self.target(v2)  # [N, L, Dp]
        return emb, pred.flatten(0, 1), tgt.flatten(0, 1)

    def _mixed(self, batch: dict[str, torch.Tensor]):
        """M3I mixing: A = first half, B = second half. Returns (emb [N, D], pred, target [M, Dp])."""
        v1, v2, geom = batch["v1"], batch["v2"], batch["geom"]
        mask, k = self._mask(batch)
        n, num = mask.shape
        p = (n + 1) // 2  # mixed inputs (= A images)
        pb = n - p  # B images (p or p - 1)
        m_a = mask[:p]  # [p, L]: True where B's patch is shown
        b_img = v1[p:]
        if pb < p:
            b_img = torch.cat([b_img, torch.zeros_like(v1[:1])])
        ps = self.patch_size
        px = m_a.view(p, 1, *self.grid).repeat_interleave(ps, dim=2).repeat_interleave(ps, dim=3)  # [p, 1, H, W]
        x = torch.where(px, b_img, v1[:p])  # [p, 3, H, W]

        attn = same_image_mask(m_a.long(), self.backbone.num_prefix_tokens) if self.objective.mix_attention == "separate" else None
        z = encoder_tokens(self.backbone, x, attn_mask=attn)  # [p, P+L, D]
        emb = torch.cat([pool_tokens(self.backbone, z, ~m_a), pool_tokens(self.backbone, z[:pb], m_a[:pb])])  # [N, D]
        z = z[:, self.backbone.num_prefix_tokens :]  # [p, L, D]
        h = self.projector(z)  # [p, L, Dp]

        order = torch.argsort(m_a.to(torch.int8), dim=1, stable=True)
        vis_a, hid_a = order[:, : num - k], order[:, num - k :]  # [p, L-k], [p, k]
        tgt_all = self.target(torch.cat([v1[:p], v2[p:]]))  # [N, L, Dp]: A's v1, B's v2
        # A: its own view v1, at the patches B covers (intra-view).
        pred_a = self.predictor(_take(h, vis_a), self.grid_pos[vis_a], self.grid_pos[hid_a])  # [p, k, Dp]
        preds, tgts = [pred_a.flatten(0, 1)], [_take(tgt_all[:p], hid_a).flatten(0, 1)]
        if pb:
            # B: its other view v2, every patch, placed by v2's geometry in v1 (inter-view).
            vis_b = hid_a[:pb]  # [pb, k]
            q_b = view_positions(geom[p:], self.grid)  # [pb, L, 4]
            pred_b = self.predictor(_take(h[:pb], vis_b), self.grid_pos[vis_b], q_b)  # [pb, L, Dp]
            preds.append(pred_b.flatten(0, 1))
            tgts.append(tgt_all[p:].flatten(0, 1))
        return emb, torch.cat(preds), torch.cat(tgts)

    def _text(self, batch: dict[str, torch.Tensor], emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE of the captioned samples; the text encoder runs on those alone."""
        has = batch["has_txt"].bool()  # [N]
        idx = has.nonzero().squeeze(1)  # [n_t]
        feats = self.text_proj(self.text_encoder(batch["tokens"][idx]))  # [n_t, E]
        text = feats.new_zeros(emb.shape[0], feats.shape[-1]).index_copy(0, idx, feats)  # [N, E]
        image = self.image_proj(emb)  # [N, E]
        scale = self.logit_scale[0].clamp(max=self.max_logit_scale)
        loss, _ = clip_loss(image, text, has, scale)
        return loss, has.sum().float()
