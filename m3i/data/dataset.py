"""The shard stream: an IterableDataset that reads its slice of the epoch plan."""

from __future__ import annotations

import functools
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
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from m3i.artifacts.dataset import ShardInfo
from m3i.data.gopen import open_url
from m3i.data.plan import EpochPlan, derive_seed
from m3i.data.tarstream import iter_samples

__all__ = ["ShardStream", "decode_sample", "decode_image", "preload_decoders", "Counters", "Position"]

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


class Position:
    """Where the next pass over a :class:`ShardStream` starts: ``(epoch, batches consumed)``.

    Shared with the DataLoader's persistent workers: the main process sets it before each
    ``iter()`` of the DataLoader, and every worker reads it when its pass starts. Only the
    main process writes, and only while no pass is running, so it needs no lock.
    """

    def __init__(self) -> None:
        ctx = mp.get_context()
        self._epoch = ctx.RawValue("q", 0)
        self._consumed = ctx.RawValue("q", 0)

    def set(self, epoch: int, consumed: int) -> None:
        self._epoch.value, self._consumed.value = epoch, consumed

    def get(self) -> tuple[int, int]:
        return int(self._epoch.value), int(self._consumed.value)


def _load_jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's libjpeg-turbo decoder, or ``None`` where this torchvision lacks it.

    torchvision 0.29 deprecates its image codecs in favour of TorchCodec; while the pinned
    version has them they are used, and a torchvision without them leaves decoding to PIL.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, AttributeError):
        return None
    public = functools.partial(decode_jpeg, mode=ImageReadMode.UNCHANGED)
    # The op behind decode_jpeg, without the wrapper's per-call deprecation warning, usage
    # logging and checks (a quarter of the call for a small image); used only where it
    # answers a probe image exactly like the wrapper.
    op = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)
    if op is None:
        return public
    mode = ImageReadMode.UNCHANGED.value

    def direct(data: torch.Tensor) -> torch.Tensor:
        return op(data, mode, False)

    try:
        buf = io.BytesIO()
        Image.new("RGB", (3, 2), (200, 30, 90)).save(buf, format="JPEG")
        probe = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        if torch.equal(direct(probe), public(probe)):
            return direct
    except Exception:  # noqa: BLE001 - another torchvision's op: keep to its public wrapper
        pass
    return public


_jpeg_decoder: Callable[[torch.Tensor], torch.Tensor] | None | bool = False  # False: not looked up yet


def preload_decoders() -> None:
    """Import the JPEG decoder now, so that DataLoader workers forked afterwards inherit it.

    Importing torchvision costs about a second of CPU: paid once here rather than in
    every worker.
    """
    global _jpeg_decoder
    if _jpeg_decoder is False:
        _jpeg_decoder = _load_jpeg_decoder()


def decode_image(data: bytes) -> Image.Image:
    """An encoded image as a PIL RGB image.

    Three-channel JPEGs (what ``m3i shard`` writes) are decoded by libjpeg-turbo through
    ``torchvision.io.decode_jpeg``: the same pixels as ``PIL.Image.open(...).convert("RGB")``
    without PIL's marker parsing in Python, which is half the cost of a small image. Anything
    else (grayscale or CMYK JPEGs, other formats, data torchvision refuses) goes through PIL,
    which also raises the usual errors for undecodable data.

    Raises:
        OSError or ValueError: When the image does not decode.
    """
    if data[:3] == b"\xff\xd8\xff":
        if _jpeg_decoder is False:
            preload_decoders()
        chw = None
        if _jpeg_decoder is not None:
            try:
                chw = _jpeg_decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # [C, H, W], a view of HWC
            except RuntimeError:
                chw = None  # PIL decides below, and words the error
        if chw is not None and chw.ndim == 3 and chw.shape[0] == 3:
            h, w = chw.shape[1], chw.shape[2]
            return Image.frombuffer("RGB", (w, h), chw.permute(1, 2, 0).contiguous().numpy(), "raw", "RGB", 0, 1)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> ``{"image": PIL RGB, "cls": int, "txt": str, "source": str, "key": str}``.

    Raises:
        ValueError or OSError: When the image does not decode or a field is malformed.
    """
    if "jpg" not in raw:
        raise ValueError(f"sample {raw.get('__key__')!r} has no jpg member")
    image = decode_image(raw["jpg"])
    source = raw.get("__source__")  # set by ShardStream, which parsed the json already
    if source is None:
        source = (json.loads(raw["json"]) if "json" in raw else {}).get("source", "unlabelled")
    return {
        "image": image,
        "cls": int(raw["cls"]) if "cls" in raw else -1,
        "txt": raw["txt"].decode("utf-8") if "txt" in raw else "",
        "source": source,
        "key": raw["__key__"],
    }


def _iter_tar(url: str, expected_sha: str | None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (see :func:`m3i.data.tarstream.iter_samples`)."""
    with open_url(url) as stream:
        if expected_sha is not None:
            data = stream.read()
            sha = hashlib.sha256(data).hexdigest()
            if sha != expected_sha:
                raise OSError(f"{url}: sha256 {sha[:12]}... does not match the index ({expected_sha[:12]}...)")
            stream = io.BytesIO(data)
        yield from iter_samples(stream, url)


class ShardStream(IterableDataset):
    """Batches of one rank, split among DataLoader workers by the epoch plan.

    One object serves every epoch: each pass (each ``iter()``) reads the epoch and the
    resume point from ``position``, so DataLoader workers can stay alive from one epoch
    to the next.

    Failures never change the number of batches: a shard that does not read (missing,
    truncated, checksum mismatch) or a sample that does not decode is skipped and
    counted, and its places are filled with copies of recently read good samples.

    Args:
        base_uri: Data set root (folder or ``s3://`` prefix) that the shard keys hang under.
        planner: ``planner(epoch=e)`` is epoch ``e``'s plan (picklable, for spawned workers).
        position: Epoch and batches of this rank already consumed when a pass starts.
        rank: This process's rank.
        seed: The run's data seed.
        sources: The sources read; other samples are passed over.
        transform: ``transform(sample, generator) -> dict`` (see ``m3i.data.ImageTransform``);
            the generator is seeded per sample and only valid during the call.
        shuffle_buffer: Size of the in-shard shuffle buffer (1 = tar order).
        verify: Check each shard's sha256 before reading it.
        counters: Shared failure counters.
        collate: Turns a list of transformed samples into a batch.
    """

    def __init__(
        self,
        base_uri: str,
        planner: Callable[..., EpochPlan],
        position: Position,
        *,
        rank: int,
        seed: int,
        sources: tuple[str, ...],
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]],
        shuffle_buffer: int,
        verify: bool,
        counters: Counters,
        collate: Callable = default_collate,
    ) -> None:
        self.base_uri = base_uri.rstrip("/")
        self.planner, self.position = planner, position
        self.rank, self.seed = rank, seed
        self.sources = set(sources)
        self.transform = transform
        self.shuffle_buffer, self.verify = shuffle_buffer, verify
        self.counters, self.collate = counters, collate

    def _shard_samples(self, shard: ShardInfo, epoch: int) -> Iterator[dict[str, Any]]:
        """The shard's selected raw samples in this epoch's order (seeded shuffle buffer)."""
        url = f"{self.base_uri}/{shard.key}"
        rng = np.random.default_rng(derive_seed("buffer", self.seed, epoch, shard.key))
        buf: list[dict[str, Any]] = []
        expected = sum(n for src, n in shard.sources.items() if src in self.sources)
        seen = 0
        try:
            for raw in _iter_tar(url, shard.sha256 if self.verify else None):
                src = json.loads(raw["json"]).get("source") if "json" in raw else "unlabelled"
                if src not in self.sources:
                    continue
                raw["__source__"] = src
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

    def _raw_range(self, plan: EpochPlan, epoch: int, start: int, count: int) -> Iterator[dict[str, Any] | None]:
        """``count`` raw samples from global position ``start``; ``None`` where one is missing."""
        end, pos, emitted = start + count, 0, 0
        for shard, n in zip(plan.shards, plan.counts):
            lo, hi = max(start, pos), min(end, pos + n)
            if lo < hi:
                got = 0
                for i, raw in enumerate(self._shard_samples(shard, epoch)):
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
        epoch, consumed = self.position.get()
        plan = self.planner(epoch=epoch)
        # The DataLoader starts each iteration at its worker 0, but after a resume at
        # batch k the next batch belongs to plan worker k % W: rotate the mapping.
        w = max(1, plan.num_workers)
        worker = ((info.id if info is not None else 0) + consumed) % w
        wr = plan.worker_range(self.rank, worker, consumed)
        bs = plan.batch_size
        first = wr.start + wr.skip_batches * bs
        todo = (wr.batches - wr.skip_batches) * bs
        recent: deque[Any] = deque(maxlen=bs)
        batch: list[Any] = []
        pending_pads = 0
        gen = torch.Generator()  # reseeded for every sample: one per pass is enough
        for raw in self._raw_range(plan, epoch, first, todo):
            sample = None
            if raw is not None:
                try:
                    sample = self._prepare(raw, epoch, gen)
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
                f"rank {self.rank} worker {worker}: no readable sample in its part of epoch {epoch} "
                f"of {self.base_uri}; every shard it reads failed"
            )

    def _prepare(self, raw: dict[str, Any], epoch: int, gen: torch.Generator) -> Any:
        sample = decode_sample(raw)
        gen.manual_seed(derive_seed("sample", self.seed, epoch, sample["key"]))
        return self.transform(sample, gen)
