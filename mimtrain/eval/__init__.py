"""Evaluation tasks, each a loss, an evaluate and a recipe run by `engine.fit`: `classify/` (fine-tuning, linear
probing, k-NN) and `dense/` (COCO detection, ADE20K segmentation)."""
