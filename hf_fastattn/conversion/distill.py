"""Uptraining converted models with the HF `Trainer`: attention transfer (stage 1), then LoRA or full fine-tuning.

Stage 1 (Hedgehog / LoLCATs attention transfer): every converted attention layer runs both its softmax attention
(the teacher, no gradient) and its linear attention (the student) on the same q, k, v; the loss is the MSE between
their outputs, averaged over layers, and the teacher's output is passed on so that each layer learns from the
original model's activations. Only the feature maps (and the hybrid's window factors) train.
`AttentionTransferTrainer` is a `Trainer` whose `compute_loss` is that loss; it runs under `accelerate launch`.
Stage 1, "layer" mode (`transfer_mode="layer"`, `LayerTransferTrainer`): the same idea one level up, for any
method (MQA's pooled K/V too): each attention module, projections and maps, is regressed onto the original model's
module output on the same inputs (normalized MSE), the original's outputs fed forward.

Stage 2: ordinary causal-LM (or masked-LM) fine-tuning with `Trainer`, through LoRA adapters (`peft`) on the
attention projections, or of all / attention-only weights (T2R, MQA uptraining); with `distill_weight > 0`
(`DistillationTrainer`) the loss is (partly) the KL divergence to the original model's logits, a denser signal per
token than the next-token labels.

Data helpers: `load_text` (a local text file or a `datasets` name), `lm_dataset` (fixed-length blocks) and
`perplexity` (exact, over every held-out token).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Trainer, TrainingArguments
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ..integration.registry import (
    _is_causal,
    feature_map_of,
    get_options,
    linear_attention_forward,
    padding_mask,
)
from ..ops.reference import allowed_mask, repeat_kv
from .families import attention_modules, family_of

TRANSFER_IMPLEMENTATION = "fastattn_transfer"
# "linear" attention that also stores Hedgehog's attention-score loss on the module (the "layer" stage 1 with
# `transfer_score_weight > 0`)
SCORED_LINEAR_IMPLEMENTATION = "fastattn_scored_linear"
# parameter-name fragments of the modules conversion adds
NEW_PARAMETER_NAMES = ("fastattn_feature_map", "fastattn_window_factor")
STAGES = ("attention_transfer", "lora", "full", "attention")


# ---------------------------------------------------------------------------------------------------------------
# stage 1: the attention-transfer attention function and Trainer


def attention_score_loss(module, query, key, attention_mask, scaling=None, causal=True) -> torch.Tensor:
    """Hedgehog's attention-transfer loss (Zhang et al. 2024): the cross-entropy of the linear attention's weights
    `phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')` against softmax attention's weights on the same q and k (soft
    labels, no gradient), summed over keys and averaged over heads and real (not padded) queries. Its minimum is the
    softmax weights' entropy, reached when the two weightings are equal. Normalized weights below 1e-6 count as 1e-6
    (ReLU features, T2R's, can give a key weight 0; such keys then add no gradient, and on T2R this trained better
    than also pushing the row's sum: 1.042x against 1.050x on the dev teacher of `bench/conversion.py`).

    query `[B, H, N, D]`, key `[B, Hkv, N, D]` (after RoPE, as the attention function gets them), `attention_mask`
    the 2D padding mask `[B, N]` or None. O(N^2) per head, for training lengths.
    """
    fmap = feature_map_of(module, get_options(module.config))
    q, k = query.float(), repeat_kv(key, query.shape[1]).float()
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    pad = None if attention_mask is None else attention_mask.to(torch.bool)
    allowed = allowed_mask(q.shape[2], k.shape[2], causal=causal, padding_mask=pad, device=q.device)
    with torch.no_grad():
        logits = (q @ k.transpose(-1, -2)) * scaling
        target = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).softmax(-1) * allowed
    kmap = getattr(module, "fastattn_feature_map_k", None) or fmap  # a hybrid's separate key map, if any
    weights = (fmap(q) @ kmap(k).transpose(-1, -2)) * allowed
    eps = 1e-6
    log_weights = (weights / weights.sum(-1, keepdim=True).clamp_min(eps)).clamp_min(eps).log()
    ce = -(target * log_weights).sum(-1)  # [B, H, N]
    if pad is None:
        return ce.mean()
    keep = pad[:, None, :].to(ce.dtype)
    return (ce * keep).sum() / (keep.sum() * ce.shape[1]).clamp_min(1)


def transfer_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """Softmax attention (returned, detached) and the converted linear attention (its MSE stored on the module, and
    with `module._fastattn_score_loss` set, the `attention_score_loss` too).

    `attention_mask` is the 2D padding mask `[B, N]` or None (the registered mask function is `padding_mask`).
    """
    student, _ = linear_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal
    )
    causal = _is_causal(module, is_causal)
    mask4d = None
    if attention_mask is not None:
        n = key.shape[2]
        mask4d = attention_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, N]
        if causal:
            mask4d = mask4d & torch.ones(n, n, dtype=torch.bool, device=key.device).tril()
    with torch.no_grad():
        teacher, _ = sdpa_attention_forward(
            module, query, key, value, mask4d, dropout=0.0, scaling=scaling, is_causal=causal, **kwargs
        )
    if mask4d is not None:
        # padded queries have no meaningful target
        keep = attention_mask[:, :, None, None].to(student.dtype)
        module.fastattn_transfer_loss = ((student.float() - teacher.float()) ** 2 * keep).sum() / (
            keep.sum() * student.shape[2] * student.shape[3]
        ).clamp_min(1)
    else:
        module.fastattn_transfer_loss = F.mse_loss(student.float(), teacher.float())
    _store_score_loss(module, query, key, attention_mask, scaling, causal)
    return teacher.detach(), None


def scored_linear_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """"linear" attention, plus `attention_score_loss` stored on the module when it asks for it."""
    out = linear_attention_forward(module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal)
    _store_score_loss(module, query, key, attention_mask, scaling, _is_causal(module, is_causal))
    return out


def _store_score_loss(module, query, key, attention_mask, scaling, causal) -> None:
    if getattr(module, "_fastattn_score_loss", False):
        module.fastattn_score_loss = attention_score_loss(module, query, key, attention_mask, scaling, causal)


def register_transfer_attention() -> None:
    for name, fn in (
        (TRANSFER_IMPLEMENTATION, transfer_attention_forward),
        (SCORED_LINEAR_IMPLEMENTATION, scored_linear_attention_forward),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask)


register_transfer_attention()


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` (possibly DDP- or peft-wrapped) with the attention implementation `name` while inside."""
    base = _unwrap(model)
    previous = base.config._attn_implementation
    base.config._attn_implementation = name
    try:
        yield
    finally:
        base.config._attn_implementation = previous


@contextlib.contextmanager
def attention_transfer(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Run `model` (possibly DDP- or peft-wrapped) with the transfer attention; yields its attention modules."""
    base = _unwrap(model)
    with _attention_implementation(base, TRANSFER_IMPLEMENTATION):
        yield attention_modules(base, family_of(base))


def _check_scorable(model: nn.Module) -> None:
    """`transfer_score_weight > 0` needs plain linear attention, whose weights are phi(q) . phi(k) normalized."""
    base = _unwrap(model)
    implementation = base.config._attn_implementation
    if implementation != "linear" or get_options(base.config).window is not None:
        what = "the sliding-window hybrid" if implementation == "linear" else f"{implementation!r} attention"
        raise ValueError(
            f"transfer_score_weight > 0 compares linear attention's weights with softmax's; this model has {what}. "
            "It applies to models converted with 't2r', 'hedgehog' or 'linear' without hybrid=True; "
            "use transfer_score_weight=0 here"
        )


@contextlib.contextmanager
def _score_losses(modules: list[nn.Module], score_weight: float) -> Iterator[None]:
    """With `score_weight > 0`, the attention functions of `modules` store `attention_score_loss` while inside."""
    for m in modules:
        m._fastattn_score_loss = score_weight > 0
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("_fastattn_score_loss", None)
            m.__dict__.pop("fastattn_score_loss", None)


def _stage1_loss(modules: list[nn.Module], score_weight: float) -> torch.Tensor:
    """The mean over layers of each module's output loss, plus `score_weight` times its attention-score loss."""
    loss = torch.stack([m.__dict__.pop("fastattn_transfer_loss") for m in modules]).mean()
    if score_weight > 0:
        loss = loss + score_weight * torch.stack([m.__dict__.pop("fastattn_score_loss") for m in modules]).mean()
    return loss


def attention_transfer_loss(model: nn.Module, inputs: dict, score_weight: float = 0.0) -> torch.Tensor:
    """The stage-1 loss on one batch: the mean over layers of MSE(linear attention, softmax attention), plus
    `score_weight` times the mean of Hedgehog's `attention_score_loss`."""
    if score_weight > 0:
        _check_scorable(model)
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    extra = {"use_cache": False} if family_of(_unwrap(model)).causal else {}
    with attention_transfer(model) as modules, _score_losses(modules, score_weight):
        model(**inputs, **extra)
        return _stage1_loss(modules, score_weight)


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
        with torch.no_grad():
            teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k in keys}, **hidden)
        mask = inputs.get("attention_mask")
        mask = torch.ones(outputs.logits.shape[:2], device=device) if mask is None else mask.to(torch.float32)
        use_lm = self.distill_weight < 1 and labels is not None
        loss = (1 - self.distill_weight) * outputs.loss if use_lm else 0.0
        if self.distill_weight > 0:
            t = self.temperature
            kl = F.kl_div(
                F.log_softmax(outputs.logits.float() / t, -1),
                F.log_softmax(teacher_out.logits.float() / t, -1),
                log_target=True,
                reduction="none",
            ).sum(-1) * (t * t)
            kd = (kl * mask).sum() / mask.sum().clamp_min(1)
            loss = loss + (self.distill_weight if use_lm else 1.0) * kd
        if self.hidden_weight > 0:
            errors = [
                ((s.float() - t.float()) ** 2 * mask[..., None]).sum()
                / ((t.float() ** 2) * mask[..., None]).sum().clamp_min(1e-12)
                for s, t in zip(outputs.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)
            ]
            loss = loss + self.hidden_weight * torch.stack(errors).mean()
        return (loss, outputs) if return_outputs else loss


class AttentionTransferTrainer(Trainer):
    """A `Trainer` for stage 1: the loss is the attention-transfer MSE, plus `score_weight` times Hedgehog's
    attention-score loss (labels, if any, are ignored)."""

    def __init__(self, *args, score_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.score_weight = score_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = attention_transfer_loss(model, inputs, self.score_weight)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = attention_transfer_loss(model, self._prepare_inputs(inputs), self.score_weight)
        return loss.detach(), None, None


def _is_new_parameter(name: str) -> bool:
    return any(part in name for part in NEW_PARAMETER_NAMES)


@contextlib.contextmanager
def layer_transfer(model: nn.Module, teacher: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside: a forward of `model` (possibly DDP- or peft-wrapped) regresses each attention module's output onto
    that of the teacher's matching module, run on the same batch just before (`layer_transfer_loss`); yields the
    converted model's attention modules, each holding `fastattn_transfer_loss` after a forward.

    Every attention module's output is replaced by the teacher's, so the residual stream stays the teacher's: with
    the other weights frozen (they equal the teacher's), each attention module sees exactly the teacher's inputs.
    """
    base, tbase = _unwrap(model), _unwrap(teacher)
    modules = attention_modules(base, family_of(base))
    targets = attention_modules(tbase, family_of(tbase))
    if len(modules) != len(targets):
        raise ValueError(
            f"the teacher has {len(targets)} attention modules, the converted model {len(modules)}"
        )
    outputs: dict[int, torch.Tensor] = {}

    def capture(i):
        def hook(module, args, output):
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def regress(i):
        def hook(module, args, output):
            student = output[0] if isinstance(output, tuple) else output
            target = outputs.pop(i)
            mask = getattr(module, "_fastattn_token_mask", None)
            err = (student.float() - target.float()) ** 2
            ref = target.float() ** 2
            if mask is not None:
                err, ref = err * mask[..., None], ref * mask[..., None]
            # normalized MSE: the same scale in every layer
            module.fastattn_transfer_loss = err.sum() / ref.sum().clamp_min(1e-12)
            return (target, *output[1:]) if isinstance(output, tuple) else target

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(targets)]
    handles += [m.register_forward_hook(regress(i)) for i, m in enumerate(modules)]
    try:
        yield modules
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            m.__dict__.pop("_fastattn_token_mask", None)


def layer_transfer_loss(
    model: nn.Module, teacher: nn.Module, inputs: dict, score_weight: float = 0.0
) -> torch.Tensor:
    """The "layer" stage-1 loss on one batch: the mean over attention modules of the normalized MSE
    `|student - teacher|^2 / |teacher|^2` of the module outputs (padded tokens excluded), the teacher's module
    outputs fed forward (see `layer_transfer`); plus `score_weight` times the mean of Hedgehog's
    `attention_score_loss` on the converted modules' own q and k (linear attention only)."""
    if score_weight > 0:
        _check_scorable(model)
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    extra = {"use_cache": False} if family_of(_unwrap(model)).causal else {}
    with layer_transfer(model, teacher) as modules, _score_losses(modules, score_weight):
        mask = inputs.get("attention_mask")
        for m in modules:
            m._fastattn_token_mask = None if mask is None else mask.float()
        with torch.no_grad():
            teacher(**inputs, **extra)
        scored = score_weight > 0
        with _attention_implementation(model, SCORED_LINEAR_IMPLEMENTATION) if scored else contextlib.nullcontext():
            model(**inputs, **extra)
        return _stage1_loss(modules, score_weight)


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
        loss = layer_transfer_loss(model, self.teacher, inputs, self.score_weight)
        return (loss, None) if return_outputs else loss


# ---------------------------------------------------------------------------------------------------------------
# which parameters train in each stage


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
    """Wrap `model` with peft LoRA adapters on the attention projections (q, k, v, o) of its family."""
    from peft import LoraConfig, get_peft_model

    family = family_of(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=dropout,
        target_modules=family.lora_targets,
        fan_in_fan_out=family.name == "gpt2",
    )
    peft_model = get_peft_model(model, config)
    set_trainable(peft_model, "lora")
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# data and evaluation


def load_text(path_or_name: str, split: str = "train", text_column: str = "text") -> str:
    """The text of a local file, or of a `datasets` dataset (name or local dataset directory), joined by newlines."""
    import datasets

    if os.path.isfile(path_or_name):
        with open(path_or_name, encoding="utf-8") as f:
            return f.read()
    try:
        ds = datasets.load_dataset(path_or_name, split=split)
    except Exception as e:  # datasets raises many types for a bad name / no network
        raise ValueError(
            f"cannot load text from {path_or_name!r}: not a file, and datasets failed: {e}"
        ) from e
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset {path_or_name!r} has no column {text_column!r}; columns: {ds.column_names}"
        )
    return "\n".join(ds[text_column])


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation): the last `val_fraction` of the text is held out."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def lm_dataset(text: str, tokenizer, seq_len: int, max_blocks: int | None = None):
    """`datasets.Dataset` of consecutive `seq_len`-token blocks (input_ids, attention_mask, labels)."""
    import datasets

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * seq_len] * n, "labels": [list(b) for b in blocks]}
    )


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8) -> float:
    """Exact perplexity of a causal LM on `text`: every token after the first of each non-overlapping
    `seq_len` window is scored (the tail shorter than a window included); exp(total NLL / tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return perplexity_of_ids(model, ids, seq_len, batch_size)


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """`perplexity` on token ids `[T]` already made."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    full = [w for w in windows if len(w) == seq_len]
    rest = [w for w in windows if len(w) != seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in rest]
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / max(count, 1))


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
    transfer_score_weight: stage 1: weight of Hedgehog's attention-score loss (`attention_score_loss`: linear
        attention's weights against softmax's, cross-entropy) added to the output MSE, in either mode; linear
        attention with a feature map only (t2r, hedgehog, linear), not the hybrid; 0: none.
    weight_decay: stage 2 AdamW weight decay (stage 1, the feature maps, never decays).
    lr_scheduler: the Trainer's `lr_scheduler_type` of both stages ("cosine", "linear", "constant_with_warmup").
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
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def uptrain(
    model: nn.Module, train_dataset, cfg: UptrainConfig, data_collator=None, teacher: nn.Module | None = None
) -> nn.Module:
    """Run the recipe on a converted model: stage 1 (if `transfer_steps`), then stage 2 (if `finetune_steps`).

    `teacher` (the original model, left untouched) is needed for `transfer_mode="layer"` and for
    `distill_weight > 0` or `distill_hidden_weight > 0` (stage 2 then distills its logits / hidden states).

    Returns the trained model with LoRA merged (a plain converted model, ready for `save_pretrained`).
    """
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
        LayerTransferTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            teacher=teacher,
            map_lr=cfg.transfer_lr if has_maps else None,
            score_weight=cfg.transfer_score_weight,
        ).train()
    elif cfg.transfer_steps and has_maps:
        set_trainable(model, "attention_transfer")
        args = training_arguments(
            cfg, cfg.transfer_steps, cfg.transfer_lr, "attention_transfer", batch_size=cfg.transfer_batch_size
        )
        AttentionTransferTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            score_weight=cfg.transfer_score_weight,
        ).train()
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
        trainer.train()
        if cfg.finetune == "lora":
            model = target.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
