"""The uptraining recipe runner: `UptrainConfig`, `uptrain` (stage 1, then LoRA or full fine-tuning with the HF
`Trainer`), `training_arguments`, and which parameters train in each stage (`set_trainable`, `add_lora`).

Stage 1 is attention transfer or layer transfer (`losses`, `trainers`); stage 2 ordinary causal-LM (or masked-LM)
fine-tuning through LoRA adapters (`peft`) on the attention projections, or of all / attention-only weights; with
`distill_weight > 0` (`DistillationTrainer`) the loss is (partly) the KL divergence to the original model's logits.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..ops.memory import reuse_freed_memory
from .families import attention_modules, family_of
from .losses import _unwrap
from .sharding import gather
from .trainers import (
    NEW_PARAMETER_NAMES,
    AttentionTransferTrainer,
    DistillationTrainer,
    LayerTransferTrainer,
    _is_new_parameter,
)

STAGES = ("attention_transfer", "lora", "full", "attention")
# the `gradient_checkpointing` value that checkpoints stage 2 only (the recipes' automatic rule picks it for short blocks)
CHECKPOINT_STAGE2_ONLY = "finetune"

# ---------------------------------------------------------------------------------------------------------------
# which parameters train in each stage


def native_bf16() -> tuple[bool, str]:
    """(whether this machine's training device computes bfloat16 matrix products natively, why): a CUDA GPU with
    bfloat16 support, or a CPU with AVX512-BF16 or AMX (where oneDNN's bfloat16 products run about twice as fast as
    float32's: SmolLM2-135M's forward and backward over 2 x 2048 tokens, 2 cores of an AMD EPYC with AVX512-BF16,
    43.9 s in float32, 28.7 s under bfloat16 autocast). Elsewhere bfloat16 is emulated and slower than float32."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bfloat16"
    features = [
        name
        for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        if getattr(torch.cpu, probe, lambda: False)()
    ]
    if features:
        return True, f"this CPU computes bfloat16 natively ({' and '.join(features)})"
    return False, "this CPU has no native bfloat16 (AVX512-BF16 or AMX): float32"


def set_trainable(model: nn.Module, stage: str) -> list[str]:
    """Freeze everything but what `stage` trains; returns the trainable parameter names.

    Stages: "attention_transfer" (the new feature maps / window factors), "full" (every weight), "attention" (the
    attention modules, with their maps), "lora" (the LoRA adapters of a peft model: call after `add_lora`).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; valid stages are {list(STAGES)}")
    base = _unwrap(model)
    family = family_of(base)
    attention = {id(p) for m in attention_modules(base, family) for p in m.parameters()}
    for name, p in model.named_parameters():
        if stage == "attention_transfer":
            p.requires_grad_(any(part in name for part in NEW_PARAMETER_NAMES))
        elif stage == "full":
            p.requires_grad_(True)
        elif stage == "attention":
            p.requires_grad_(id(p) in attention)
        else:
            p.requires_grad_("lora_" in name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"stage {stage!r} has no trainable parameters in {type(base).__name__}")
    return trainable


def add_lora(model: nn.Module, rank: int = 8, alpha: int | None = None, dropout: float = 0.0):
    """Wrap `model` with peft LoRA adapters on the attention projections (q, k, v, o) of its family.

    `fan_in_fan_out` (peft: the base weight is stored [in, out]) is set when the targeted projections are
    transformers' `Conv1D` (GPT-2 and the models built on its blocks), whatever the family is called."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    family = family_of(model)
    # peft matches a string `target_modules` against full module names with re.fullmatch
    targets = [m for name, m in model.named_modules() if re.fullmatch(family.lora_targets, name)]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=dropout,
        target_modules=family.lora_targets,
        fan_in_fan_out=bool(targets) and all(isinstance(m, Conv1D) for m in targets),
    )
    peft_model = get_peft_model(model, config)
    set_trainable(peft_model, "lora")
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class UptrainConfig:
    """Args:
    transfer_steps: stage-1 steps (0 to skip).
    transfer_lr: stage-1 learning rate of the feature maps.
    transfer_mode: stage 1: "attention" (Hedgehog / LoLCATs attention transfer: only the feature maps train, on the
        MSE of the attention function's outputs against softmax on the same q, k, v; t2r and hedgehog only) or
        "layer" (each attention module, projections and maps, regressed onto the teacher's module output, see
        `layer_transfer`; any method, e.g. mqa; needs `uptrain(..., teacher=)`).
    transfer_proj_lr: "layer" stage-1 learning rate of the attention projections.
    finetune: stage 2: "lora", "full", "attention" or "none".
    finetune_steps: stage-2 steps.
    finetune_lr: stage-2 learning rate.
    lora_rank: LoRA rank for finetune="lora".
    batch_size: global batch size (split over processes under accelerate).
    transfer_batch_size: stage-1 global batch size (None: `batch_size`).
    seed: data order and init seed.
    output_dir: Trainer output (safetensors checkpoints when save_steps > 0).
    save_steps: checkpoint every N steps (0: none).
    warmup_steps: linear warmup of each stage.
    logging_steps: Trainer logging period.
    distill_weight: stage 2 loss weight of the KL divergence to the teacher's logits (knowledge distillation;
        needs `uptrain(..., teacher=)`); 0: the plain LM loss, 1: distillation only.
    distill_hidden_weight: stage 2: weight of a hidden-state distillation term added to that loss, the normalized
        MSE of each layer's output against the teacher's (see `DistillationTrainer`; needs the teacher); 0: none.
    transfer_score_weight: stage 1: weight of Hedgehog's attention-score loss added to the output MSE: linear
        attention with a feature map (t2r, hedgehog, linear; not the hybrid), in either mode
        (`attention_score_loss`: its weights against softmax's, cross-entropy), or softmax attention with pooled
        K/V heads (mqa, gqa) in layer transfer (`softmax_score_loss`: its weights against the original's, KL, on
        every 8th query); 0: none.
    weight_decay: stage 2 AdamW weight decay (stage 1, the feature maps, never decays).
    lr_scheduler: the Trainer's `lr_scheduler_type` of both stages ("cosine", "linear", "constant_with_warmup").
    gradient_checkpointing: activation checkpointing of the decoder layers in both stages (transformers'
        `activation_checkpointing_enable`, non-reentrant `torch.utils.checkpoint`): each layer's activations are
        recomputed in the backward instead of kept, for long blocks (see `benchmarks/bench_uptrain_memory.py`);
        the same gradients, about one more forward of compute. Stage 2 enables the input embeddings' gradients as
        transformers does for peft; stage 1 does not (no gradient crosses layers there). Turned off again after.
        `CHECKPOINT_STAGE2_ONLY` ("finetune"): stage 2 only (stage 1, fed the original's inputs, keeps little for its
        backward, while checkpointing recomputes whole layers, softmax attention and MLP included).
    bf16: bfloat16 mixed precision in both stages (`TrainingArguments.bf16`: accelerate's autocast around the
        model's forward; the trainers run the teacher and stage 1's losses under it too). Weights, gradients,
        optimizer state and the losses' reductions stay float32. See `native_bf16` for where it pays.
    """

    transfer_steps: int = 0
    transfer_lr: float = 1e-2
    transfer_mode: str = "attention"
    transfer_proj_lr: float = 1e-3
    finetune: str = "lora"
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    lora_rank: int = 8
    batch_size: int = 8
    transfer_batch_size: int | None = None
    seed: int = 0
    output_dir: str = "fastattn-uptrain"
    save_steps: int = 0
    warmup_steps: int = 0
    logging_steps: int = 10
    distill_weight: float = 0.0
    distill_hidden_weight: float = 0.0
    transfer_score_weight: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    gradient_checkpointing: bool | str = False
    bf16: bool = False

    def __post_init__(self):
        if self.finetune not in ("lora", "full", "attention", "none"):
            raise ValueError(f"finetune must be 'lora', 'full', 'attention' or 'none', got {self.finetune!r}")
        for name in ("transfer_steps", "finetune_steps", "save_steps", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.transfer_batch_size is None:
            self.transfer_batch_size = self.batch_size
        for name in ("batch_size", "transfer_batch_size", "lora_rank", "logging_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("transfer_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.transfer_mode not in ("attention", "layer"):
            raise ValueError(f"transfer_mode must be 'attention' or 'layer', got {self.transfer_mode!r}")
        if not self.transfer_proj_lr > 0:
            raise ValueError(f"transfer_proj_lr must be > 0, got {self.transfer_proj_lr!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        for name in ("distill_hidden_weight", "transfer_score_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be True or False, got {self.bf16!r}")
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != CHECKPOINT_STAGE2_ONLY:
            raise ValueError(
                "gradient_checkpointing must be True, False or 'finetune' (stage 2 only), got "
                f"{self.gradient_checkpointing!r}"
            )


def training_arguments(
    cfg: UptrainConfig,
    steps: int,
    lr: float,
    subdir: str,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
) -> TrainingArguments:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch_size = batch_size or cfg.batch_size
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
    return TrainingArguments(
        output_dir=os.path.join(cfg.output_dir, subdir),
        max_steps=steps,
        per_device_train_batch_size=batch_size // world,
        learning_rate=lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


@contextlib.contextmanager
def activation_checkpointing(
    model: nn.Module, enabled: bool = True, input_grads: bool = True
) -> Iterator[None]:
    """Inside (if `enabled`): `model`'s decoder layers are activation-checkpointed with non-reentrant
    `torch.utils.checkpoint` (transformers' `activation_checkpointing_enable`, which also makes the input embeddings'
    output require grad, as peft needs for adapters on frozen layers; `input_grads=False` undoes that: stage 1 has
    no gradient across layers, and that flag would make its backward run through every layer). Off again after."""
    if not enabled:
        yield
        return
    base = _unwrap(model)
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    enable({"use_reentrant": False})
    if not input_grads:
        base.disable_input_require_grads()
    try:
        yield
    finally:
        disable()
        base.disable_input_require_grads()


def uptrain(
    model: nn.Module, train_dataset, cfg: UptrainConfig, data_collator=None, teacher: nn.Module | None = None
) -> nn.Module:
    """Run the recipe on a converted model: stage 1 (if `transfer_steps`), then stage 2 (if `finetune_steps`).

    `teacher` (the original model, left untouched) is needed for `transfer_mode="layer"` and for
    `distill_weight > 0` or `distill_hidden_weight > 0` (stage 2 then distills its logits / hidden states).

    Returns the trained model with LoRA merged (a plain converted model, ready for `save_pretrained`).

    Large CPU tensors are served from malloc's heap while it runs (`ops.memory.reuse_freed_memory`: each step's
    logits and activations reuse the last step's memory instead of faulting in fresh pages).
    """
    with reuse_freed_memory():
        return _uptrain(model, train_dataset, cfg, data_collator, teacher)


def _train(trainer: Trainer) -> nn.Module:
    """`trainer.train()`; returns the trained model as it was before: under `bf16` accelerate wraps the model's
    `forward` in autocast, and left there the returned model would keep computing in bfloat16 (its K/V cache too);
    it marks the model prepared (`_is_accelerate_prepared`), which would make the next stage's `Trainer` take it as
    it is, without its own autocast (stage 2 after stage 1 then ran in float32: 38-44 s per step on SmolLM2 instead
    of 29); and under FSDP its weights are shards, which `sharding.gather` makes whole again (a plain model, for the
    next stage to shard again, for LoRA's merge and for `save_pretrained`)."""
    try:
        trainer.train()
    finally:
        wrapped = trainer.model_wrapped
        model = trainer.accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        for prepared in (wrapped, model):  # the DDP wrapper, if any, and the model itself
            prepared.__dict__.pop("_is_accelerate_prepared", None)
    return gather(model)


def _uptrain(model: nn.Module, train_dataset, cfg: UptrainConfig, data_collator, teacher) -> nn.Module:
    has_maps = any(_is_new_parameter(n) for n, _ in model.named_parameters())
    distills = cfg.distill_weight > 0 or cfg.distill_hidden_weight > 0
    needs_teacher = (cfg.transfer_steps and cfg.transfer_mode == "layer") or (
        cfg.finetune_steps and cfg.finetune != "none" and distills
    )
    if needs_teacher and teacher is None:
        raise ValueError(
            "transfer_mode='layer', distill_weight > 0 and distill_hidden_weight > 0 need the original model: "
            "uptrain(..., teacher=)"
        )
    if cfg.transfer_steps and cfg.transfer_mode == "layer":
        set_trainable(model, "attention")
        args = training_arguments(
            cfg,
            cfg.transfer_steps,
            cfg.transfer_proj_lr,
            "layer_transfer",
            batch_size=cfg.transfer_batch_size,
        )
        trainer = LayerTransferTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            teacher=teacher,
            map_lr=cfg.transfer_lr if has_maps else None,
            score_weight=cfg.transfer_score_weight,
        )
        with activation_checkpointing(model, cfg.gradient_checkpointing is True, input_grads=False):
            model = _train(trainer)
    elif cfg.transfer_steps and has_maps:
        set_trainable(model, "attention_transfer")
        args = training_arguments(
            cfg, cfg.transfer_steps, cfg.transfer_lr, "attention_transfer", batch_size=cfg.transfer_batch_size
        )
        trainer = AttentionTransferTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            score_weight=cfg.transfer_score_weight,
        )
        with activation_checkpointing(model, cfg.gradient_checkpointing is True, input_grads=False):
            model = _train(trainer)
    if cfg.finetune_steps and cfg.finetune != "none":
        target = add_lora(model, cfg.lora_rank) if cfg.finetune == "lora" else model
        if cfg.finetune != "lora":
            set_trainable(model, cfg.finetune)
        args = training_arguments(cfg, cfg.finetune_steps, cfg.finetune_lr, "finetune", cfg.weight_decay)
        if distills:
            trainer = DistillationTrainer(
                model=target,
                args=args,
                train_dataset=train_dataset,
                data_collator=data_collator,
                teacher=teacher,
                distill_weight=cfg.distill_weight,
                hidden_weight=cfg.distill_hidden_weight,
            )
        else:
            trainer = Trainer(
                model=target, args=args, train_dataset=train_dataset, data_collator=data_collator
            )
        with activation_checkpointing(target, bool(cfg.gradient_checkpointing)):
            target = _train(trainer)
        model = target.merge_and_unload() if cfg.finetune == "lora" else target
    for p in model.parameters():
        p.requires_grad_(True)
    return model
