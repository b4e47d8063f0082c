"""`mimtrain bench` and the stand-alone benchmark scripts, one job per module:

- cli: the `bench` subcommand (`add_parser`), the default set, the worker processes it starts, and the merged table
- step: one timed training step in a worker (`python -m mimtrain.bench.step --worker SPEC`)
- hf: HF transformers' ViTMAEForPreTraining at a recipe's sizes (`--compare hf`)
- peak: the bf16 matmul peak of a CUDA device (the MFU denominator)
- decode: JPEG decode / crop / transform images per second (`--decode SHARDS`)
- report: markdown tables, JSON, the command/device/date lines
- flops: parameter and multiply-add counts; model_table: their table (`--table`, `python -m mimtrain.bench.model_table`)
- gpu_check: the plan behind `launch/gpu_check.sh` (parts a-f of one GPU slot, each under its own cap) and the rows it
  writes into docs/benchmarks.md
- attention_layers, photo_shards: `python -m mimtrain.bench.attention_layers` (one attention layer of each kind),
  `python -m mimtrain.bench.photo_shards OUT` (photo-like JPEG shards for `--decode`)
"""
from mimtrain.bench.cli import add_parser, run_bench  # noqa: F401
