"""Stage-1 losses of uptraining: attention transfer and layer transfer.

Attention transfer (Hedgehog / LoLCATs): every converted attention layer runs both its softmax attention (the
teacher, no gradient) and its linear attention (the student) on the same q, k, v through the attention function
`transfer_attention_forward` (registered as `TRANSFER_IMPLEMENTATION`); the loss is the MSE between their outputs,
averaged over layers, and the teacher's output is passed on so that each layer learns from the original model's
activations (`attention_transfer_loss`). Layer transfer (`layer_transfer_loss`): each attention module, projections
and maps, is regressed onto the original model's module output on the same inputs (normalized MSE), the original's
outputs fed forward. Hedgehog's attention-score loss (`attention_score_loss`) can be added to either.

Both store a per-module loss on the attention module during the forward and read it after. With activation
(gradient) checkpointing (`UptrainConfig.gradient_checkpointing`) the backward recomputes each checkpointed decoder
layer's forward, which must run the same attention function, hooks and score-loss flags as the forward did:
`stage1_step` holds that state over a whole training step (the stage-1 trainers use it), and a recomputed forward
stores nothing (`_in_backward`), so no loss of a recomputation outlives it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from ..integration.registry import (
    _is_causal,
    feature_map_of,
    get_options,
    linear_attention_forward,
    padding_mask,
)
from ..ops.common import allowed_mask, repeat_kv
from .families import attention_modules, family_of
from .sharding import is_sharded, whole_tensor

TRANSFER_IMPLEMENTATION = "fastattn_transfer"
# "linear" attention that also stores Hedgehog's attention-score loss on the module (the "layer" stage 1 with
# `transfer_score_weight > 0`)
SCORED_LINEAR_IMPLEMENTATION = "fastattn_scored_linear"
# parameter-name fragments of the modules conversion adds


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
        loss = ((student.float() - teacher.float()) ** 2 * keep).sum() / (
            keep.sum() * student.shape[2] * student.shape[3]
        ).clamp_min(1)
    else:
        loss = F.mse_loss(student.float(), teacher.float())
    if not _in_backward():
        module.fastattn_transfer_loss = loss
    score = _store_score_loss(module, query, key, attention_mask, scaling, causal)
    return _routed(module, teacher.detach(), loss, score), None


def scored_linear_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """ "linear" attention, plus `attention_score_loss` stored on the module when it asks for it."""
    out = linear_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal
    )
    _store_score_loss(module, query, key, attention_mask, scaling, _is_causal(module, is_causal))
    return out


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward called then is an activation-checkpointed layer being
    recomputed, whose stage-1 losses were already read (storing them again would keep the recomputation's graph)."""
    return torch._C._current_graph_task_id() != -1


def data_parallel_mean(x: torch.Tensor) -> torch.Tensor:
    """`x`, a statistic of this process's batch, averaged over the data-parallel processes (itself in one process,
    and when no gradient is taken: then only the loss's value is wanted, perhaps on one process only). A loss
    normalized by a sum over its batch (`|s - t|^2 / |t|^2`, or by a token count) divides by this mean instead of
    its own sum: DDP's average of the processes' gradients is then the gradient of the loss over the global batch,
    which is what one process computes on it."""
    if not torch.is_grad_enabled() or not dist.is_available() or not dist.is_initialized():
        return x
    world = dist.get_world_size()
    if world == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / world


def _store_score_loss(module, query, key, attention_mask, scaling, causal) -> torch.Tensor | None:
    """Compute and store `attention_score_loss` on `module` if it asks for it (returned, else None)."""
    if not getattr(module, "_fastattn_score_loss", False):
        return None
    loss = attention_score_loss(module, query, key, attention_mask, scaling, causal)
    if not _in_backward():
        module.fastattn_score_loss = loss
    return loss


# ---------------------------------------------------------------------------------------------------------------
# stage 1 under FSDP: the losses travel through the layers' outputs
#
# Stage 1 takes its losses inside each attention module and passes the original's output on, so no gradient crosses
# a decoder layer's output. FSDP (torch's FSDP2, `fully_shard` per decoder layer) re-gathers a layer's parameters for
# the backward, and reduces their gradients after, from hooks on the layer's outputs and inputs: with nothing flowing
# there, attention transfer got no gradient at all and layer transfer's backward met freed parameters (checked on 2
# CPU processes). So on a sharded model each module's loss is attached to the output it passes on (`_Attach`: an
# identity whose backward also hands the loss its gradient) and the step's loss is read out through the model's last
# hidden state (`_Readout`: the loss's value, whose backward sends zeros into the model): the backward then walks the
# layers from the last to the first, through FSDP's hooks, and reaches each module's loss inside its own layer. The
# same technique as Megatron's auxiliary losses (`MoEAuxLossAutoScaler`). The gradients are those of the plain path
# (tested against one process); the price is a backward through the layers' residual stream (and, in attention
# transfer, through their frozen MLPs) that the plain path skips. Off a sharded model nothing changes.


class LossRoute:
    """The weights of one stage-1 loss through the model (`1 / layers` for each module's output loss, `score_weight /
    layers` for its score loss) and the gradient of the step's loss, set by `_Readout`'s backward before any
    `_Attach` backward runs (they all lie upstream of it)."""

    def __init__(self, layers: int, score_weight: float):
        self.weight = 1.0 / layers
        self.score_weight = score_weight
        self.grad: torch.Tensor | None = None


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, loss, route):
        ctx.route, ctx.loss_shape, ctx.loss_dtype = route, loss.shape, loss.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        if ctx.route.grad is None:
            raise RuntimeError("a stage-1 loss routed through the model was reached without its read-out (_Readout)")
        loss_grad = (ctx.route.grad * ctx.route.weight).to(ctx.loss_dtype).expand(ctx.loss_shape)
        return grad, loss_grad, None


class _Readout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, anchor, route):
        ctx.route, ctx.anchor = route, (anchor.shape, anchor.dtype, anchor.device)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.route.grad = grad
        shape, dtype, device = ctx.anchor
        return None, torch.zeros(shape, dtype=dtype, device=device), None


def _routed(module: nn.Module, output: torch.Tensor, loss: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
    """`output` with `module`'s stage-1 losses attached when a `LossRoute` is set on it (a sharded model)."""
    route = module.__dict__.get("_fastattn_route")
    if route is None or not torch.is_grad_enabled():
        return output
    if score is not None:
        loss = loss + route.score_weight * score
    return _Attach.apply(output, loss, route)


@contextlib.contextmanager
def _loss_route(model: nn.Module, modules: list[nn.Module], score_weight: float) -> Iterator[LossRoute | None]:
    """While inside, on an FSDP-sharded `model` with gradients on, a `LossRoute` is set on `modules` (yielded; None
    otherwise). Nested inside another (`stage1_step`), the outer one's route is reused."""
    outer = modules[0].__dict__.get("_fastattn_route") if modules else None
    if outer is not None:
        yield outer
        return
    if not (torch.is_grad_enabled() and is_sharded(model)):
        yield None
        return
    route = LossRoute(len(modules), score_weight)
    for m in modules:
        m._fastattn_route = route
    try:
        yield route
    finally:
        for m in modules:
            m.__dict__.pop("_fastattn_route", None)


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


def _check_scorable(model: nn.Module, teacher: nn.Module | None = None) -> str:
    """Which attention-score loss `transfer_score_weight > 0` takes on `model`: "linear" (Hedgehog's, plain linear
    attention: its weights are phi(q) . phi(k) normalized) or "softmax" (`softmax_score_loss`: softmax attention,
    e.g. K/V heads pooled by mqa / gqa, in layer transfer, where `teacher` gives the original's q and k). A
    ValueError for anything else."""
    base = _unwrap(model)
    implementation = base.config._attn_implementation
    if implementation in (TRANSFER_IMPLEMENTATION, SCORED_LINEAR_IMPLEMENTATION):  # inside `stage1_step`
        implementation = "linear"  # both run the model's own linear attention as the student
    if implementation == "linear" and get_options(base.config).window is None:
        return "linear"
    if implementation.startswith(_SCORED_SOFTMAX):  # inside `stage1_step`
        return "softmax"
    teacher_implementation = None if teacher is None else _unwrap(teacher).config._attn_implementation
    if implementation in SOFTMAX_SCORE_IMPLEMENTATIONS and teacher_implementation in SOFTMAX_SCORE_IMPLEMENTATIONS:
        return "softmax"
    what = "the sliding-window hybrid" if implementation == "linear" else f"{implementation!r} attention"
    if implementation in SOFTMAX_SCORE_IMPLEMENTATIONS:
        what += (
            " without the original's attention to compare with (attention transfer)"
            if teacher is None
            else f" and an original on {teacher_implementation!r} attention"
        )
    raise ValueError(
        f"transfer_score_weight > 0 compares the converted model's attention weights with the original's; this model "
        f"has {what}. It applies to models converted with 't2r', 'hedgehog' or 'linear' without hybrid=True, and in "
        f"layer transfer (transfer_mode='layer') to softmax attention ('mqa', 'gqa') on "
        f"{' or '.join(repr(i) for i in SOFTMAX_SCORE_IMPLEMENTATIONS)} attention in both models; "
        "use transfer_score_weight=0 here"
    )


# ---------------------------------------------------------------------------------------------------------------
# the attention-score loss of a softmax student (K/V heads pooled by mqa / gqa), in layer transfer
#
# The student's weights softmax(q_s k_s^T) are compared with the original's softmax(q_t k_t^T) on the same inputs:
# the original's q and k are captured while it runs just before (its attention function wrapped, `_CAPTURE`), the
# student's scored in its own (wrapped, `_SCORED_SOFTMAX`). Both are N x N per head, so only every
# `SOFTMAX_SCORE_STRIDE`-th query is scored (the last always), over all its keys, and the scoring is recomputed in
# the backward instead of kept (activation-checkpointed): what stays per layer is the sampled queries and the keys.

# every this many queries are scored: SmolLM2-135M at 2 x 2048 tokens, 2.7 s more per stage-1 step (11 -> 13.7 s)
SOFTMAX_SCORE_STRIDE = 8
# the attention implementations the wrappers run (eager's weights are sdpa's: "eager" runs sdpa under the wrapper)
SOFTMAX_SCORE_IMPLEMENTATIONS = ("sdpa", "eager")
_CAPTURE = "fastattn_capture_"
_SCORED_SOFTMAX = "fastattn_scored_"


def score_positions(n: int, stride: int = SOFTMAX_SCORE_STRIDE, device=None) -> torch.Tensor:
    """The query positions `softmax_score_loss` scores in a block of `n`: every `stride`-th, ending at the last."""
    if n < 1 or stride < 1:
        raise ValueError(f"score_positions needs a block of n >= 1 tokens and a stride >= 1, got n={n}, stride={stride}")
    return torch.arange(n - 1, -1, -stride, device=device).flip(0)


def _softmax_score_rows(query, key, teacher_query, teacher_key, allowed, keep, scaling):
    with torch.autocast(query.device.type, enabled=False):

        def log_weights(q, k):
            logits = (q.float() @ repeat_kv(k, q.shape[1]).float().transpose(-1, -2)) * scaling
            return logits.masked_fill(~allowed, torch.finfo(torch.float32).min).log_softmax(-1)

        with torch.no_grad():
            target = log_weights(teacher_query, teacher_key)
        kl = (target.exp() * (target - log_weights(query, key))).masked_fill(~allowed, 0).sum(-1)  # [B, H, M]
        return (kl * keep[:, None, :]).sum() / (keep.sum() * kl.shape[1]).clamp_min(1)


def softmax_score_loss(
    query, key, teacher_query, teacher_key, positions, token_mask=None, scaling=None, causal=True
) -> torch.Tensor:
    """KL(original's attention weights || student's) of softmax attention, summed over keys and averaged over heads
    and the real (not padded) queries at `positions` (Hedgehog's attention-score loss with a softmax student: the
    same gradient as its cross-entropy, 0 when the weightings agree).

    query, teacher_query `[B, H, M, D]`: the queries at `positions` `[M]` (after RoPE); key `[B, Hkv, N, D]`,
    teacher_key `[B, Hkv_t, N, D]` (each repeated to the H query heads); positions: e.g. `score_positions(N)`;
    token_mask: `[B, N]` (1: real token) or None. The scoring is recomputed in the backward (activation-checkpointed)
    instead of kept."""
    m = len(positions)
    if query.shape[:3] != teacher_query.shape[:3] or query.shape[2] != m or key.shape[2] != teacher_key.shape[2]:
        raise ValueError(
            f"softmax_score_loss needs query and teacher_query [B, H, M, D] at the M={m} positions and keys of one "
            f"length; got query {tuple(query.shape)}, teacher_query {tuple(teacher_query.shape)}, key "
            f"{tuple(key.shape)}, teacher_key {tuple(teacher_key.shape)}"
        )
    n = key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    keys = torch.arange(n, device=key.device)
    allowed = keys[None, :] <= positions[:, None] if causal else torch.ones(
        len(positions), n, dtype=torch.bool, device=key.device
    )
    allowed = allowed[None, None]  # [1, 1, M, N]
    keep = torch.ones(query.shape[0], len(positions), device=query.device)
    if token_mask is not None:
        real = token_mask.to(torch.bool)
        allowed = allowed & real[:, None, None, :]
        keep = real[:, positions].float()
    args = (query, key, teacher_query, teacher_key, allowed, keep, scaling)
    if torch.is_grad_enabled() and query.requires_grad:
        return checkpoint(_softmax_score_rows, *args, use_reentrant=False)
    return _softmax_score_rows(*args)


def _attention_function(name: str):
    """The attention function transformers runs for `name` ("eager": sdpa, which computes the same weights)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, sdpa_attention_forward)


def _capture_forward(name: str):
    inner = _attention_function(name)

    def forward(module, query, key, value, attention_mask, *args, **kwargs):
        positions = score_positions(query.shape[2], device=query.device)
        module._fastattn_teacher_qk = (query[:, :, positions].detach(), key.detach(), positions)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    return forward


def _scored_forward(name: str):
    inner = _attention_function(name)

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        out = inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
        if getattr(module, "_fastattn_score_loss", False):
            teacher_query, teacher_key, positions = module.__dict__["_fastattn_teacher"]._fastattn_teacher_qk
            loss = softmax_score_loss(
                query[:, :, positions], key, teacher_query, teacher_key, positions,
                module.__dict__.get("_fastattn_token_mask"), scaling, _is_causal(module, is_causal),
            )
            if not _in_backward():
                module.fastattn_score_loss = loss
        return out

    return forward


def _wrapped_implementation(prefix: str, name: str) -> str:
    """The registered name of `name`'s attention wrapped by `_capture_forward` or `_scored_forward` (its masks
    `name`'s own), registered on first use."""
    wrapped = prefix + name
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        make = _capture_forward if prefix == _CAPTURE else _scored_forward
        AttentionInterface.register(wrapped, make(name))
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return wrapped


@contextlib.contextmanager
def _scoring(model: nn.Module, teacher: nn.Module | None, score_weight: float) -> Iterator[None]:
    """While inside, with `score_weight > 0`, `model` runs the attention function that stores its score loss
    (`_check_scorable` says which) and, for a softmax student, `teacher` the one that captures its q and k."""
    if score_weight <= 0:
        yield
        return
    kind = _check_scorable(model, teacher)
    if kind == "linear":
        with _attention_implementation(model, SCORED_LINEAR_IMPLEMENTATION):
            yield
        return
    implementation = _unwrap(model).config._attn_implementation
    if implementation.startswith(_SCORED_SOFTMAX):  # nested inside `stage1_step`: already set
        yield
        return
    teacher_implementation = _unwrap(teacher).config._attn_implementation
    with (
        _attention_implementation(model, _wrapped_implementation(_SCORED_SOFTMAX, implementation)),
        _attention_implementation(teacher, _wrapped_implementation(_CAPTURE, teacher_implementation)),
    ):
        yield


@contextlib.contextmanager
def _score_losses(modules: list[nn.Module], score_weight: float) -> Iterator[None]:
    """With `score_weight > 0`, the attention functions of `modules` store `attention_score_loss` while inside.
    Nested inside another (`stage1_step`), the outer one's setting is restored on exit."""
    previous = [m.__dict__.get("_fastattn_score_loss") for m in modules]
    for m in modules:
        m._fastattn_score_loss = score_weight > 0
    try:
        yield
    finally:
        for m, before in zip(modules, previous, strict=True):
            if before is None:
                m.__dict__.pop("_fastattn_score_loss", None)
                m.__dict__.pop("fastattn_score_loss", None)
            else:
                m._fastattn_score_loss = before


def _stage1_loss(
    modules: list[nn.Module], score_weight: float, route: LossRoute | None = None, outputs=None
) -> torch.Tensor:
    """The mean over layers of each module's output loss, plus `score_weight` times its attention-score loss. With a
    `route` (a sharded model), that value read out through the model's last hidden state in `outputs`."""
    loss = torch.stack([m.__dict__.pop("fastattn_transfer_loss") for m in modules]).mean()
    if score_weight > 0:
        loss = (
            loss + score_weight * torch.stack([m.__dict__.pop("fastattn_score_loss") for m in modules]).mean()
        )
    if route is None:
        return loss
    return _Readout.apply(loss, outputs.hidden_states[-1], route)


def _stage1_forward_kwargs(model: nn.Module) -> dict:
    """Forward arguments of a stage-1 pass: no cache, and (where the model takes it) the LM head on one position
    only: stage 1 never reads the logits, which at 2 x 2048 tokens and a 49K vocabulary are 0.8 GB."""
    base = _unwrap(model)
    if not family_of(base).causal:
        return {}
    keep = "logits_to_keep" in inspect.signature(base.forward).parameters
    return {"use_cache": False, **({"logits_to_keep": 1} if keep else {})}


def attention_transfer_loss(model: nn.Module, inputs: dict, score_weight: float = 0.0) -> torch.Tensor:
    """The stage-1 loss on one batch: the mean over layers of MSE(linear attention, softmax attention), plus
    `score_weight` times the mean of Hedgehog's `attention_score_loss`. With activation checkpointing on, call it
    and its `backward()` inside `stage1_step(model, score_weight=...)` (torch refuses the recomputation otherwise)."""
    if score_weight > 0:
        _check_scorable(model)
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    extra = _stage1_forward_kwargs(model)
    with (
        attention_transfer(model) as modules,
        _score_losses(modules, score_weight),
        _loss_route(model, modules, score_weight) as route,
    ):
        outputs = model(**inputs, **extra, **({"output_hidden_states": True} if route else {}))
        return _stage1_loss(modules, score_weight, route, outputs)


def _frozen_blocks(module: nn.Module, attention: set[int], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The largest submodules of `module` (name, module) outside the attention modules that hold no trainable
    parameter and do matrix products (a Linear or Conv1D inside): an LLM's MLPs, its LM head."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        inner = list(child.modules())
        if any(id(m) in attention for m in inner):
            if id(child) not in attention:
                yield from _frozen_blocks(child, attention, full + ".")
            continue
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params) and any(isinstance(m, nn.Linear | Conv1D) for m in inner):
            yield full, child


def _drops_out(base: nn.Module, modules: list[nn.Module]) -> bool:
    """Whether a dropout (p > 0, training mode) outside the attention `modules` (whose outputs layer transfer
    replaces) makes `base`'s residual stream differ from that of its teacher, which runs in eval mode."""
    inside = {id(m) for a in modules for m in a.modules()}
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 and id(m) not in inside
        for m in base.modules()
    )


def _same_weights(block: nn.Module, twin: nn.Module) -> bool:
    """Whether `block`'s parameters and buffers equal `twin`'s (checked at every entry: ~0.1 s for SmolLM2-135M's
    MLPs and head, against seconds per step)."""
    mine, theirs = block.state_dict(keep_vars=True), twin.state_dict(keep_vars=True)
    return mine.keys() == theirs.keys() and all(
        v.shape == theirs[k].shape and torch.equal(whole_tensor(v.detach()), theirs[k].detach()) for k, v in mine.items()
    )


def _answer_from(queue: list, block: nn.Module):
    """A `forward` for `block` that returns the next output in `queue` (its teacher twin's), computing only when
    there is none."""
    original = type(block).forward

    def forward(*args, **kwargs):
        out = queue.pop(0) if queue else None
        return original(block, *args, **kwargs) if out is None else out

    return forward


def _reuse_teacher_outputs(
    base: nn.Module, tbase: nn.Module, modules: list[nn.Module]
) -> tuple[list[nn.Module], list[torch.utils.hooks.RemovableHandle]]:
    """Make the student's frozen blocks (`_frozen_blocks`) whose weights equal the teacher's matching module return
    the output that module computed in the teacher's forward just run: layer transfer keeps the residual stream the
    teacher's, so their inputs are the same (not while a dropout outside the attention modules is active). The
    student's forward then computes only its attention modules. The teacher's outputs are captured by hooks on the
    teacher, in call order (a module called twice is answered twice). Returns the patched student modules (restore
    by popping their instance `forward`) and the teacher's hooks (to remove)."""
    if _drops_out(base, modules):
        return [], []
    teacher_modules = dict(tbase.named_modules())
    patched, hooks = [], []
    for name, block in _frozen_blocks(base, {id(m) for m in modules}):
        twin = teacher_modules.get(name)
        if twin is None or type(twin) is not type(block) or not _same_weights(block, twin):
            continue
        queue: list = []

        def capture(module, args, output, queue=queue):
            queue.append(output.detach() if isinstance(output, torch.Tensor) else None)

        block.forward = _answer_from(queue, block)
        hooks.append(twin.register_forward_hook(capture))
        patched.append(block)
    return patched, hooks


@contextlib.contextmanager
def layer_transfer(model: nn.Module, teacher: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside: a forward of `model` (possibly DDP- or peft-wrapped) regresses each attention module's output onto
    that of the teacher's matching module, run on the same batch just before (`layer_transfer_loss`); yields the
    converted model's attention modules, each holding `fastattn_transfer_loss` after a forward.

    Every attention module's output is replaced by the teacher's, so the residual stream stays the teacher's: with
    the other weights frozen (they equal the teacher's), each attention module sees exactly the teacher's inputs.

    Nested inside another `layer_transfer` of the same model (`stage1_step`), it reuses the outer one's hooks. With
    activation checkpointing on, the teacher's outputs are kept until the outermost exit: the backward's
    recomputation of a layer needs its target again.
    """
    base, tbase = _unwrap(model), _unwrap(teacher)
    active = base.__dict__.get("_fastattn_layer_transfer")
    if active is not None:
        if active[0] is not tbase:
            raise ValueError("layer_transfer is already active on this model with another teacher")
        yield active[1]
        return
    modules = attention_modules(base, family_of(base))
    targets = attention_modules(tbase, family_of(tbase))
    if len(modules) != len(targets):
        raise ValueError(
            f"the teacher has {len(targets)} attention modules, the converted model {len(modules)}"
        )
    outputs: dict[int, torch.Tensor] = {}
    keep = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())

    def capture(i):
        def hook(module, args, output):
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def regress(i):
        def hook(module, args, output):
            student = output[0] if isinstance(output, tuple) else output
            target = outputs[i] if keep else outputs.pop(i)
            mask = getattr(module, "_fastattn_token_mask", None)
            err = (student.float() - target.float()) ** 2
            ref = target.float() ** 2
            if mask is not None:
                err, ref = err * mask[..., None], ref * mask[..., None]
            # normalized MSE: the same scale in every layer
            if (
                _in_backward()
            ):  # a checkpointed layer recomputed: the forward's normalizer, no collective here
                norm = module.__dict__["_fastattn_norm"]
            else:
                norm = module._fastattn_norm = data_parallel_mean(ref.sum()).clamp_min(1e-12)
            loss = err.sum() / norm
            if not _in_backward():
                module.fastattn_transfer_loss = loss
            target = _routed(module, target, loss, module.__dict__.get("fastattn_score_loss"))
            return (target, *output[1:]) if isinstance(output, tuple) else target

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(targets)]
    handles += [m.register_forward_hook(regress(i)) for i, m in enumerate(modules)]
    # without checkpointing (whose backward would call the skipped modules again), the student's frozen blocks
    # (MLPs, ...) return the teacher's outputs instead of computing them again on the same inputs
    skipped, teacher_hooks = ([], []) if keep else _reuse_teacher_outputs(base, tbase, modules)
    handles += teacher_hooks
    base._fastattn_layer_transfer = (tbase, modules)
    for m, t in zip(modules, targets, strict=True):  # a softmax student's score loss reads the original's q and k
        m.__dict__["_fastattn_teacher"] = t  # not `m._fastattn_teacher = t`: that would make it a submodule
    try:
        yield modules
    finally:
        for h in handles:
            h.remove()
        for m in skipped:
            m.__dict__.pop("forward", None)
        for m in modules:
            m.__dict__.pop("_fastattn_token_mask", None)
            m.__dict__.pop("_fastattn_norm", None)
            m.__dict__.pop("_fastattn_teacher", None)
        for t in targets:
            t.__dict__.pop("_fastattn_teacher_qk", None)
        base.__dict__.pop("_fastattn_layer_transfer", None)
        outputs.clear()


def layer_transfer_loss(
    model: nn.Module, teacher: nn.Module, inputs: dict, score_weight: float = 0.0
) -> torch.Tensor:
    """The "layer" stage-1 loss on one batch: the mean over attention modules of the normalized MSE
    `|student - teacher|^2 / |teacher|^2` of the module outputs (padded tokens excluded), the teacher's module
    outputs fed forward (see `layer_transfer`); plus `score_weight` times the mean of Hedgehog's
    `attention_score_loss` on the converted modules' own q and k (linear attention), or of `softmax_score_loss`
    against the original's q and k (softmax attention: K/V heads pooled by mqa / gqa). With activation
    checkpointing on, call it and its `backward()` inside `stage1_step(model, teacher, score_weight)`."""
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    extra = _stage1_forward_kwargs(model)
    with (
        layer_transfer(model, teacher) as modules,
        _score_losses(modules, score_weight),
        _loss_route(model, modules, score_weight) as route,
        _scoring(model, teacher, score_weight),
    ):
        mask = inputs.get("attention_mask")
        for m in modules:
            m._fastattn_token_mask = None if mask is None else mask.float()
        with torch.no_grad():
            teacher(**inputs, **_stage1_forward_kwargs(teacher))
        outputs = model(**inputs, **extra, **({"output_hidden_states": True} if route else {}))
        return _stage1_loss(modules, score_weight, route, outputs)


@contextlib.contextmanager
def stage1_step(
    model: nn.Module, teacher: nn.Module | None = None, score_weight: float = 0.0
) -> Iterator[None]:
    """Hold a stage-1 training step's state over its forward and its backward: the transfer attention (or, with
    `teacher`, the layer-transfer hooks and teacher outputs) and the score-loss flags. With activation checkpointing
    the backward recomputes each checkpointed decoder layer's forward, which must run exactly what the forward ran;
    `attention_transfer_loss` / `layer_transfer_loss` called inside reuse this state. The stage-1 trainers wrap
    each `training_step` in it; call `loss.backward()` inside it when computing these losses by hand."""
    if score_weight > 0:
        _check_scorable(model, teacher)
    if teacher is None:
        with (
            attention_transfer(model) as modules,
            _score_losses(modules, score_weight),
            _loss_route(model, modules, score_weight),
        ):
            yield
        return
    with (
        layer_transfer(model, teacher) as modules,
        _score_losses(modules, score_weight),
        _loss_route(model, modules, score_weight),
        _scoring(model, teacher, score_weight),
    ):
        yield
