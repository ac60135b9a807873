"""Config sections of the data plane: ``shard`` (raw images -> shards) and ``data`` (loader)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from m3i.config.core import MAX_BATCH, MAX_COUNT, check_choice, check_range

__all__ = ["INPUT_KINDS", "ShardConfig", "DataConfig", "input_values"]

INPUT_KINDS = ("labelled", "captions", "unlabelled", "eval_labelled", "webdataset")
"""The kinds of raw input of ``shard``: its fields, the pipeline's parameters and (``-`` for ``_``) the flags."""


def input_values(given: Mapping[str, Sequence[str] | None], *, keep: Collection[str] = ()) -> dict[str, list[str]]:
    """``{"shard.<kind>": paths}`` for raw inputs that are the whole input.

    The one rule wherever inputs are given (``m3i shard``'s flags, the pipeline's parameters, the
    ablation's data): a kind not given is empty, so a preset's or config file's own paths (the
    demo's) are never mixed in. Kinds in ``keep`` that are not given are left out instead (their
    value stays as set elsewhere: ``m3i shard`` keeps what ``--set shard.<kind>=...`` gave).

    Raises:
        ValueError: A kind that is not one of :data:`INPUT_KINDS`.
    """
    unknown = set(given) - set(INPUT_KINDS)
    if unknown:
        raise ValueError(f"sources has kinds {sorted(unknown)}; allowed kinds are {list(INPUT_KINDS)}")
    return {f"shard.{k}": list(given.get(k) or []) for k in INPUT_KINDS if given.get(k) or k not in keep}


@dataclass(frozen=True)
class ShardConfig:
    """How ``m3i shard`` turns raw images into WebDataset shards."""

    out: str = "m3i-data/shards"
    """Where shards and ``index.json`` go: a local path, ``file://...`` or ``s3://bucket/prefix``."""

    labelled: tuple[str, ...] = ()
    """Folders of class sub-folders (``root/<class>/<image>``): the labelled source."""

    captions: tuple[str, ...] = ()
    """JSONL or CSV files of ``image`` (path, relative to the file) and ``caption``: the image-text source."""

    unlabelled: tuple[str, ...] = ()
    """Folders of images without labels (searched recursively): the unlabelled source."""

    eval_labelled: tuple[str, ...] = ()
    """Folders of class sub-folders kept whole as the held-out ``eval`` split."""

    webdataset: tuple[str, ...] = ()
    """Existing WebDataset tars (local or ``s3://``, brace patterns like ``data-{00000..00099}.tar``): samples
    with a ``cls`` member are labelled, else with ``txt`` (or a ``json`` ``caption``) captioned, else unlabelled."""

    allow_outside_paths: bool = False
    """Let a caption file name images outside its own folder (``../x.jpg``, absolute paths); off, they are bad inputs."""

    lock_stale_seconds: int = 600
    """A run holds ``_lock.json`` in ``out`` and refreshes it; another run refuses the output until the lock
    is this many seconds old without a refresh (its owner died), then takes it over."""

    eval_fraction: float = 0.0
    """Fraction of each class of ``labelled`` moved to the ``eval`` split (0 keeps all for training)."""

    max_samples_per_shard: int = 1000
    """A shard holds at most this many samples."""

    max_bytes_per_shard: int = 256 * 1024 * 1024
    """A shard holds at most this many bytes of sample data (a single larger sample gets a shard of its own)."""

    resize: int | None = None
    """Resize so the shorter side is at most this many pixels (``None`` keeps the size)."""

    reencode: bool = False
    """Re-encode JPEG inputs too (other formats are always encoded to JPEG)."""

    jpeg_quality: int = 90
    """JPEG quality for images that are (re-)encoded."""

    workers: int = 0
    """Worker processes that encode shards; 0 uses every core."""

    max_bad_fraction: float = 0.01
    """Fail the run when more than this fraction of inputs is unreadable or malformed."""

    max_input_bytes: int = 256 * 1024 * 1024
    """Largest input read: an image file or tar member larger than this (by its size on disk or the size its
    tar header declares) is a bad input, refused before a byte of it is read."""

    seed: int = 0
    """Seed of the eval split and of the order in which inputs are sharded."""

    def __post_init__(self) -> None:
        s = "shard"
        if not self.out:
            raise ValueError("shard.out='' is not allowed; give a local path or s3://bucket/prefix")
        check_range(s, "eval_fraction", self.eval_fraction, 0.0, 1.0, hi_open=True)
        check_range(s, "max_samples_per_shard", self.max_samples_per_shard, 1, MAX_COUNT)
        check_range(s, "max_bytes_per_shard", self.max_bytes_per_shard, 1024, 2**40)
        if self.resize is not None:
            check_range(s, "resize", self.resize, 8, 8192)
        check_range(s, "jpeg_quality", self.jpeg_quality, 1, 100)
        check_range(s, "workers", self.workers, 0, 1024)
        check_range(s, "max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        check_range(s, "max_input_bytes", self.max_input_bytes, 1024, 2**40)
        check_range(s, "lock_stale_seconds", self.lock_stale_seconds, 30, MAX_COUNT)


@dataclass(frozen=True)
class DataConfig:
    """How the loader streams shards into batches."""

    shards: str = "m3i-data/shards"
    """The data set written by ``m3i shard``: the folder or ``s3://`` prefix holding ``index.json``."""

    split: str = "train"
    """Which split of the index to read (``train`` or ``eval``)."""

    image_size: int = 224
    """Side of the square crops fed to the model."""

    batch_size: int = 64
    """Samples per batch on each rank (the micro-batch)."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0 reads in the main process)."""

    seed: int = 0
    """Seed of the shuffle; the order is a function of (seed, epoch) alone."""

    shuffle: bool = True
    """Shuffle shard order and samples within shards each epoch."""

    shuffle_buffer: int = 512
    """Samples in the within-shard shuffle buffer (larger mixes better, costs memory)."""

    verify_checksums: bool = False
    """Check each shard's sha256 against the index before reading it (reads a shard into memory first)."""

    sources: tuple[str, ...] = ("labelled", "captioned", "unlabelled")
    """Which sources of the split to read."""

    def __post_init__(self) -> None:
        s = "data"
        if not self.shards:
            raise ValueError("data.shards='' is not allowed; give the folder or s3:// prefix with index.json")
        check_choice(s, "split", self.split, ("train", "eval"))
        check_range(s, "image_size", self.image_size, 16, 4096)
        check_range(s, "batch_size", self.batch_size, 1, MAX_BATCH)
        check_range(s, "num_workers", self.num_workers, 0, 64)
        check_range(s, "shuffle_buffer", self.shuffle_buffer, 1, 2**24)
        if not self.sources:
            raise ValueError("data.sources=() is empty; choose from ['labelled', 'captioned', 'unlabelled']")
        for src in self.sources:
            check_choice(s, "sources", src, ("labelled", "captioned", "unlabelled"))
