"""Configuration: typed dataclass defaults, YAML recipes that state differences, dotted overrides, one merge.
`pretrain` (pretraining, and the shared machinery: merge, load_config, derive), `classify` (finetune, linprobe,
knn), `dense` (detect, segment), `ranges` (the valid range declared with each numeric field, and its one checker),
`errors` (the user-error classes every layer raises), `reference` (docs/config.md, generated from the fields)."""
