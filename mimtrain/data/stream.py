"""Streaming WebDataset pipeline with true epochs, any shard count and an exactly resumable position.

An epoch is one walk over a sequence of samples: the shards in an order shuffled from (seed, epoch), laid end to end
(a second, reshuffled lap follows only if the epoch asks for more samples than the shards hold). Every process takes
the same number of whole batches, and every DataLoader worker (a *stream*) a contiguous run of that sequence: stream s
of rank r supplies that rank's batches s, s + W, ... (the DataLoader's round-robin order), so its run is as long as
those batches. Runs may start or end inside a shard (the stream reads that shard and skips what is not its own), so
1 shard feeds any number of processes x workers, and no sample is read twice in an epoch: only the samples after the
last whole batch of all processes (fewer than processes x batch x grad_accum) are left out, a different tail each
epoch. We plan this ourselves rather than with `wds.split_by_node/split_by_worker`, which deal whole shards: with
uneven counts they make uneven epochs, and exact resume must know which stream produced each batch.

A stream reads its tars (webdataset's `tarfile_samples`, with a handler that counts and skips unreadable members and
truncated shards), shuffles through a seeded buffer, decodes and augments with a per-sample seed, batches, and draws
masks in collate. Each batch carries its stream's position (round, raw samples read), so a checkpoint records exactly
where every stream stopped; a resumed stream replays its deterministic raw order and skips what was consumed before
decoding anything. A stream that runs short (undecodable samples) tops up with a second round of its own run.
Shards whose sample counts are unknown (remote URLs) are dealt whole, one stream each, and must number at least
processes x workers.
"""
from __future__ import annotations

import functools
import glob
import io
import itertools
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

from mimtrain.config.errors import ConfigError, DataError, MissingPathError
from mimtrain.masking import MaskingService, sample_seed
from mimtrain.data.shards import IMAGE_EXTS, INDEX_NAME
from mimtrain.data.transforms import UndecodableImage, seeded

_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTS)


def expand_shards(spec: str, check: bool = True, key: str = "data.train_shards") -> list[str]:
    """Shard URLs from a spec: comma- or '::'-separated items, each a brace pattern, glob, directory (its *.tar),
    `pipe:` command or http(s) URL. Local paths must exist (checked before any training starts); `key` is the
    setting the spec came from, for the messages."""
    if not spec:
        raise ConfigError(f"no shards given: set {key} (e.g. 'data/shard-{{000000..000099}}.tar')")
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
    local = [u for u in urls if not _remote(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if check and missing:
        raise MissingPathError(f"{key}: {len(missing)} shard(s) not found, e.g. {missing[:3]} (from spec '{spec}')")
    if not urls:
        folder = spec if os.path.isdir(spec) else None
        raise DataError(f"{key}: folder {folder} holds no shards (*.tar)" if folder else
                        f"{key}: no shards match '{spec}'")
    return urls


def _remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _index(folder: str) -> dict:
    path = Path(folder, INDEX_NAME)
    return json.loads(path.read_text()) if path.exists() else {}


def _count_tar(url: str) -> int:
    """Samples in a tar without an index entry: image members, from the headers only."""
    try:
        with tarfile.open(url) as tar:
            return len({m.name.split(".", 1)[0] for m in tar.getmembers()
                        if m.name.rsplit(".", 1)[-1].lower() in _IMAGE_KEYS})
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url} is not a readable tar file ({type(e).__name__}: {e}); rewrite it with "
                        "`mimtrain make-shards` or drop it from the shard list") from e


@functools.lru_cache(maxsize=16)  # keyed by the files' (size, mtime) too: a rewritten shard folder is read again
def _sizes(urls: tuple[str, ...], stamps: tuple) -> tuple[int, ...]:
    indexes: dict[str, dict] = {}
    sizes = []
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in indexes:
            indexes[folder] = _index(folder).get("shards", {})
        sizes.append(indexes[folder][name] if name in indexes[folder] else _count_tar(url))
    return tuple(sizes)


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples per shard (make-shards' index.json where present, else the tar headers); None for remote shards."""
    if any(_remote(u) for u in urls):
        return None
    paths = [*urls, *(os.path.join(f, INDEX_NAME) for f in dict.fromkeys(os.path.dirname(u) for u in urls))]
    return list(_sizes(tuple(urls), tuple(_stamp(p) for p in paths)))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def count_samples(urls: list[str]) -> int:
    """Samples in local shards: from make-shards' index.json where present, else by reading the tar headers."""
    sizes = shard_sizes(urls)
    if sizes is None:
        raise ConfigError(f"cannot count samples of remote shards ({next(u for u in urls if _remote(u))}): set "
                          "data.samples_per_epoch")
    return sum(sizes)


def require_labels(urls: list[str], purpose: str) -> None:
    """Refuse unlabelled shards (before any model is built or step taken): those make-shards wrote as unlabelled,
    and, in a folder without its index, a first shard whose first samples carry no `.cls`."""
    for folder, first in {os.path.dirname(u): u for u in reversed(urls) if not _remote(u)}.items():
        labelled = _index(folder).get("labelled")
        if labelled is False:
            raise DataError(f"{purpose} needs labelled shards, and those in {folder} are unlabelled (index.json: "
                            f"written from data with no label column); point it at shards made from an ImageFolder "
                            "tree or with --label-column")
        if labelled is None and not _has_labels(first):
            raise DataError(f"{purpose} needs labelled shards, and {first} holds images without a .cls label; "
                            "write labelled shards with `mimtrain make-shards` from an ImageFolder tree")


def _has_labels(url: str, look: int = 16) -> bool:
    """Whether a `.cls` member appears among the first `look` members of a tar (headers only)."""
    try:
        with tarfile.open(url) as tar:
            for member in itertools.islice(iter(tar.next, None), look):
                if member.name.endswith(".cls"):
                    return True
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url} is not a readable tar file ({type(e).__name__}: {str(e).split(':')[0]}); "
                        "rewrite it with `mimtrain make-shards` or drop it from the shard list") from None
    return False


def require_samples(urls: list[str], key: str) -> None:
    """Refuse local shards that hold no samples at all, naming their folder (remote shards: not counted)."""
    sizes = shard_sizes(urls)
    if sizes is not None and sum(sizes) == 0:
        folders = ", ".join(dict.fromkeys(os.path.dirname(u) for u in urls))
        raise DataError(f"{key}: the {len(urls)} shard(s) in {folders} hold no samples")


def match_classes(train: list[str], val: list[str]) -> tuple[list[int] | None, list[str]]:
    """Map the validation labels onto the training classes by name (make-shards' classes.json beside each).

    Returns (label map, training classes missing from val): the map takes val label i to the training label of
    class names_val[i], None when the lists are equal (or either side has no classes.json). A val class the
    training set lacks, or an order of the shared classes that differs (two numberings of one class set), is
    refused, naming the classes."""
    names_train, names_val = class_names(train), class_names(val)
    if names_train is None or names_val is None or names_train == names_val:
        return None, []
    where = f"{Path(train[0]).parent / 'classes.json'} and {Path(val[0]).parent / 'classes.json'}"
    unknown = [n for n in names_val if n not in names_train]
    if unknown:
        raise DataError(f"data.val_shards has classes the training shards lack: {unknown[:8]} ({where}); "
                        "evaluate on shards made from the same class set")
    shared = [n for n in names_train if n in names_val]
    if shared != names_val:
        i = next(i for i, (a, b) in enumerate(zip(shared, names_val)) if a != b)
        raise DataError(f"data.train_shards and data.val_shards number their classes in different orders "
                        f"({shared[i]!r} vs {names_val[i]!r} at val label {i}; {where}): rewrite one set with "
                        "`mimtrain make-shards` so both sort their classes alike")
    return [names_train.index(n) for n in names_val], [n for n in names_train if n not in names_val]


class ShardStream(IterableDataset):
    """Yields collated batches: {"images", "label", "key", "mask" (if masking), "pos", "skipped"}.

    Args:
        urls: shard URLs (all ranks'). transform: PIL -> tensor, applied under a per-sample seed; a transform with
            `takes_bytes` gets the encoded image and decodes it itself (`PretrainTransform`).
        num_batches: batches this rank yields per epoch (every rank the same; whole batches of one walk over the
            shards, or more with repeats); None = this rank's share of one walk, with a partial last batch
            per stream (evaluation).
        start: resume point {"consumed": batches already consumed this epoch, "streams": {s: [round, raw]}}.
        sizes: samples per shard (default: `shard_sizes(urls)`).
        label_map: label i read from a `.cls` becomes label_map[i] (val classes renumbered by `match_classes`).
    """

    def __init__(self, urls: list[str], transform: Callable, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_streams: int = 1, masking: MaskingService | None = None,
                 num_batches: int | None = None, shuffle_buffer: int = 1000, epoch: int = 0,
                 start: dict | None = None, shuffle_shards: bool = True, sizes: list[int] | None = None,
                 label_map: list[int] | None = None):
        super().__init__()
        self.label_map = label_map
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.urls)
        if self.sizes is None and len(urls) < world_size * num_streams:
            raise ConfigError(f"{len(urls)} remote shard(s) of unknown size cannot feed {world_size} process(es) x "
                              f"{num_streams} worker(s): they are dealt whole, so write at least "
                              f"{world_size * num_streams} shards (make-shards --shard-size), or fewer workers")
        self.seed, self.rank, self.world_size, self.num_streams = seed, rank, world_size, num_streams
        self.masking, self.num_batches, self.shuffle_buffer = masking, num_batches, shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.epoch, self.start = epoch, start or {}

    def set_epoch(self, epoch: int, start: dict | None = None) -> None:
        self.epoch, self.start = epoch, start or {}

    # ---- which samples, how many batches
    def _order(self, lap: int) -> list[int]:
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            random.Random(sample_seed("shards", self.seed, self.epoch, lap)).shuffle(order)
        return order

    def _batches(self, stream: int) -> int | None:
        """Whole batches `stream` supplies this epoch (its rank's batches stream, stream + W, ...)."""
        if self.num_batches is None:
            return None
        n, w = self.num_batches, self.num_streams
        return n // w + (stream < n % w)

    def _span(self, stream: int) -> tuple[int, int]:
        """[first, end) of this stream's run in the epoch's sequence of samples (laps laid end to end)."""
        w, b = self.num_streams, self.batch_size
        if self.num_batches is None:  # one walk split evenly, no sample dropped
            total, g, streams = sum(self.sizes), self.rank * w + stream, self.world_size * w
            return total * g // streams, total * (g + 1) // streams
        first = self.rank * self.num_batches * b + sum(self._batches(s) for s in range(stream)) * b
        return first, first + self._batches(stream) * b

    def _pieces(self, stream: int) -> list[tuple[str, int, int | None, int]]:
        """(url, first, stop, lap): the shard slices of this stream's run; stop None = to the end of the tar (so
        samples an index does not count are still read)."""
        if self.sizes is None:  # whole shards, dealt round-robin over every stream of every rank
            g, streams = self.rank * self.num_streams + stream, self.world_size * self.num_streams
            return [(self.urls[i], 0, None, 0) for i in self._order(0)[g::streams]]
        first, end = self._span(stream)
        total, pieces, lap = sum(self.sizes), [], first // max(1, sum(self.sizes))
        pos = lap * total
        while pos < end and total:
            for i in self._order(lap):
                lo, hi = max(first, pos), min(end, pos + self.sizes[i])
                if lo < hi:
                    pieces.append((self.urls[i], lo - pos, None if hi == pos + self.sizes[i] else hi - pos, lap))
                pos += self.sizes[i]
                if pos >= end:
                    break
            lap += 1
        return pieces

    def _quota(self, stream: int) -> int | None:
        """Batches `stream` yields this epoch, minus those a resumed run already consumed."""
        total = self._batches(stream)
        if total is None:
            return None
        consumed, w = self.start.get("consumed", 0), self.num_streams
        return total - (consumed // w + (stream < consumed % w))

    # ---- one stream
    def _raw(self, stream: int, round_: int, counters: dict) -> Iterator[dict]:
        def handler(exn: Exception) -> bool:  # unreadable tar member or truncated shard: count and go on
            counters["skipped"] += 1
            return True

        def read() -> Iterator[dict]:
            for url, first, stop, lap in self._pieces(stream):
                samples = wds.tariterators.tarfile_samples(iter([{"url": url}]), handler=handler)
                for sample in itertools.islice(samples, first, stop):
                    sample["__lap__"] = lap
                    yield sample
        seed = sample_seed("buffer", self.seed, self.epoch, round_, self.rank, stream)
        return wds.filters.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), seed=seed)(read())

    def _decode(self, sample: dict, round_: int, counters: dict):
        ext = next((e for e in _IMAGE_KEYS if e in sample), None)
        key = f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
        repeat = sample.get("__lap__", 0) + round_
        if repeat:
            key = f"{key}#{repeat}"  # a sample read again in one epoch gets fresh crops and masks
        try:
            if ext is None:
                raise ValueError("no image")
            label = int(sample["cls"]) if "cls" in sample else -1
            if self.label_map is not None and 0 <= label < len(self.label_map):
                label = self.label_map[label]  # val classes numbered by the training classes (match_classes)
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
        round_, raw = saved.get(stream, saved.get(str(stream), (0, 0)))
        counters = {"skipped": 0}
        produced, items = 0, []
        while quota is None or produced < quota:
            n_read, decoded = 0, 0
            for n_read, sample in enumerate(self._raw(stream, round_, counters), start=1):
                if n_read <= raw:
                    continue  # consumed before the checkpoint: skip before decoding
                item = self._decode(sample, round_, counters)
                if item is None:
                    continue
                items.append(item)
                decoded += 1
                if len(items) == self.batch_size:
                    yield self._collate(items, [stream, round_, n_read], counters)
                    items, produced = [], produced + 1
                    if quota is not None and produced >= quota:
                        return
            if quota is None:
                if items:
                    yield self._collate(items, [stream, round_, n_read], counters)
                return
            if decoded == 0 and raw == 0:
                pieces = self._pieces(stream)
                raise DataError(f"stream {stream} of rank {self.rank} decoded no image from its {len(pieces)} "
                                   f"shard slice(s), e.g. {[p[0] for p in pieces[:3]]}: {counters['skipped']} "
                                   "unreadable; are these image shards written by `mimtrain make-shards`?")
            round_, raw = round_ + 1, 0  # short of whole batches (undecodable samples): top up with another round

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if n_workers != self.num_streams:
            raise RuntimeError(f"ShardStream built for {self.num_streams} streams but run by {n_workers} workers")
        # Rotate so that the first batch after a resume comes from the stream the uninterrupted run would read next.
        yield from self._stream((worker + self.start.get("consumed", 0)) % self.num_streams)


def class_names(urls: list[str]) -> list[str] | None:
    """The class names in make-shards' classes.json beside the first shard (label i = names[i]); None without one."""
    index = Path(urls[0]).parent / "classes.json"
    names = json.loads(index.read_text()) if index.is_file() else None
    return [str(n) for n in names] if isinstance(names, list) else None


def num_classes(urls: list[str], given: int = 0) -> int:
    """`given` when set (> 0), else the length of make-shards' classes.json beside the first shard. A `given` below
    that length is refused (labels up to length - 1 would index past the head)."""
    names = class_names(urls)
    if given > 0:
        if names is not None and given < len(names):
            raise ConfigError(f"data.num_classes={given} is below the {len(names)} classes of "
                              f"{Path(urls[0]).parent / 'classes.json'} (labels up to {len(names) - 1})")
        return given
    if names is None:
        raise ConfigError(f"cannot tell the number of classes: no {Path(urls[0]).parent / 'classes.json'}; set "
                          "data.num_classes")
    return len(names)


def labelled_pass(urls: list[str], transform: Callable, batch_size: int, rank: int = 0, world_size: int = 1,
                  num_workers: int = 0, pin_memory: bool = False, label_map: list[int] | None = None) -> DataLoader:
    """One full, unshuffled pass over this process's share of `urls` (evaluation, feature extraction); iterate it
    again for another pass. `label_map`: see ShardStream."""
    stream = ShardStream(urls, transform, batch_size, seed=0, rank=rank, world_size=world_size,
                         num_streams=max(1, num_workers), num_batches=None, shuffle_buffer=1, shuffle_shards=False,
                         label_map=label_map)
    return make_loader(stream, num_workers, pin_memory)


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose workers are the stream's streams (batching and masks happen in the workers);
    num_workers=0 reads the single stream in the main process."""
    if max(1, num_workers) != stream.num_streams:
        raise ValueError(f"num_workers={num_workers} does not match the stream's {stream.num_streams} streams")
    workers = num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
