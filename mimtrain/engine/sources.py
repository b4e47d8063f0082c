"""Resumable batch sources: where a task's training batches come from, epoch by epoch, from any step boundary.

The loop (`engine.fit`) keeps the position in its `TrainState` (epoch, micro-batches consumed this epoch, and for a
shard stream where each of its streams stands); a source turns that position back into the rest of the epoch. Every
random draw of the data is a function of (seed, epoch, sample), never of a generator that runs on from the start, so
the batches after a resume are the ones the uninterrupted run would have read, augmentations included:
- `ShardSource`: a `data.stream.ShardStream` (pretraining, fine-tuning, streamed linear probes); per-sample seeds and
  stream positions are its own.
- `MapSource`: a map-style dataset (COCO, ADE20K): the epoch's order is `DistributedSampler`'s (seed + epoch), the
  batches already consumed are skipped by index (nothing is decoded for them), and each sample is augmented under
  a seed of (seed, epoch, index) in whichever worker reads it.
- `TensorSource`: in-memory tensors (cached features), shuffled by a generator seeded from (seed, epoch).
The global RNG states (drop path, Mixup/CutMix, torchvision's detector sampling) travel in the checkpoint itself.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mimtrain.data.stream import ShardStream, make_loader
from mimtrain.engine.preempt import shield_workers
from mimtrain.engine.resume import TrainState
from mimtrain.masking import sample_seed


class BatchSource:
    """`batches_per_epoch` micro-batches per process and epoch; `batches(state)` gives epoch `state.epoch`'s after
    the `state.consumed` already trained on; `take(state, batch)` records one more consumed."""
    batches_per_epoch: int = 0
    num_streams: int = 1  # resume layout: DataLoader workers of a shard stream (1 for the others)
    shard_stream: bool = False  # the position survives a change of layout (`resume.rederive`)

    def batches(self, state: TrainState) -> Iterable:
        raise NotImplementedError

    def take(self, state: TrainState, batch) -> None:
        state.consumed += 1


class ShardSource(BatchSource):
    shard_stream = True

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 on_batch: Callable[[dict], None] | None = None):
        if stream.num_batches is None:
            raise ValueError("a training stream needs num_batches (the micro-batches of one epoch)")
        self.stream, self.num_workers, self.pin_memory, self.on_batch = stream, num_workers, pin_memory, on_batch
        self.batches_per_epoch, self.num_streams = stream.num_batches, stream.num_streams

    def batches(self, state: TrainState) -> Iterator[dict]:
        self.stream.set_epoch(state.epoch, state.position())
        return shield_workers(_own_seed(make_loader(self.stream, self.num_workers, pin_memory=self.pin_memory)))

    def take(self, state: TrainState, batch: dict) -> None:
        state.take(batch)
        if self.on_batch is not None:  # e.g. pretraining's train.trace_keys
            self.on_batch(batch)


def _own_seed(loader: DataLoader) -> DataLoader:
    """Starting a DataLoader iterator draws its workers' base seed from torch's global RNG, and a resumed run starts
    one where the uninterrupted run did not (mid-epoch): the global stream (drop path, Mixup's partner draws) would
    shift by one. A generator of its own leaves the global RNG alone; the workers' seeds do not matter here (every
    draw of the data is seeded per sample)."""
    loader.generator = torch.Generator().manual_seed(0)
    return loader


class _Seeded(Dataset):
    """dataset[i] under torch's CPU generator seeded from (seed, epoch, i): the same augmentation in any worker, on
    any resume."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed("sample", self.seed, self.epoch, i))
            return self.dataset[i]


class MapSource(BatchSource):
    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, rank: int, world_size: int,
                 num_workers: int, collate_fn: Callable | None = None, grad_accum: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.collate_fn = rank, world_size, num_workers, collate_fn
        per_process = len(dataset) // world_size  # DistributedSampler(drop_last=True)
        # whole optimizer steps only: an epoch never ends inside an accumulation window
        self.batches_per_epoch = per_process // batch_size // grad_accum * grad_accum

    def order(self, epoch: int) -> list[int]:
        """This process's sample indices of `epoch`, in training order (DistributedSampler's shuffle)."""
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def batches(self, state: TrainState) -> Iterator:
        b = self.batch_size
        rest = self.order(state.epoch)[state.consumed * b:self.batches_per_epoch * b]
        loader = DataLoader(_Seeded(self.dataset, self.seed, state.epoch), batch_size=b, sampler=rest,
                            num_workers=self.num_workers, collate_fn=self.collate_fn, drop_last=True)
        return shield_workers(_own_seed(loader))


class TensorSource(BatchSource):
    """(features[idx], labels[idx]) batches of `batch_size` rows, `steps_per_epoch` a reshuffled epoch."""

    def __init__(self, features: Tensor, labels: Tensor, batch_size: int, steps_per_epoch: int, seed: int):
        self.features, self.labels, self.batch_size, self.seed = features, labels, batch_size, seed
        self.batches_per_epoch = steps_per_epoch

    def batches(self, state: TrainState) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(sample_seed("rows", self.seed, state.epoch))
        order = torch.randperm(len(self.features), generator=g).to(self.features.device)
        b = self.batch_size
        for i in range(state.consumed, self.batches_per_epoch):
            idx = order[i * b:(i + 1) * b]
            yield self.features[idx], self.labels[idx]
