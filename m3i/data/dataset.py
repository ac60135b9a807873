"""The shard stream: an IterableDataset that reads its slice of the epoch plan."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import signal
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from m3i.data.gopen import open_url
from m3i.data.plan import EpochPlan, derive_seed
from m3i.shard.index import ShardInfo

__all__ = ["ShardStream", "decode_sample", "Counters"]

log = logging.getLogger(__name__)


class Counters:
    """Process-shared counters of what went wrong, visible from the main process."""

    NAMES = ("shards_failed", "samples_failed", "samples_padded")

    def __init__(self) -> None:
        ctx = mp.get_context()
        self._values = {n: ctx.Value("q", 0) for n in self.NAMES}

    def add(self, name: str, n: int = 1) -> None:
        v = self._values[name]
        with v.get_lock():
            v.value += n

    def snapshot(self) -> dict[str, int]:
        return {n: int(v.value) for n, v in self._values.items()}


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> ``{"image": PIL RGB, "cls": int, "txt": str, "source": str, "key": str}``.

    Raises:
        ValueError or OSError: When the image does not decode or a field is malformed.
    """
    if "jpg" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} has no jpg member")
    with Image.open(io.BytesIO(raw["jpg"])) as img:
        image = img.convert("RGB")
    meta = json.loads(raw["json"]) if "json" in raw else {}
    return {
        "image": image,
        "cls": int(raw["cls"]) if "cls" in raw else -1,
        "txt": raw["txt"].decode("utf-8") if "txt" in raw else "",
        "source": meta.get("source", "unlabelled"),
        "key": raw["__key__"],
    }


def _iter_tar(url: str, expected_sha: str | None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar, through webdataset's tar iterators."""
    with open_url(url) as stream:
        if expected_sha is not None:
            data = stream.read()
            sha = hashlib.sha256(data).hexdigest()
            if sha != expected_sha:
                raise OSError(f"{url}: sha256 {sha[:12]}... does not match the index ({expected_sha[:12]}...)")
            stream = io.BytesIO(data)
        files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
        yield from wds.tariterators.group_by_keys(files)


class ShardStream(IterableDataset):
    """Batches of one rank for one epoch, split among DataLoader workers by the plan.

    Failures never change the number of batches: a shard that does not read (missing,
    truncated, checksum mismatch) or a sample that does not decode is skipped and
    counted, and its places are filled with copies of recently read good samples.

    Args:
        base_uri: Data set root (folder or ``s3://`` prefix) that the shard keys hang under.
        plan: This epoch's plan.
        rank: This process's rank.
        epoch: The epoch (part of the per-sample random seed).
        seed: The run's data seed.
        sources: The sources read; other samples are passed over.
        transform: ``transform(sample, generator) -> dict`` (see ``m3i.data.ImageTransform``).
        consumed: Batches of this rank already consumed (resume point).
        shuffle_buffer: Size of the in-shard shuffle buffer (1 = tar order).
        verify: Check each shard's sha256 before reading it.
        counters: Shared failure counters.
    """

    def __init__(
        self,
        base_uri: str,
        plan: EpochPlan,
        *,
        rank: int,
        epoch: int,
        seed: int,
        sources: tuple[str, ...],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]],
        consumed: int,
        shuffle_buffer: int,
        verify: bool,
        counters: Counters,
        collate: Callable = default_collate,
    ) -> None:
        self.base_uri = base_uri.rstrip("/")
        self.plan, self.rank, self.epoch, self.seed = plan, rank, epoch, seed
        self.sources = set(sources)
        self.transform, self.consumed = transform, consumed
        self.shuffle_buffer, self.verify = shuffle_buffer, verify
        self.counters, self.collate = counters, collate

    def _shard_samples(self, shard: ShardInfo) -> Iterator[dict[str, Any]]:
        """The shard's selected raw samples in this epoch's order (seeded shuffle buffer)."""
        url = f"{self.base_uri}/{shard.key}"
        rng = np.random.default_rng(derive_seed("buffer", self.seed, self.epoch, shard.key))
        buf: list[dict[str, Any]] = []
        expected = sum(n for src, n in shard.sources.items() if src in self.sources)
        seen = 0
        try:
            for raw in _iter_tar(url, shard.sha256 if self.verify else None):
                src = json.loads(raw["json"]).get("source") if "json" in raw else "unlabelled"
                if src not in self.sources:
                    continue
                seen += 1
                if len(buf) < self.shuffle_buffer:
                    buf.append(raw)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], raw = raw, buf[j]
                yield raw
        except Exception as e:  # noqa: BLE001 - any read failure of a shard is survivable
            self.counters.add("shards_failed")
            log.warning("skipping the rest of shard %s: %s: %s", url, type(e).__name__, e)
        else:
            if seen < expected:  # a tar cut short can end "cleanly" at a member boundary
                self.counters.add("shards_failed")
                log.warning("shard %s ended after %d of %d samples (truncated?)", url, seen, expected)
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _raw_range(self, start: int, count: int) -> Iterator[dict[str, Any] | None]:
        """``count`` raw samples from global position ``start``; ``None`` where one is missing."""
        end, pos, emitted = start + count, 0, 0
        for shard, n in zip(self.plan.shards, self.plan.counts):
            lo, hi = max(start, pos), min(end, pos + n)
            if lo < hi:
                got = 0
                for i, raw in enumerate(self._shard_samples(shard)):
                    if i >= hi - pos:
                        break
                    if i >= lo - pos:
                        got += 1
                        yield raw
                for _ in range(hi - lo - got):  # the shard held fewer samples than its index says
                    yield None
                emitted += hi - lo
            pos += n
            if pos >= end:
                break
        for _ in range(count - emitted):
            yield None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is not None:
            # torchrun and Kubernetes signal the whole process group on shutdown; the main
            # process turns SIGTERM into a checkpoint and then stops its workers itself.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The DataLoader starts each iteration at its worker 0, but after a resume at
        # batch k the next batch belongs to plan worker k % W: rotate the mapping.
        w = max(1, self.plan.num_workers)
        worker = ((info.id if info is not None else 0) + self.consumed) % w
        wr = self.plan.worker_range(self.rank, worker, self.consumed)
        bs = self.plan.batch_size
        first = wr.start + wr.skip_batches * bs
        todo = (wr.batches - wr.skip_batches) * bs
        recent: deque[dict[str, Any]] = deque(maxlen=bs)
        batch: list[dict[str, Any]] = []
        pending_pads = 0
        for raw in self._raw_range(first, todo):
            sample = None
            if raw is not None:
                try:
                    sample = self._prepare(raw)
                except Exception as e:  # noqa: BLE001 - a bad sample is skipped, counted
                    self.counters.add("samples_failed")
                    log.warning("skipping sample %s: %s: %s", raw.get("__key__"), type(e).__name__, e)
            if sample is None:
                if not recent:
                    pending_pads += 1  # no good sample yet: pad once one arrives
                    continue
                sample = recent[len(batch) % len(recent)]
                self.counters.add("samples_padded")
            else:
                recent.append(sample)
                while pending_pads and len(batch) < bs:
                    batch.append(sample)
                    pending_pads -= 1
                    self.counters.add("samples_padded")
                    if len(batch) == bs:
                        yield self.collate(batch)
                        batch = []
            batch.append(sample)
            if len(batch) == bs:
                yield self.collate(batch)
                batch = []
        if pending_pads or batch:
            raise RuntimeError(
                f"rank {self.rank} worker {worker}: no readable sample in its part of epoch {self.epoch} "
                f"of {self.base_uri}; every shard it reads failed"
            )

    def _prepare(self, raw: dict[str, Any]) -> Any:
        sample = decode_sample(raw)
        gen = torch.Generator().manual_seed(derive_seed("sample", self.seed, self.epoch, sample["key"]))
        return self.transform(sample, gen)
