"""k-NN top-1 every `train.knn_every` steps: a cheap progress signal while pretraining runs.

The encoder being trained (unwrapped, eval mode, no grad) embeds `data.knn_train_shards` (the bank) and
`data.val_shards` (the queries), both labelled; each process embeds its share of the shards and the features are
gathered, then classified by `features.knn_accuracy`: the code of `mimtrain knn`, with its defaults (k = 20,
T = 0.07, the evaluation crop). Features are taken under autocast and classified in fp32. The main process logs
`knn/top1` and `knn/top5` (top-5 only with 5 classes or more). Not under ZeRO-3 / FSDP: their forward is a collective
over parameter shards, and the processes' shares of the labelled shards differ in size; evaluate the checkpoints
with `mimtrain knn --from RUN` instead.

Images are decoded in the main process (no DataLoader workers): a SIGTERM to the process group while the probe runs
would kill torch's workers and fail the run before its preemption checkpoint (see `preempt.shield_workers`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from mimtrain.config.classify import EvalDataConfig, EvalTrainConfig, KnnOptions
from mimtrain.config.pretrain import Config, ConfigError
from mimtrain.data.stream import (expand_shards, labelled_pass, match_classes, num_classes, require_labels,
                                  require_samples)
from mimtrain.data.transforms import eval_transform
from mimtrain.engine.distributed import module_dtype, params_sharded, unwrap
from mimtrain.features import knn_accuracy, resolve_pool


class KnnMonitor:
    """Built before the first step (so bad settings are refused early); called after every optimizer step."""

    def __init__(self, cfg: Config, accelerator):
        self.every = cfg.train.knn_every
        if not self.every:
            return
        if not (cfg.data.knn_train_shards and cfg.data.val_shards):
            raise ConfigError("train.knn_every needs labelled shards: data.knn_train_shards (the k-NN bank) and "
                              "data.val_shards (the queries)")
        if params_sharded(accelerator):
            raise ConfigError("train.knn_every is not available under ZeRO-3 or FSDP (the encoder's parameters are "
                              "sharded); set train.knn_every=0 and run `mimtrain knn --from RUN` on the checkpoints")
        self.bank = expand_shards(cfg.data.knn_train_shards, key="data.knn_train_shards")
        self.queries = expand_shards(cfg.data.val_shards, key="data.val_shards")
        require_samples(self.bank, "data.knn_train_shards")
        require_samples(self.queries, "data.val_shards")
        require_labels(self.bank + self.queries, "train.knn_every (the k-NN monitor)")
        self.query_labels, _ = match_classes(self.bank, self.queries)  # val labels numbered by the bank's classes
        if min(len(self.bank), len(self.queries)) < accelerator.num_processes:
            raise ConfigError(f"train.knn_every: every process embeds its own shards, so data.knn_train_shards and "
                              f"data.val_shards need at least {accelerator.num_processes} shards each")
        if not (Path(self.bank[0]).parent / "classes.json").is_file():
            raise ConfigError("train.knn_every: no classes.json beside data.knn_train_shards (write labelled shards "
                              "with `mimtrain make-shards` from an ImageFolder tree)")
        self.num_classes = num_classes(self.bank)
        self.knn = KnnOptions()  # `mimtrain knn`'s defaults
        self.transform = eval_transform(cfg.data.img_size, cfg.data.mean, cfg.data.std, EvalDataConfig().crop_pct)
        self.batch_size = EvalTrainConfig().eval_batch_size

    def _pass(self, urls: list[str], accelerator, label_map: list[int] | None = None):
        return labelled_pass(urls, self.transform, self.batch_size, accelerator.process_index,
                             accelerator.num_processes, label_map=label_map)  # decoded here: see the docstring

    def __call__(self, step: int, method, accelerator, log) -> None:
        if not self.every or step % self.every:
            return
        encoder = unwrap(accelerator, method).encoder
        was_training = encoder.training
        encoder.eval()
        pool = resolve_pool("auto", encoder, default_cls=True)
        half = module_dtype(accelerator)  # DeepSpeed bf16/fp16 weights: autocast feeds them half-precision inputs
        with torch.no_grad(), torch.autocast(accelerator.device.type, dtype=half, enabled=half is not None):
            queries = self._pass(self.queries, accelerator, self.query_labels)
            acc = knn_accuracy(encoder, self._pass(self.bank, accelerator), queries,
                               pool, self.num_classes, accelerator, self.knn.k, self.knn.temperature, progress=False)
        encoder.train(was_training)
        shown = {k: v for k, v in acc.items() if k in ("top1", "top5") and v is not None}  # top5 None below 5 classes
        log.scalars(step, {f"knn/{k}": v for k, v in shown.items()})
        if accelerator.is_main_process:  # above the training bar, not into it
            tqdm.write(f"step {step}: k-NN top-1 {acc['top1']:.2f}% ({acc['num_val']} queries)")
