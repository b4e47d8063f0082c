"""Evaluation: encoder export and strict loading, ImageNet-style fine-tuning, linear probing and k-NN."""
