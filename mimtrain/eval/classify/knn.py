"""`mimtrain knn`: weighted k-nearest-neighbour classification on L2-normalised frozen features (k = 20,
temperature 0.07, as in InstDisc / DINO). The same code (`features.knn_accuracy`) runs every N steps during
pretraining as a progress signal (`engine.monitor`)."""
from __future__ import annotations

from mimtrain.config.classify import EvalConfig
from mimtrain.engine.distributed import make_accelerator
from mimtrain.config.pretrain import to_dict
from mimtrain.engine.rundir import Run
from mimtrain.eval.classify.source import eval_pass, follow_source, frozen_encoder, labelled_shards
from mimtrain.features import knn_accuracy


def knn(cfg: EvalConfig, source: str, random_init: bool = False) -> dict:
    """k-NN evaluation of the encoder in `source` on data.train_shards (the bank) and data.val_shards."""
    acc = make_accelerator(cfg.train.grad_accum, cfg.train.precision, seed=cfg.seed)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    train_urls, val_urls, n_cls = labelled_shards(cfg)
    encoder, spec, pool = frozen_encoder(cfg, source, acc, random_init)
    run = Run(acc, cfg, sources=(source,))  # the same refusals as every command (no steps: nothing to resume)
    try:
        run.start({**to_dict(cfg), "derived": {"task": "knn", "world_size": acc.num_processes, "num_classes": n_cls,
                                               "pool": pool, "random_init": random_init}})
        metrics = knn_accuracy(encoder, eval_pass(cfg, train_urls, acc), eval_pass(cfg, val_urls, acc), pool,
                               n_cls, acc, cfg.knn.k, cfg.knn.temperature, cfg.train.progress)
        return run.finish({"task": "knn", "source": str(source), "encoder": spec.name, "random_init": random_init,
                           "pool": pool, "k": cfg.knn.k, "temperature": cfg.knn.temperature, **metrics})
    finally:
        run.close()
