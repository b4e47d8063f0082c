"""Classification transfer: `finetune` (end to end), `linprobe` (linear head on frozen features), `knn`; `source`
holds what the three read (the source's preprocessing, labelled shards, the encoder from a checkpoint)."""
