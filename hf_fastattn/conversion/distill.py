"""Uptraining converted models with the HF `Trainer`: attention transfer (stage 1), then LoRA or full fine-tuning.

This module re-exports the uptraining API, which lives in four modules with one job each:

- `losses`: the stage-1 losses and the attention functions they run through (attention transfer, layer transfer,
  Hedgehog's attention-score loss);
- `trainers`: the `Trainer` subclasses (`AttentionTransferTrainer`, `LayerTransferTrainer`, `DistillationTrainer`);
- `uptraining`: the recipe runner (`UptrainConfig`, `uptrain`, `training_arguments`) and which parameters train in
  each stage (`set_trainable`, `add_lora`);
- `data`: `load_text`, `split_text`, `lm_dataset`, `perplexity`, `perplexity_of_ids`.

`from hf_fastattn.conversion.distill import ...` keeps working for every name; new code may import from those
modules directly. (Patch a function where it is used, e.g. `losses.attention_score_loss`, not here.)
"""

from .data import lm_dataset, load_text, perplexity, perplexity_of_ids, split_text

# private helpers that callers imported from here before the split
from .losses import (  # noqa: F401, E402
    SCORED_LINEAR_IMPLEMENTATION,
    TRANSFER_IMPLEMENTATION,
    _attention_implementation,
    _check_scorable,
    _score_losses,
    _stage1_loss,
    _store_score_loss,
    _unwrap,
    attention_score_loss,
    attention_transfer,
    attention_transfer_loss,
    layer_transfer,
    layer_transfer_loss,
    register_transfer_attention,
    scored_linear_attention_forward,
    transfer_attention_forward,
)
from .trainers import (
    NEW_PARAMETER_NAMES,
    AttentionTransferTrainer,
    DistillationTrainer,
    LayerTransferTrainer,
    _is_new_parameter,  # noqa: F401, E402
)
from .uptraining import STAGES, UptrainConfig, add_lora, set_trainable, training_arguments, uptrain

__all__ = [
    "NEW_PARAMETER_NAMES",
    "SCORED_LINEAR_IMPLEMENTATION",
    "STAGES",
    "TRANSFER_IMPLEMENTATION",
    "AttentionTransferTrainer",
    "DistillationTrainer",
    "LayerTransferTrainer",
    "UptrainConfig",
    "add_lora",
    "attention_score_loss",
    "attention_transfer",
    "attention_transfer_loss",
    "layer_transfer",
    "layer_transfer_loss",
    "lm_dataset",
    "load_text",
    "perplexity",
    "perplexity_of_ids",
    "register_transfer_attention",
    "scored_linear_attention_forward",
    "set_trainable",
    "split_text",
    "training_arguments",
    "transfer_attention_forward",
    "uptrain",
]
