"""Configuration: typed dataclass defaults, YAML recipes that state differences, dotted overrides, one merge.
`pretrain` (pretraining, and the shared machinery: ConfigError, merge, load_config), `classify` (finetune, linprobe,
knn), `dense` (detect, segment)."""
