"""`mimtrain knn`: weighted k-nearest-neighbour classification on L2-normalised frozen features (k = 20,
temperature 0.07, as in InstDisc / DINO). Cheap enough to run every N steps during pretraining as a progress signal
(`knn_accuracy` takes an encoder and two streams)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mimtrain.data.stream import ShardStream
from mimtrain.eval.classify.common import (accelerator_for, accuracies, eval_stream, follow_source, frozen_encoder, num_classes, shard_urls,
                     start_run, topk_correct, write_results)
from mimtrain.config.classify import EvalConfig
from mimtrain.eval.classify.linprobe import extract


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, feats: Tensor, n_cls: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Class scores of `feats` from their k nearest training features (cosine similarity).

    Args:
        train_feats: [N, C]; train_labels: [N]; feats: [M, C] (normalised here).

    Returns:
        [M, n_cls]: sum over the k neighbours of exp(similarity / temperature) per neighbour's class.
    """
    bank = nn.functional.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for q in nn.functional.normalize(feats.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), n_cls, device=q.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


def knn_accuracy(encoder: nn.Module, train: ShardStream, val: ShardStream, cfg: EvalConfig, acc, pool: str,
                 n_cls: int) -> dict:
    """Top-1/top-5 (%) of weighted k-NN with `encoder`'s features of two streams (evaluation transform)."""
    f_train, y_train = extract(encoder, train, pool, cfg, acc, "k-NN bank")
    f_val, y_val = extract(encoder, val, pool, cfg, acc, "k-NN queries")
    scores = knn_classify(f_train, y_train, f_val, n_cls, cfg.knn.k, cfg.knn.temperature)
    c1, c5 = topk_correct(scores, y_val)
    return {**accuracies(c1.item(), c5.item(), len(y_val), n_cls), "num_val": len(y_val), "num_train": len(y_train)}


def knn(cfg: EvalConfig, source: str, random_init: bool = False) -> dict:
    """k-NN evaluation of the encoder in `source` on data.train_shards (the bank) and data.val_shards."""
    acc = accelerator_for(cfg)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    train_urls, val_urls = shard_urls(cfg)
    n_cls = num_classes(cfg, train_urls)
    encoder, spec, pool = frozen_encoder(cfg, source, acc, random_init)
    out = start_run(cfg, acc, {"num_classes": n_cls, "pool": pool, "random_init": random_init})
    metrics = knn_accuracy(encoder, eval_stream(cfg, train_urls, acc), eval_stream(cfg, val_urls, acc), cfg, acc,
                           pool, n_cls)
    results = {"task": "knn", "source": str(source), "encoder": spec.name, "random_init": random_init, "pool": pool,
               "k": cfg.knn.k, "temperature": cfg.knn.temperature, **metrics}
    write_results(out, results, acc)
    acc.end_training()
    return results
