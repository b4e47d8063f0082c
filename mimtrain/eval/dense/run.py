"""What a dense run does around its model, alike for detection and segmentation: the part of the evaluation set each
process scores, and the trained model written to `final/` (the training batches: `engine.sources.MapSource`)."""
from __future__ import annotations

from pathlib import Path
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from mimtrain.engine.distributed import unwrap


def process_share(n: int, acc: Accelerator) -> list[int]:
    """Indices 0..n-1 of the evaluation set this process scores: strided and unpadded (a DistributedSampler would
    repeat images to even out the shares), so every image counts exactly once in the gathered metrics."""
    return list(range(acc.process_index, n, acc.num_processes))


def save_final(model: nn.Module, run_dir: Path, acc: Accelerator) -> None:
    """The trained detector / segmentor's weights (all of them, encoder included) as
    `run_dir/final/model.safetensors`; the run's config.yaml rebuilds the model they load into. Main process only."""
    if not acc.is_main_process:
        return
    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(acc, model).state_dict().items()}
    save_file(state, str(run_dir / "final" / "model.safetensors"))
