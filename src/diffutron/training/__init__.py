"""Training masked diffusion LMs: one stage (``train``) or a progressive recipe (``run_recipe``).

- ``train(TrainConfig)``: continual pre-training or instruction tuning, full or LoRA, on accelerate
  (CPU, one GPU, DDP, FSDP, DeepSpeed), with exact resume from atomic checkpoints.
- ``run_recipe("recipe.yaml")``: the stages of a YAML pipeline in order (skip finished, resume
  interrupted).
- ``merge_adapter(adapter_dir, output_dir)``: a LoRA adapter merged into a plain checkpoint.
"""

from .config import DataConfig, InitConfig, LoraSettings, TrainConfig, load_train_config
from .lora import apply_lora, merge_adapter
from .loop import TrainResult, train
from .recipe import Recipe, Stage, load_recipe, run_recipe

__all__ = ["train", "run_recipe", "load_recipe", "merge_adapter", "apply_lora", "TrainConfig", "DataConfig",
           "LoraSettings", "InitConfig", "TrainResult", "Recipe", "Stage", "load_train_config"]
