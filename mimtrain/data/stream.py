"""Streaming WebDataset pipeline with fixed-length epochs and an exactly resumable position.

Per epoch, the shard list is shuffled from (seed, epoch), split by rank (`shards[rank::world]`) and then by stream
(`[stream::num_streams]`, one stream per DataLoader worker). A stream reads its tars (webdataset), shuffles through
a seeded buffer, skips+counts undecodable samples, augments with a per-sample seed, batches, and draws masks in
collate. Each batch carries its stream's position (pass, raw samples read), so a checkpoint can record exactly where
every stream stopped; a resumed stream replays its deterministic raw order and skips what was already consumed
before decoding anything. We split ranks/workers ourselves (not `wds.split_by_*`) because resume must know which
stream produced each batch, and rotate streams over workers so the DataLoader's round-robin order is preserved.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..masking import MaskingService, sample_seed
from .shards import IMAGE_EXTS, INDEX_NAME
from .transforms import UndecodableImage, seeded

_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTS)


def expand_shards(spec: str, check: bool = True) -> list[str]:
    """Shard URLs from a spec: comma- or '::'-separated items, each a brace pattern, glob, directory (its *.tar),
    `pipe:` command or http(s) URL. Local paths must exist (checked before any training starts)."""
    if not spec:
        raise ValueError("no shards given: set data.train_shards (e.g. 'data/shard-{000000..000099}.tar')")
    urls: list[str] = []
    for item in [s.strip() for part in spec.split(",") for s in part.split("::") if s.strip()]:
        if item.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
            urls += wds.shardlists.expand_urls(item)
            continue
        for path in wds.shardlists.expand_urls(item):
            if os.path.isdir(path):
                urls += sorted(glob.glob(os.path.join(path, "*.tar")))
            elif any(c in path for c in "*?["):
                urls += sorted(glob.glob(path))
            else:
                urls.append(path)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if check and missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]} (from spec '{spec}')")
    if not urls:
        raise FileNotFoundError(f"no shards match '{spec}'")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in local shards: from make-shards' index.json where present, else by reading the tar headers."""
    indexes: dict[str, dict] = {}
    total = 0
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            raise ValueError(f"cannot count samples of remote shard {url}: set data.samples_per_epoch")
        folder, name = os.path.split(url)
        if folder not in indexes:
            idx = Path(folder, INDEX_NAME)
            indexes[folder] = json.loads(idx.read_text()).get("shards", {}) if idx.exists() else {}
        if name in indexes[folder]:
            total += indexes[folder][name]
        else:
            with tarfile.open(url) as tar:
                total += len({m.name.split(".", 1)[0] for m in tar.getmembers()
                              if m.name.rsplit(".", 1)[-1].lower() in _IMAGE_KEYS})
    return total


class ShardStream(IterableDataset):
    """Yields collated batches: {"images", "label", "key", "mask" (if masking), "pos", "skipped"}.

    Args:
        urls: shard URLs (all ranks'). transform: PIL -> tensor, applied under a per-sample seed; a transform with
            `takes_bytes` gets the encoded image and decodes it itself (`PretrainTransform`).
        num_batches: batches this rank yields per epoch (fixed length; streams repeat their shards if short);
            None = one pass over this rank's shards with a partial last batch (evaluation, tests).
        start: resume point {"consumed": batches already consumed this epoch, "streams": {s: [pass, raw]}}.
    """

    def __init__(self, urls: list[str], transform: Callable, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_streams: int = 1, masking: MaskingService | None = None,
                 num_batches: int | None = None, shuffle_buffer: int = 1000, epoch: int = 0,
                 start: dict | None = None, shuffle_shards: bool = True):
        super().__init__()
        if len(urls) < world_size:
            raise ValueError(f"{len(urls)} shard(s) cannot feed {world_size} processes: write more, smaller shards "
                             "(make-shards --shard-size)")
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.seed, self.rank, self.world_size, self.num_streams = seed, rank, world_size, num_streams
        self.masking, self.num_batches, self.shuffle_buffer = masking, num_batches, shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.epoch, self.start = epoch, start or {}

    def set_epoch(self, epoch: int, start: dict | None = None) -> None:
        self.epoch, self.start = epoch, start or {}

    # ---- which shards, how many batches
    def _shards(self, stream: int, pass_: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(sample_seed("shards", self.seed, self.epoch, pass_)).shuffle(urls)
        return urls[self.rank::self.world_size][stream::self.num_streams]

    def _quota(self, stream: int) -> int | None:
        """Batches `stream` yields this epoch, minus those a resumed run already consumed."""
        if self.num_batches is None:
            return None
        n, w = self.num_batches, self.num_streams
        total = n // w + (stream < n % w)
        consumed = self.start.get("consumed", 0)
        done = consumed // w + (stream < consumed % w)
        return total - done

    # ---- one stream
    def _raw(self, stream: int, pass_: int, counters: dict) -> Iterator[dict]:
        def handler(exn: Exception) -> bool:  # unreadable tar member or truncated shard: count and go on
            counters["skipped"] += 1
            return True
        src = ({"url": u} for u in self._shards(stream, pass_))
        samples = wds.tariterators.tarfile_samples(src, handler=handler)
        seed = sample_seed("buffer", self.seed, self.epoch, pass_, self.rank, stream)
        return wds.filters.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), seed=seed)(samples)

    def _decode(self, sample: dict, pass_: int, counters: dict):
        ext = next((e for e in _IMAGE_KEYS if e in sample), None)
        key = f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
        if pass_:
            key = f"{key}#{pass_}"  # a repeated pass inside one epoch gets fresh crops and masks
        try:
            if ext is None:
                raise ValueError("no image")
            label = int(sample["cls"]) if "cls" in sample else -1
            if getattr(self.transform, "takes_bytes", False):
                img = sample[ext]  # the transform decodes (a JPEG at reduced scale where its crop allows)
            else:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    img = img.convert("RGB")
        except Exception:  # noqa: BLE001  (any undecodable sample is skipped and counted, never fatal)
            counters["skipped"] += 1
            return None
        try:
            return seeded(self.transform, img, sample_seed("aug", self.seed, self.epoch, key)), label, key
        except UndecodableImage:  # raised only by a decoding transform, on broken image data
            counters["skipped"] += 1
            return None

    def _collate(self, items: list, pos: list[int], counters: dict) -> dict:
        images, labels, keys = zip(*items)
        batch = {"images": torch.stack(images), "label": torch.tensor(labels), "key": list(keys),
                 "pos": torch.tensor(pos), "skipped": torch.tensor(counters["skipped"])}
        if self.masking is not None:
            batch["mask"] = self.masking.draw(list(keys), self.epoch)
        return batch

    def _stream(self, stream: int) -> Iterator[dict]:
        quota = self._quota(stream)
        saved = self.start.get("streams", {})
        pass_, raw = saved.get(stream, saved.get(str(stream), (0, 0)))
        counters = {"skipped": 0}
        produced, items = 0, []
        while quota is None or produced < quota:
            n_read, decoded = 0, 0
            for n_read, sample in enumerate(self._raw(stream, pass_, counters), start=1):
                if n_read <= raw:
                    continue  # consumed before the checkpoint: skip before decoding
                item = self._decode(sample, pass_, counters)
                if item is None:
                    continue
                items.append(item)
                decoded += 1
                if len(items) == self.batch_size:
                    yield self._collate(items, [stream, pass_, n_read], counters)
                    items, produced = [], produced + 1
                    if quota is not None and produced >= quota:
                        return
            if quota is None:
                if items:
                    yield self._collate(items, [stream, pass_, n_read], counters)
                return
            if decoded == 0 and raw == 0:
                raise RuntimeError(f"stream {stream} of rank {self.rank} decoded no sample from its shards "
                                   f"{self._shards(stream, pass_)[:3]} (all missing or corrupt?)")
            pass_, raw = pass_ + 1, 0  # fixed-length epoch: go round this stream's shards again

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if n_workers != self.num_streams:
            raise RuntimeError(f"ShardStream built for {self.num_streams} streams but run by {n_workers} workers")
        # Rotate so that the first batch after a resume comes from the stream the uninterrupted run would read next.
        yield from self._stream((worker + self.start.get("consumed", 0)) % self.num_streams)


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose workers are the stream's streams (batching and masks happen in the workers);
    num_workers=0 reads the single stream in the main process."""
    if max(1, num_workers) != stream.num_streams:
        raise ValueError(f"num_workers={num_workers} does not match the stream's {stream.num_streams} streams")
    workers = num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
