"""FSDP in uptraining: models sharded by torch's FSDP2 (`fully_shard`, what accelerate prepares under an FSDP config).

After a stage trained under FSDP the model's parameters are shards (DTensors) and its classes FSDP's subclasses:
`gather` turns it back into a plain model with whole weights on every process (a collective: every process calls
it), which the next stage shards again and `uptrain` returns, ready for LoRA's merge and `save_pretrained`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside) is sharded by FSDP2 (`fully_shard`)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, or the whole tensor of an FSDP shard (a DTensor: all-gathered, a collective every process must join)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_class(module: nn.Module) -> type:
    """The class `fully_shard` derived `type(module)` from (`FSDP<Class>` has bases `(FSDPModule, Class)`)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    while issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def _empty_twin(model: nn.Module) -> nn.Module:
    """A model of `model`'s structure on the meta device (no memory): its plain class built from its config, and
    wrapped in the same LoRA adapters if `model` is a peft model."""
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    config = getattr(base, "config", None)
    if config is None:
        raise ValueError(f"cannot gather a sharded {type(base).__name__}: it has no config to rebuild it from")
    with torch.device("meta"):
        twin = _plain_class(base)(config)
    if getattr(base, "generation_config", None) is not None:
        twin.generation_config = copy.deepcopy(base.generation_config)
    if peft_config:
        from peft import get_peft_model

        (name,) = peft_config  # uptraining adds one adapter
        twin = get_peft_model(twin, peft_config[name], adapter_name=name)
    return twin


def gather(model: nn.Module) -> nn.Module:
    """A plain copy of the FSDP-sharded `model` with its whole weights on every process, on the shards' device; a
    model that is not sharded is returned as it is. Every process must call it (the weights are all-gathered).

    The copy is built on the meta device and given the gathered tensors (`load_state_dict(assign=True)`); the
    tensors FSDP does not shard (buffers, and tensors a module keeps as attributes, such as a rotary embedding's
    `original_inv_freq`) are taken over from `model`, as are each module's train / eval mode and each parameter's
    `requires_grad`; `model`'s parameters are left as they were (sharded)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    twin = _empty_twin(model)
    missing, unexpected = twin.load_state_dict(full, strict=False, assign=True)
    sources = dict(model.named_modules())
    for name, module in twin.named_modules():
        source = sources[name]
        module.training = source.training
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and key not in module._non_persistent_buffers_set and buffer.device.type != "meta":
                continue
            module._buffers[key] = source._buffers[key]
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, key, getattr(source, key))
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()
    left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left or unexpected:
        raise RuntimeError(
            f"gathering the sharded {type(twin).__name__} left {left or unexpected} unfilled (missing from its state "
            f"dict: {missing}); please report this"
        )
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in twin.named_parameters():
        p.requires_grad_(trains.get(n, True))
    return twin
