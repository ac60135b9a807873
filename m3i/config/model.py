"""Config sections of the learner: ``model`` (networks) and ``objective`` (targets, losses, views).

Tags in the docstrings say where a default comes from: [paper] M3I (Su et al., CVPR 2023),
[sim] SiameseIM (Tao et al., arXiv 2206.01204) whose code M3I's image branch follows,
[choice] this reference implementation's own pick where the paper leaves it open.
"""

from __future__ import annotations

from dataclasses import dataclass

from m3i.config.core import MAX_COUNT, MAX_WIDTH, check_choice, check_positive, check_range

__all__ = ["GLOBAL_POOLS", "TEXT_ENCODERS", "ModelConfig", "ObjectiveConfig"]

GLOBAL_POOLS = ("avg", "max", "avgmax", "token")
"""Pooling of the image encoder (timm's ``global_pool`` values that m3i supports)."""

TEXT_ENCODERS = ("open_clip", "byte")
"""Tokenizer + text tower pairs of the image->text branch (``model.text_encoder``)."""


@dataclass(frozen=True)
class ModelConfig:
    """The networks: one timm ViT image encoder, projector, predictor, EMA target, heads."""

    backbone: str = "vit_base_patch16_224"
    """Image encoder: a registered M3I variant (``m3i_vit_tiny``, ``m3i_vit_small``, ``m3i_vit_base``, ...)
    or any timm VisionTransformer name; built without pretrained weights. [choice]"""

    patch_size: int = 16
    """Side of a ViT patch in pixels; ``data.image_size`` must be a multiple of it."""

    global_pool: str = "avg"
    """How the encoder's tokens become one embedding, as timm's ``global_pool``: ``avg`` (mean of
    patch tokens), ``max`` (per-channel max of patch tokens), ``avgmax`` (half of each) or ``token``
    (the class token; needs ``objective.mix_images=false``, since a mixed input holds two images).
    The export carries it to timm. [sim: avg, as MAE/SiameseIM fine-tuning; ``max`` learns far faster
    on small data from scratch, measured in docs/ablation.md]"""

    drop_path: float = 0.0
    """Stochastic depth rate of the online encoder (the EMA target never drops). [sim: 0]"""

    proj_dim: int = 768
    """Width of the projector output, the predictor and the dense image targets.
    [sim: ``--decoder_embed_dim 768`` in the ViT-B/16 pre-training script; the argparse default is 512]"""

    projector_depth: int = 2
    """Transformer blocks after the projector's linear map (shared by the EMA target).
    [sim: ``--projector_depth 2``, main_pretrain.py]"""

    predictor_depth: int = 4
    """Transformer blocks of the predictor. [sim: 4]"""

    predictor_heads: int = 16
    """Attention heads of the projector and predictor blocks; must divide ``proj_dim``. [sim: 16]"""

    embed_dim: int = 512
    """Dimension of the shared image-text embedding space. [choice: CLIP ViT-B]"""

    text_encoder: str = "open_clip"
    """The image->text branch's tokenizer and text tower: ``open_clip`` (open_clip's CLIP BPE tokenizer,
    vocabulary shipped in its wheel, and its ``TextTransformer``: causal, pooled at the end-of-text
    token, trained from scratch) or ``byte`` (m3i's UTF-8 byte tokenizer and bidirectional encoder
    pooled at ``[CLS]``, for tiny demo models). [choice: open_clip, the field's reference CLIP text
    transformer and tokenizer]"""

    text_width: int = 768
    """Width of the trainable text encoder. [paper: 12-layer BERT-Base-sized text encoder, width 768]"""

    text_depth: int = 12
    """Transformer blocks of the text encoder. [paper: 12, BERT-Base size]"""

    text_heads: int = 12
    """Attention heads of the text encoder; must divide ``text_width``. [paper: 12, BERT-Base size]"""

    text_max_len: int = 77
    """Tokens per caption, start and end tokens included (the text tower's positions); longer captions
    are cut and keep their end token. ``open_clip``: BPE tokens; any length works as the tower is trained
    from scratch. ``byte``: UTF-8 bytes, about one per character, so captions need more (the demo sets 96).
    [choice: CLIP's 77]"""

    num_classes: int = 0
    """Classes of the image->category head; 0 takes the count from the data index at train time."""

    ema_m0: float = 0.995
    """EMA momentum at step 0; a cosine schedule takes it to 1 at the last step. [sim: 0.995; 0.99 for short runs]"""

    def __post_init__(self) -> None:
        s = "model"
        if not self.backbone:
            raise ValueError("model.backbone='' is not allowed; give a timm ViT name or an m3i_vit_* variant")
        check_range(s, "patch_size", self.patch_size, 2, 64)
        check_choice(s, "global_pool", self.global_pool, GLOBAL_POOLS)
        check_range(s, "drop_path", self.drop_path, 0.0, 1.0, hi_open=True)
        check_range(s, "proj_dim", self.proj_dim, 8, MAX_WIDTH)
        check_range(s, "projector_depth", self.projector_depth, 0, 24)
        check_range(s, "predictor_depth", self.predictor_depth, 1, 24)
        check_range(s, "predictor_heads", self.predictor_heads, 1, MAX_WIDTH)
        if self.proj_dim % 4:
            raise ValueError(f"model.proj_dim={self.proj_dim} must be a multiple of 4 (sin-cos position features)")
        if self.proj_dim % self.predictor_heads:
            raise ValueError(
                f"model.predictor_heads={self.predictor_heads} must divide model.proj_dim={self.proj_dim}"
            )
        check_range(s, "embed_dim", self.embed_dim, 1, MAX_WIDTH)
        check_choice(s, "text_encoder", self.text_encoder, TEXT_ENCODERS)
        check_range(s, "text_width", self.text_width, 8, MAX_WIDTH)
        check_range(s, "text_depth", self.text_depth, 1, 48)
        check_range(s, "text_heads", self.text_heads, 1, MAX_WIDTH)
        if self.text_width % self.text_heads:
            raise ValueError(f"model.text_heads={self.text_heads} must divide model.text_width={self.text_width}")
        check_range(s, "text_max_len", self.text_max_len, 4, 4096)
        check_range(s, "num_classes", self.num_classes, 0, 2**24)
        check_range(s, "ema_m0", self.ema_m0, 0.0, 1.0)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What is predicted from what: the three branches, their weights, masking, mixing and views."""

    use_img: bool = True
    """Train the image->image branch (masked view -> EMA dense targets). [paper]"""

    use_cls: bool = True
    """Train the image->category branch on labelled samples. [paper]"""

    use_txt: bool = True
    """Train the image->text branch on captioned samples. [paper]"""

    w_img: float = 1.0
    """Weight of the image->image loss. [choice]"""

    w_cls: float = 1.0
    """Weight of the image->category loss. [choice]"""

    w_txt: float = 1.0
    """Weight of the image->text loss. [choice]"""

    mask_ratio: float = 0.6
    """Fraction of v1's patches masked block-wise (with mixing: given to the partner image). [sim: 118/196]"""

    mix_attention: str = "joint"
    """With ``mix_images``: ``joint`` lets every patch of a mixed input attend to both images;
    ``separate`` keeps each image's patches to its own (as MixMIM's masked self-attention), so
    neither image's embedding sees the other. [choice]"""

    mask_min_block: int = 16
    """Fewest patches in one masked block (capped at the masked count on small grids). [sim/BEiT: 16]"""

    mix_images: bool = True
    """Mix two images into one input: A keeps a block-wise share ``mix_keep`` of its v1's patches and
    predicts its own view v1 where it is hidden, B fills the rest and predicts its other view v2. [paper]"""

    mix_keep: float = 0.4
    """With ``mix_images``: the share of the input's patches that image A keeps (B gets the rest,
    block-wise, replacing ``mask_ratio``). [choice: the paper gives no split; 0.4 is SiameseIM's
    visible share, 1 - 118/196]"""

    unigrad_neg_weight: float = 0.02
    """Weight of the ``p^T C p`` term of the UniGrad image loss. [sim: 0.02]"""

    label_smoothing: float = 0.0
    """Label smoothing of the image->category cross-entropy. [choice]"""

    temperature_init: float = 0.07
    """Initial softmax temperature of the image->text InfoNCE (learned). [choice: CLIP]"""

    temperature_min: float = 0.01
    """Floor of the learned temperature (logit scale at most 1/this). [choice: CLIP's 100]"""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of each random resized crop. [sim: ``--crop_min 0.08`` in the ViT-B/16
    pre-training script]"""

    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of each random resized crop. [sim]"""

    flip_prob: float = 0.5
    """Probability of a horizontal flip of each view. [sim]"""

    color_jitter: float = 0.4
    """Brightness/contrast strength of colour jitter (saturation half of it, hue a quarter); 0 turns it off. [sim]"""

    color_jitter_prob: float = 0.8
    """Probability that a view gets colour jitter. [sim]"""

    grayscale_prob: float = 0.2
    """Probability that a view is turned grey. [sim]"""

    blur_prob: tuple[float, float] = (1.0, 0.1)
    """Probability of Gaussian blur for (v1, v2); sigma 0.1-2.0 at 224 px, scaled with the image size. [sim]"""

    solarize_prob: tuple[float, float] = (0.0, 0.2)
    """Probability of solarisation for (v1, v2). [sim]"""

    def __post_init__(self) -> None:
        s = "objective"
        if not (self.use_img or self.use_cls or self.use_txt):
            raise ValueError(
                "objective.use_img, use_cls and use_txt are all false; turn on at least one branch"
            )
        for name in ("w_img", "w_cls", "w_txt", "unigrad_neg_weight"):
            check_range(s, name, getattr(self, name), 0.0)
        check_range(s, "mask_ratio", self.mask_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range(s, "mix_keep", self.mix_keep, 0.0, 1.0, lo_open=True, hi_open=True)
        check_choice(s, "mix_attention", self.mix_attention, ("joint", "separate"))
        check_range(s, "mask_min_block", self.mask_min_block, 1, MAX_COUNT)
        check_range(s, "label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_positive(s, "temperature_init", self.temperature_init)
        check_positive(s, "temperature_min", self.temperature_min)
        if self.temperature_min > self.temperature_init:
            raise ValueError(
                f"objective.temperature_min={self.temperature_min} is above "
                f"objective.temperature_init={self.temperature_init}; allowed min <= init"
            )
        self._check_pair("crop_scale", self.crop_scale, 0.0, 1.0, lo_open=True)
        self._check_pair("crop_ratio", self.crop_ratio, 0.0, None, lo_open=True)
        check_range(s, "flip_prob", self.flip_prob, 0.0, 1.0)
        check_range(s, "color_jitter", self.color_jitter, 0.0, 1.0)
        for name in ("color_jitter_prob", "grayscale_prob"):
            check_range(s, name, getattr(self, name), 0.0, 1.0)
        for name in ("blur_prob", "solarize_prob"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"objective.{name}={value!r} must hold two probabilities, for v1 and v2")
            for p in value:
                check_range(s, name, p, 0.0, 1.0)

    @staticmethod
    def _check_pair(name: str, value: tuple[float, ...], lo: float, hi: float | None, *, lo_open: bool) -> None:
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"objective.{name}={value!r} must be two numbers (low, high) with low <= high")
        for v in value:
            check_range("objective", name, v, lo, hi, lo_open=lo_open)
