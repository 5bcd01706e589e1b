"""Constant-size recurrent state for decoding causal "linear" and "fast" models, on transformers' Cache API.

Causal linear attention is an RNN (Katharopoulos et al. 2020): per K/V head it only needs

    S = sum_j phi(k_j) v_j^T   [F, Dv]        z = sum_j phi(k_j)   [F]

so a `RecurrentCache` holds one `RecurrentStateLayer` per decoder layer, each a transformers
`LinearAttentionLayer` with two recurrent states (S and z), and its bytes do not grow with the context. For the
LoLCATs sliding-window hybrid ("window" option) each layer also holds `window` slots of keys and values (the
softmax part) and `sinks` slots for the attention sinks (the first real tokens), still a fixed size.

How the pieces meet (the hooks at the end of this module): the model's attention module still calls `cache.update(key, value,
layer_idx)`; a `RecurrentCache` returns the new tokens' keys and values unchanged instead of a growing K/V cache,
and the registered attention function reads and writes the layer's state (it finds the layer on the module, where
a forward pre-hook put it). Prefill runs the chunked form from the stored state; one-token steps run
`recurrent_linear_step`.

Transformers' pitfall: `Cache.get_seq_length` refuses caches made only of linear layers, but RoPE positions and
masks need the number of tokens seen, so each layer counts its tokens and the cache reports them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer

from .variants import is_variant, recurrent_variant_names, variant_options

State = tuple[torch.Tensor, torch.Tensor]


def cache_argument(model) -> str:
    """The name under which `model.forward` takes its cache: "cache" from transformers 5.24, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def pop_cache(model_kwargs: dict) -> Cache | None:
    """Take the cache out of `generate`'s model kwargs, whichever name this transformers version gives it."""
    cache = model_kwargs.pop("cache", None)
    legacy = model_kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class RecurrentStateLayer(LinearAttentionLayer):
    """One decoder layer's recurrent state: `recurrent_states[0]` = S `[B, Hs, F, Dv]`, `[1]` = z `[B, Hs, F]`.

    Hs is the number of K/V heads (query heads for per-head learned maps with grouped K/V, and for the sliding-window
    hybrid). `seen_tokens` counts every token folded in (padding included: it sets the positions of later tokens, not
    the state). For the sliding-window hybrid ("window" option) the layer also keeps the last `window` keys and values
    and their padding mask (`window_kv`), which the state does not hold yet, and the attention sinks that left the
    window (`sink_kv`: `sinks` slots of keys, values and a mask, False for an empty slot; None without sinks).
    """

    def __init__(self):
        super().__init__(number_of_states=2)
        self.seen_tokens = 0
        self._window_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._sink_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # one-token decoding keeps the sinks and the window in one ring of slots, updated in place
        # (`hf_fastattn.ops.hybrid_ring`); reading `window_kv` or `sink_kv` puts them back in order
        self.ring = None
        # set by the attention module's pre-hook for the duration of one forward (`_arm` below)
        self.armed = False

    @property
    def state(self) -> State | None:
        if not self.is_recurrent_states_initialized[0]:
            return None
        return self.recurrent_states[0], self.recurrent_states[1]

    @property
    def batch_size(self) -> int:
        return self.recurrent_states[0].shape[0]

    def set_state(self, state: State) -> None:
        s, z = (x.detach() if not torch.is_grad_enabled() else x for x in state)
        old = self.state
        if old is not None and old[0].shape != s.shape:
            raise ValueError(
                f"RecurrentCache: the stored state has shape {tuple(old[0].shape)} but this forward produces "
                f"{tuple(s.shape)} (batch, heads, features, value dim): the cache was made for another batch or model. "
                "Start a new cache (or continue with the same batch size)."
            )
        if old is None or s.requires_grad:
            # first write, or a differentiable forward: keep the tensors themselves (no in-place copy under autograd);
            # contiguous, so that decoding can update them in place (`recurrent_linear_step_`)
            if not s.requires_grad:
                s, z = s.contiguous(), z.contiguous()
            self.recurrent_states[0], self.recurrent_states[1] = s, z
            self.is_recurrent_states_initialized[0] = self.is_recurrent_states_initialized[1] = True
            self.device, self.dtype = s.device, s.dtype
        else:
            self.update_recurrent_state(s, state_idx=0)
            self.update_recurrent_state(z, state_idx=1)
        self.has_previous_state[0] = self.has_previous_state[1] = True

    @property
    def window_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        self._settle_ring()
        return self._window_kv

    @window_kv.setter
    def window_kv(self, value) -> None:
        self._settle_ring()
        self._window_kv = value

    @property
    def sink_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        self._settle_ring()
        return self._sink_kv

    @sink_kv.setter
    def sink_kv(self, value) -> None:
        self._settle_ring()
        self._sink_kv = value

    def _settle_ring(self) -> None:
        """Put the ring's window back in order as `window_kv` (and its sinks as `sink_kv`), for every reader but
        the one-token step."""
        if self.ring is not None:
            from ..ops.hybrid_ring import ring_to_parts

            self._window_kv, self._sink_kv = ring_to_parts(self.ring)
            self.ring = None

    def take_ring(self):
        """The window and sinks as a `HybridRing` for an in-place one-token step (built from `window_kv` and
        `sink_kv` the first time), or None where a step cannot use one yet (no window held, or a sink slot still
        empty: a leaving key may still become a sink). The caller stores the stepped ring back in `ring`."""
        if self.ring is not None:
            return self.ring
        from ..ops.hybrid_ring import ring_from_parts

        if self._window_kv is None or (self._sink_kv is not None and not bool(self._sink_kv[2].all())):
            return None
        self.ring = ring_from_parts(self._window_kv, self._sink_kv)
        self._window_kv = self._sink_kv = None
        return self.ring

    def set_window(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep the hybrid's `window` slots: keys `[B, Hkv, W, D]`, values and padding mask `[B, W]` (False: empty)."""
        if not torch.is_grad_enabled():
            keys, values = keys.detach(), values.detach()
        self.window_kv = (keys, values, mask)

    def set_sinks(self, keys: torch.Tensor | None, values: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """Keep the hybrid's sink slots: keys `[B, Hkv, S, D]`, values and mask `[B, S]` (False: empty); None: none."""
        if keys is None:
            self.sink_kv = None
            return
        if not torch.is_grad_enabled():
            keys, values = keys.detach(), values.detach()
        self.sink_kv = (keys, values, mask)

    def _window_parts(self) -> list[str]:
        return [name for name in ("window_kv", "sink_kv") if getattr(self, name) is not None]

    def reset(self) -> None:
        super().reset()
        self.recurrent_states = dict.fromkeys(range(self.number_of_states))
        self.is_recurrent_states_initialized = dict.fromkeys(range(self.number_of_states), False)
        self.seen_tokens = 0
        self.ring = None
        self._window_kv = self._sink_kv = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i].repeat_interleave(repeats, dim=0)
        for name in self._window_parts():
            setattr(self, name, tuple(x.repeat_interleave(repeats, dim=0) for x in getattr(self, name)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i][indices, ...]
        for name in self._window_parts():
            setattr(self, name, tuple(x[indices, ...] for x in getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in self._window_parts():
            setattr(self, name, tuple(x.index_select(0, beam_idx.to(x.device)) for x in getattr(self, name)))

    def offload(self) -> None:
        super().offload()
        for name in self._window_parts():
            setattr(self, name, tuple(x.to("cpu", non_blocking=True) for x in getattr(self, name)))

    def prefetch(self) -> None:
        super().prefetch()
        for name in self._window_parts() if self.device is not None else []:
            setattr(self, name, tuple(x.to(self.device, non_blocking=True) for x in getattr(self, name)))

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def nbytes(self) -> int:
        slots = self.ring[:3] if self.ring is not None else list(self._window_kv or ()) + list(self._sink_kv or ())
        held = list(self.state or ()) + list(slots)
        return sum(x.numel() * x.element_size() for x in held)


def model_signature(config: PreTrainedConfig) -> dict:
    """What a recurrent cache must agree on with the model it serves: everything that sets the shapes or the meaning
    of the states (layers, heads, attention implementation, the variant's options marked `"state": True` in its
    options dataclass: "linear"'s feature map, window, sinks and linear weight, "fast"'s order and temperature;
    conversion), and nothing else (`chunk_size` and `backend` may change between calls)."""
    text = config.get_text_config(decoder=True)
    impl = getattr(text, "_attn_implementation", None)
    state_options = {}
    if is_variant(impl):
        options = variant_options(text, impl)
        state_options = {
            f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.metadata.get("state")
        }
    return {
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "hidden_size": text.hidden_size,
        "attn_implementation": impl,
        "fastattn": state_options,
        # learned feature maps (T2R, Hedgehog): method and feature dimension
        "conversion": dict(getattr(text, "fastattn_conversion", None) or {}),
    }


class RecurrentCache(Cache):
    """A cache of fixed-size recurrent states for causal "linear" / "fast" models (T2R and Hedgehog included, and
    their sliding-window hybrids, whose layers also keep the last `window` keys and values).

    `generate` makes one by itself for such models; make one up front to pass it in or to continue a generation:

        cache = hf_fastattn.RecurrentCache(model)          # or RecurrentCache(model.config), then generate(...)
        out = model.generate(ids, cache=cache, max_new_tokens=32)

    Args:
        config_or_model: the model (its attention modules are then prepared at once, see
            `hf_fastattn.enable_recurrent_decoding`) or its config.
    """

    def __init__(self, config_or_model):
        config = config_or_model if isinstance(config_or_model, PreTrainedConfig) else config_or_model.config
        if not uses_recurrent_state(config):
            text = config.get_text_config(decoder=True)
            raise ValueError(
                "RecurrentCache serves causal models running hf_fastattn 'linear' or 'fast' attention (the "
                f"sliding-window hybrid included); this model runs attn_implementation="
                f"{getattr(text, '_attn_implementation', None)!r}: let generate use its default cache (DynamicCache)."
            )
        self.signature = model_signature(config)
        super().__init__(layers=[RecurrentStateLayer() for _ in range(self.signature["num_hidden_layers"])])
        if not isinstance(config_or_model, PreTrainedConfig):
            enable_recurrent_decoding(config_or_model)

    @property
    def is_linear(self) -> list[bool]:
        # transformers reads `is_linear` as "this layer does not count tokens" (Mamba-like) and then, when a generation
        # is continued from a returned cache, feeds the whole sequence again instead of the tokens not yet seen. These
        # layers count their tokens (`get_seq_length`), so generate must slice the input as for an attention cache.
        return [False] * len(self.layers)

    @property
    def is_compileable(self) -> bool:
        # False: generate would otherwise (1) build 4D masks in `prepare_inputs_for_generation` (this cache's attention
        # takes the 2D padding mask, see registry.padding_mask) and (2) auto-compile the decoding forward on GPUs around
        # Python-side state (module hooks, token counters). `torch.compile(model.forward)` works (tests/test_integration/
        # test_recurrent.py); only generate's automatic compilation is off.
        return False

    def check_compatible(self, config: PreTrainedConfig) -> None:
        """Raise `ValueError` if this cache was made for a model unlike the one with `config`."""
        theirs = model_signature(config)
        diff = {k: (self.signature[k], theirs[k]) for k in self.signature if self.signature[k] != theirs[k]}
        if diff:
            details = "; ".join(f"{k}: cache {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"RecurrentCache was made for another model ({details}); make one with RecurrentCache(model)"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Count the new tokens and hand their keys and values back: the attention function folds them into the
        layer's state (a recurrent cache keeps no K/V)."""
        if layer_idx >= len(self.layers):
            raise ValueError(f"RecurrentCache has {len(self.layers)} layers, got layer_idx={layer_idx}")
        layer = self.layers[layer_idx]
        if not layer.armed:
            raise ValueError(
                "RecurrentCache serves causal models running hf_fastattn 'linear' or 'fast' attention whose attention "
                "modules are prepared for it: call hf_fastattn.enable_recurrent_decoding(model) (generate does it), "
                f"and use the default DynamicCache for other attention implementations (layer {layer_idx})."
            )
        state = layer.state
        if state is not None and state[0].shape[0] != key_states.shape[0]:
            # checked before counting, so that a refused call leaves the cache as it was
            raise ValueError(
                f"RecurrentCache: the stored state has batch {state[0].shape[0]} but this forward has batch "
                f"{key_states.shape[0]} (layer {layer_idx}): continue with the same batch size, or start a new cache."
            )
        layer.seen_tokens += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen_tokens if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # the attention function sees only the new tokens' keys: kv_length = query_length, offset = tokens seen
        return query_length, self.get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "RecurrentCache cannot be cropped: its state has folded every token in. Save a copy (copy.deepcopy) "
            "before tokens you may take back, as hf_fastattn.generation's rollback does."
        )

    def nbytes(self) -> int:
        """Bytes held by the recurrent states (constant in the number of tokens)."""
        return sum(layer.nbytes() for layer in self.layers)


# Recurrent decoding without changing a model's code. A registered attention function receives keys and values *after*
# the module updated the cache, and has no handle on the cache itself. So for a causal model of a recurrent variant:
# 1. every attention module gets a forward pre-hook that, when the forward carries a `RecurrentCache`, puts that
#    cache's layer on the module (`module.fastattn_recurrent_layer`) and arms it; a post-hook takes it off. The
#    registered attention function then runs the recurrent form on the layer's state (`linear_attention.py`).
# 2. `GenerationMixin._prepare_cache_for_generation` is wrapped so that `generate` makes a `RecurrentCache` instead of
#    the default `DynamicCache` for such models, and prepares the model with (1). Nothing is needed from the user.
# Models whose attention is anything else (sdpa, "sparse", "mqa") keep transformers' own caches.

_HOOKED = "_fastattn_recurrent_hooks"


def uses_recurrent_state(config) -> bool:
    """Whether a model with `config` decodes with a `RecurrentCache`: causal attention of a variant registered with
    `recurrent=True` ("linear" / "fast", the sliding-window hybrid included)."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "_attn_implementation", None) not in recurrent_variant_names():
        return False
    return not getattr(text, "is_encoder_decoder", False)


def _attention_modules(model: nn.Module):
    for module in model.modules():
        # the self-attention modules of every supported family: they own a layer index and call cache.update
        if isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention"):
            if not getattr(module, "is_cross_attention", False):
                yield module


def _arm(module, args, kwargs):
    # families name the argument differently (cache, past_key_values, layer_past; GPT-NeoX, CTRL, GPT-BigCode) or pass
    # it by position: look for the cache itself
    cache = next((v for v in (*kwargs.values(), *args) if isinstance(v, RecurrentCache)), None)
    if cache is not None:
        impl = getattr(module.config, "_attn_implementation", None)
        if impl not in recurrent_variant_names():
            # the module would run `impl` on the new tokens' keys alone (a RecurrentCache keeps no K/V): refuse
            raise ValueError(
                f"RecurrentCache was made for another model: this model's attention runs attn_implementation={impl!r}, "
                "but a RecurrentCache serves hf_fastattn 'linear' / 'fast' attention only; let generate use its "
                "default cache (DynamicCache)."
            )
        if module.layer_idx == 0 or module.layer_idx >= len(cache.layers):
            # once per forward (layer 0), and whenever the layer has no state in this cache
            cache.check_compatible(module.config)
        layer = cache.layers[module.layer_idx]
        layer.armed = True
        module.fastattn_recurrent_layer = layer
    return None


def _disarm(module, args, kwargs, output):
    layer = module.__dict__.pop("fastattn_recurrent_layer", None)
    if layer is not None:
        layer.armed = False
    return None


def enable_recurrent_decoding(model: nn.Module) -> nn.Module:
    """Prepare the attention modules of `model` to run on a `RecurrentCache` (idempotent; `generate` calls it).

    Returns the model. Raises `ValueError` if the model has no attention modules this can serve.
    """
    modules = list(_attention_modules(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention modules with a layer_idx to decode recurrently")
    for module in modules:
        if not getattr(module, _HOOKED, False):
            module.register_forward_pre_hook(_arm, with_kwargs=True)
            module.register_forward_hook(_disarm, with_kwargs=True, always_call=True)
            setattr(module, _HOOKED, True)
    return model


def _cache_key(model_kwargs: dict) -> str:
    return "cache" if "cache" in model_kwargs else "past_key_values"


_original_prepare_cache = GenerationMixin._prepare_cache_for_generation


@functools.wraps(_original_prepare_cache)
def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    result = _original_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs)
    key = _cache_key(model_kwargs)
    cache = model_kwargs.get(key)
    if isinstance(cache, RecurrentCache):
        cache.check_compatible(self.config)
        enable_recurrent_decoding(self)
    elif type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and uses_recurrent_state(self.config):
        model_kwargs[key] = RecurrentCache(self)
    return result


def install_generate_hook() -> None:
    """Make `generate` choose a `RecurrentCache` for recurrent models (done once by `import hf_fastattn`)."""
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
