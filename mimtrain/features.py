"""Frozen features and what is measured on them: pooling, extraction over a labelled pass, top-k accuracy and
weighted k-NN classification. One implementation, used by the pretraining k-NN monitor (`engine.monitor`),
`mimtrain knn`, the linear probe and fine-tuning's validation."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimtrain.config.pretrain import ConfigError


def resolve_pool(cfg_pool: str, model: nn.Module, default_cls: bool) -> str:
    """encoder.pool (auto|avg|cls) -> "avg" or "cls"; auto takes the class token where the encoder has one and
    `default_cls` (linear probe, k-NN: MAE's protocol), the average of the last map otherwise."""
    if cfg_pool == "auto":
        return "cls" if default_cls and model.has_class_token else "avg"
    if cfg_pool not in ("avg", "cls"):
        raise ConfigError(f"encoder.pool must be auto|avg|cls, got '{cfg_pool}'")
    if cfg_pool == "cls" and not model.has_class_token:
        raise ConfigError(f"encoder.pool=cls needs a class token; {type(model).__name__} has none (use avg)")
    return cfg_pool


def pooled(model: nn.Module, x: Tensor, pool: str) -> Tensor:
    """x: [B, 3, H, W] -> [B, C]: the class token (ViT) or the global average of the last feature map."""
    if pool == "cls":
        return model.forward_cls(x)
    return model.forward_features(x).mean(dim=(2, 3))


def logits(model: nn.Module, x: Tensor, pool: str) -> Tensor:
    """x: [B, 3, H, W] -> [B, classes] through the encoder's own head; "cls" feeds the class token as a 1x1 map,
    which the head's global average leaves unchanged."""
    if pool == "cls":
        return model.forward_head(model.forward_cls(x)[:, :, None, None])
    return model(x)


def topk_correct(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """scores: [B, K], labels: [B] -> correct counts per k (k clipped to the number of classes)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def accuracies(top1_correct: float, top5_correct: float, n: int, classes: int) -> dict:
    """Correct counts over n samples -> {"top1", "top5"} in %. With fewer than 5 classes every label is in the top 5,
    so top-5 is not applicable: None (printed "n/a"), never a meaningless 100%."""
    n = max(n, 1)
    return {"top1": 100.0 * top1_correct / n, "top5": 100.0 * top5_correct / n if classes >= 5 else None}


def score(scores: Tensor, labels: Tensor, classes: int) -> dict:
    """scores [N, classes], labels [N] -> {"top1", "top5", "num_val"}."""
    c1, c5 = topk_correct(scores.float(), labels)
    return {**accuracies(c1.item(), c5.item(), len(labels), classes), "num_val": len(labels)}


@torch.no_grad()
def evaluate(score_fn: Callable[[Tensor], Tensor], batches: Iterable[dict], acc) -> dict:
    """Top-1/top-5 (%) of `score_fn(images) -> [B, classes]` over one labelled pass, summed over processes."""
    counts, classes = torch.zeros(3, device=acc.device), 0
    for batch in batches:
        x, y = batch["images"].to(acc.device), batch["label"].to(acc.device)
        with acc.autocast():
            scores = score_fn(x)
        c1, c5 = topk_correct(scores.float(), y)
        classes = scores.shape[1]
        counts += torch.stack([c1.float(), c5.float(), torch.tensor(float(len(y)), device=acc.device)])
    counts = acc.reduce(counts, "sum")
    return {**accuracies(counts[0].item(), counts[1].item(), int(counts[2]), classes), "num_val": int(counts[2])}


@torch.no_grad()
def extract(encoder: nn.Module, batches: Iterable[dict], pool: str, acc, desc: str = "features",
            progress: bool = True) -> tuple[Tensor, Tensor]:
    """Pooled features and labels of one labelled pass, gathered from every process: ([N, C] fp32, [N]).
    A progress bar (images, rate) shows on the main process: a pass over a large bank takes minutes."""
    feats, labels = [], []
    bar = tqdm(desc=desc, unit="img", disable=not (acc.is_main_process and progress), leave=False)
    for batch in batches:
        bar.update(len(batch["label"]))
        with acc.autocast():
            feats.append(pooled(encoder, batch["images"].to(acc.device), pool).float())
        labels.append(batch["label"].to(acc.device))
    bar.close()
    f, y = torch.cat(feats), torch.cat(labels)
    if acc.num_processes > 1:  # unequal shares per process: gather_for_metrics is not meant for this, objects are
        from accelerate.utils import gather_object
        parts = gather_object([(f.cpu(), y.cpu())])
        f, y = torch.cat([p[0] for p in parts]).to(acc.device), torch.cat([p[1] for p in parts]).to(acc.device)
    return f, y


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, feats: Tensor, n_cls: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Class scores of `feats` from their k nearest training features (cosine similarity), as in InstDisc / DINO.

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


def knn_accuracy(encoder: nn.Module, bank: Iterable[dict], queries: Iterable[dict], pool: str, n_cls: int, acc,
                 k: int = 20, temperature: float = 0.07, progress: bool = True) -> dict:
    """Top-1/top-5 (%) of weighted k-NN: `encoder`'s pooled features of the bank pass classify the queries'."""
    f_train, y_train = extract(encoder, bank, pool, acc, "k-NN bank", progress)
    f_val, y_val = extract(encoder, queries, pool, acc, "k-NN queries", progress)
    scores = knn_classify(f_train, y_train, f_val, n_cls, k, temperature)
    return {**score(scores, y_val, n_cls), "num_train": len(y_train)}
