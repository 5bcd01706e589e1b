"""The `Trainer` subclasses of uptraining: stage 1 (`AttentionTransferTrainer`, `LayerTransferTrainer`) and stage 2
with knowledge distillation (`DistillationTrainer`). Each only changes `compute_loss` (and the layer stage its
optimizer groups), so they run under `accelerate launch` as any `Trainer` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .losses import attention_transfer_loss, data_parallel_mean, layer_transfer_loss, stage1_step

# parameter-name fragments of the modules conversion adds
NEW_PARAMETER_NAMES = ("fastattn_feature_map", "fastattn_window_factor")


def _is_new_parameter(name: str) -> bool:
    return any(part in name for part in NEW_PARAMETER_NAMES)


# positions per piece of `distillation_kl`: 256 x a 49K vocabulary is 50 MB per temporary
KL_CHUNK_ROWS = 256


def _kl_rows(student: torch.Tensor, teacher_p: torch.Tensor, teacher_plogp: torch.Tensor, mask: torch.Tensor, t: float):
    """The masked sum over rows of t^2 KL(p || softmax(student / t)), with the teacher's side precomputed: its
    probabilities p and sum_k p_k log p_k per row. KL = sum p log p - sum p s + logsumexp(s) (as sum p = 1), so neither
    log-softmax nor the elementwise KL is materialized; its gradient is softmax(s) - p."""
    s = student.float()
    if t != 1:
        s = s / t
    kl = teacher_plogp - (teacher_p * s).sum(-1) + torch.logsumexp(s, -1)
    return (kl * mask).sum() * (t * t)


def distillation_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = KL_CHUNK_ROWS,
) -> torch.Tensor:
    """`sum over positions of mask * t^2 * KL(softmax(teacher / t) || softmax(student / t))` for logits `[B, N, V]`
    and a mask `[B, N]`, computed `chunk` positions at a time, each piece activation-checkpointed: the
    full-vocabulary temporaries exist for one piece at a time, forward and backward, instead of for the whole batch
    (at 2 x 2048 tokens and 49K words, 0.8 GB each). The teacher's probabilities are computed once per piece outside
    the checkpoint (no gradient; held for the backward, one teacher-logits' worth in all). The same value and
    gradient as the one-piece formula."""
    vocab = student.shape[-1]
    student, teacher, mask = student.reshape(-1, vocab), teacher.reshape(-1, vocab), mask.reshape(-1)
    total = student.new_zeros((), dtype=torch.float32)
    grad = student.requires_grad and torch.is_grad_enabled()
    # split, not a slice per piece: a slice's backward writes its piece into a zero tensor of the whole logits' size
    # (8 x 0.4 GB of zero-fill and addition at 2048 tokens x 49K words), split's backward concatenates the pieces once
    for rows, teacher_rows, rows_mask in zip(student.split(chunk), teacher.split(chunk), mask.split(chunk), strict=True):
        with torch.no_grad():
            scaled = teacher_rows.float() if temperature == 1 else teacher_rows.float() / temperature
            logp = F.log_softmax(scaled, -1)  # finite, unlike log(p) where p underflows
            p = logp.exp()
            plogp = (p * logp).sum(-1)
        rows = (rows, p, plogp, rows_mask, temperature)
        total = total + (checkpoint(_kl_rows, *rows, use_reentrant=False) if grad else _kl_rows(*rows))
    return total


class DistillationTrainer(Trainer):
    """A `Trainer` for stage 2 with knowledge distillation: the loss is
    `(1 - distill_weight) * LM loss + distill_weight * KL(teacher || student)
    + hidden_weight * mean over layers of |h_student - h_teacher|^2 / |h_teacher|^2`, over every non-padded position.
    The last term (hidden-state distillation, as TinyBERT's) matches each layer's output to the teacher's: a denser
    signal per token than the logits alone. The teacher runs on the same batch without gradient (it is put in eval
    mode and moved to the student's device; its weights are not changed)."""

    def __init__(
        self,
        *args,
        teacher: nn.Module,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.hidden_weight = hidden_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if self.distill_weight >= 1:  # the LM loss is not used
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = {"output_hidden_states": True} if self.hidden_weight > 0 else {}
        outputs = model(**inputs, **hidden)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        keys = ("input_ids", "attention_mask", "token_type_ids")
        with torch.no_grad(), self.accelerator.autocast():  # bf16 mixed precision (`args.bf16`) as the student's
            teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k in keys}, **hidden)
        mask = inputs.get("attention_mask")
        mask = torch.ones(outputs.logits.shape[:2], device=device) if mask is None else mask.to(torch.float32)
        use_lm = self.distill_weight < 1 and labels is not None
        loss = (1 - self.distill_weight) * outputs.loss if use_lm else 0.0
        if self.distill_weight > 0:
            kl = distillation_kl(outputs.logits, teacher_out.logits, mask, self.temperature)
            kd = kl / data_parallel_mean(mask.sum()).clamp_min(1)
            loss = loss + (self.distill_weight if use_lm else 1.0) * kd
        if self.hidden_weight > 0:
            pairs = list(zip(outputs.hidden_states[1:], teacher_out.hidden_states[1:], strict=True))
            errors = torch.stack([((s.float() - t.float()) ** 2 * mask[..., None]).sum() for s, t in pairs])
            refs = torch.stack([((t.float() ** 2) * mask[..., None]).sum() for _, t in pairs])
            # each layer's normalizer over the global batch under DDP (one collective for all layers)
            loss = loss + self.hidden_weight * (errors / data_parallel_mean(refs).clamp_min(1e-12)).mean()
        return (loss, outputs) if return_outputs else loss


class AttentionTransferTrainer(Trainer):
    """A `Trainer` for stage 1: the loss is the attention-transfer MSE, plus `score_weight` times Hedgehog's
    attention-score loss (labels, if any, are ignored)."""

    def __init__(self, *args, score_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.score_weight = score_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():  # bf16 mixed precision (`args.bf16`); a no-op without
            loss = attention_transfer_loss(model, inputs, self.score_weight)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # forward and backward in one stage-1 state: activation checkpointing recomputes layers in the backward
        with stage1_step(model, score_weight=self.score_weight):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = attention_transfer_loss(model, self._prepare_inputs(inputs), self.score_weight)
        return loss.detach(), None, None


class LayerTransferTrainer(Trainer):
    """A `Trainer` for the "layer" stage 1: attention modules (projections and feature maps) regressed onto the
    teacher's (`layer_transfer_loss`); the feature maps (`NEW_PARAMETER_NAMES`) train at `map_lr`, the rest at the
    Trainer's learning rate; with `score_weight > 0` Hedgehog's attention-score loss is added."""

    def __init__(
        self, *args, teacher: nn.Module, map_lr: float | None = None, score_weight: float = 0.0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.map_lr = map_lr
        self.score_weight = score_weight

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.map_lr is not None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if not _is_new_parameter(n)], "weight_decay": 0.0},
                {
                    "params": [p for n, p in named if _is_new_parameter(n)],
                    "weight_decay": 0.0,
                    "lr": self.map_lr,
                },
            ]
            groups = [g for g in groups if g["params"]]
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer
        return super().create_optimizer()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with self.accelerator.autocast():  # bf16 mixed precision (`args.bf16`); a no-op without
            loss = layer_transfer_loss(model, self.teacher, inputs, self.score_weight)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # forward and backward in one stage-1 state: activation checkpointing recomputes layers in the backward
        with stage1_step(model, self.teacher, self.score_weight):
            return super().training_step(model, inputs, num_items_in_batch)
