"""Registration of "linear", "fast", "sparse" and "mqa" with transformers' attention and mask interfaces.

Every function follows the contract of `transformers.integrations.sdpa_attention.sdpa_attention_forward`:
`fn(module, query [B, H, Nq, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv], attention_mask, dropout, scaling,
is_causal, **kwargs) -> (out [B, Nq, H, Dv], None)`, called after RoPE and after the K/V cache update.

Masks: "mqa" uses transformers' own `sdpa_mask`. The O(N) variants register `padding_mask`, which hands the
attention function the 2D padding mask `[B, N]` itself (or None): an N x N mask would defeat linear memory, and
causality comes from the module. Without a registered mask function transformers passes `attention_mask=None`
and a padded batch silently attends to its padding.

Options live in `model.config.fastattn` (a dict, saved in config.json) and are validated by `FastAttnOptions`.

Validation happens when an implementation is set, not at the first forward: `validate_implementation` (called by
the hooks of `hf_fastattn.integration.patching` on `from_pretrained` / `from_config`, `set_attn_implementation`,
and by `configure`) refuses models the implementation cannot serve (`hf_fastattn.integration.compatibility`: a rule
read from transformers' flags and the model's code, not a list of names), invalid options and a `kv_groups` that
does not divide the model's K/V heads, before a large model has loaded its weights.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops.dropout import key_dropout
from ..ops.fast import fast_attention, fast_feature_map, validate_fast_options
from ..ops.feature_maps import FEATURE_MAPS, get_feature_map
from ..ops.linear import (
    causal_linear_attention,
    chunk_linear_attention,
    linear_attention,
    recurrent_linear_step,
    use_triton,
)
from ..ops.reference import fast_normalize, fastmax_weight, repeat_kv
from ..ops.sparse import SparsePattern, sparse_attention
from .common import _is_causal, _key_padding, check_supported, padding_mask  # noqa: F401 (re-exported)
from .compatibility import check_compatible
from .hybrid_attention import (  # noqa: F401 (re-exported)
    _HYBRID_PREFILL_PIECE,
    _hybrid_forward,
    _hybrid_recurrent_forward,
    _hybrid_step,
)

IMPLEMENTATIONS = ("linear", "fast", "sparse", "mqa")
CONFIG_KEY = "fastattn"


@dataclass
class FastAttnOptions:
    """Options of the hf_fastattn attention implementations, stored as `config.fastattn`.

    Args:
        feature_map: "linear": "elu" (elu + 1) or "relu". Learned maps (T2R, Hedgehog) are set by conversion.
        order: "fast": Taylor order of exp, 1 or 2.
        temperature: "fast": s = q_hat . k_hat / temperature (> 0; >= 1 for order 1).
        pattern: "sparse": "strided" or "fixed" (Child et al. 2019).
        stride: "sparse": period / block size.
        local: "sparse" strided: band width, default `stride`.
        summary: "sparse" fixed: summary keys per block.
        kv_groups: "mqa": number of K/V head groups after mean pooling (1 = multi-query, G = grouped-query).
        chunk_size: "linear" / "fast": tokens per chunk of the chunked causal form (None: 64, or 256 for large feature maps).
        backend: "auto" | "torch" | "triton" kernels for the operators.
        window: "linear", causal only: LoLCATs hybrid, softmax over the last `window` keys and linear attention beyond
            (`hf_fastattn.ops.hybrid`; the per-head mix is the module's `fastattn_window_factor`). None: plain linear.
    """

    feature_map: str = "elu"
    order: int = 2
    temperature: float = 1.0
    pattern: str = "strided"
    stride: int = 128
    local: int | None = None
    summary: int = 1
    kv_groups: int = 1
    chunk_size: int | None = None
    backend: str = "auto"
    window: int | None = None

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"fastattn option feature_map={self.feature_map!r} is not one of {sorted(FEATURE_MAPS)}")
        validate_fast_options(self.order, self.temperature)
        SparsePattern(self.pattern, self.stride, self.local, self.summary)
        if not isinstance(self.kv_groups, int) or self.kv_groups < 1:
            raise ValueError(f"fastattn option kv_groups must be a positive int, got {self.kv_groups!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"fastattn option chunk_size must be a positive int or None (auto), got {self.chunk_size!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"fastattn option backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"fastattn option window must be a positive int or None, got {self.window!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> FastAttnOptions:
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown fastattn option(s) {unknown}; valid options are {valid}")
        return cls(**options)


def configure(target, **options) -> FastAttnOptions:
    """Validate `options` and store them in `config.fastattn` of a model or config (merged with what is there).

    Example: `hf_fastattn.configure(model, order=1, temperature=2.0)`; they are saved by `save_pretrained`.

    Args:
        target: a model (its `config` is changed) or a config.
        **options: fields of `FastAttnOptions`.

    Returns:
        The merged, validated `FastAttnOptions`.

    Raises:
        ValueError: an unknown option or an invalid value, a `kv_groups` that does not divide the model's K/V heads,
            or (when the model already runs an hf_fastattn implementation) a model it cannot serve. Nothing is
            stored then.
    """
    config = target if isinstance(target, PreTrainedConfig) else target.config
    merged = {**(getattr(config, CONFIG_KEY, None) or {}), **options}
    parsed = FastAttnOptions.from_dict(merged)
    if "kv_groups" in merged:
        check_kv_groups(config, parsed.kv_groups)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation in IMPLEMENTATIONS:
        check_compatible(None if isinstance(target, PreTrainedConfig) else type(target), config, implementation)
    setattr(config, CONFIG_KEY, {k: v for k, v in asdict(parsed).items() if k in merged})
    return parsed


def get_options(config) -> FastAttnOptions:
    """The validated options of `config` (parsed once per distinct option dict: every attention call asks)."""
    raw = getattr(config, CONFIG_KEY, None) or {}
    try:
        return _parse_options(tuple(sorted(raw.items())))
    except TypeError:  # an unhashable value: validate without the cache (from_dict says what is wrong)
        return FastAttnOptions.from_dict(raw)


@functools.lru_cache(maxsize=256)
def _parse_options(items: tuple) -> FastAttnOptions:
    return FastAttnOptions.from_dict(dict(items))


def kv_heads(config) -> int | None:
    """The number of key/value heads the attention function receives (None when the config does not say)."""
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)


def check_kv_groups(config, groups: int) -> None:
    """Raise a ValueError unless `groups` divides the K/V heads of `config` (no check when it has no head count)."""
    heads = kv_heads(config)
    if isinstance(heads, int) and heads % groups != 0:
        raise ValueError(
            f"hf_fastattn: fastattn option kv_groups={groups} must divide the model's {heads} key/value heads "
            f"(valid: {[g for g in range(1, heads + 1) if heads % g == 0]})"
        )


def validate_implementation(config, implementation: str, model_class: type | None = None) -> FastAttnOptions:
    """Check, when `implementation` is set on a model with `config`, what its first forward would otherwise find.

    Args:
        config: the model's config (options in `config.fastattn`).
        implementation: one of `IMPLEMENTATIONS`.
        model_class: the model's class, whose code and flags the compatibility rule reads (None: the config alone).

    Returns:
        The validated options.

    Raises:
        ValueError: a model the implementation cannot serve (`compatibility.incompatibility` says why), an invalid
            option, or ("mqa") a `kv_groups` that does not divide the model's key/value heads; the message names the
            valid values.
    """
    check_compatible(model_class, config, implementation)
    options = get_options(config)
    if implementation == "mqa":
        check_kv_groups(config, options.kv_groups)
    return options


def unknown_implementation_hint(name: str, valid: list[str]) -> str:
    """The sentence added to transformers' error for an unknown `attn_implementation`: hf_fastattn's names (which
    transformers does not list) and the closest valid names, if any.

    Args:
        name: the name asked for.
        valid: every valid name (transformers' and those registered).

    Returns:
        One or two sentences, e.g. 'hf_fastattn also registers "linear", ... Did you mean "linear"?'.
    """
    quoted = [f'"{n}"' for n in IMPLEMENTATIONS]
    hint = f"hf_fastattn also registers {', '.join(quoted)}."
    # case-insensitive: "Linear" is close to "linear"
    lowered = {}
    for candidate in [*IMPLEMENTATIONS, *valid]:
        lowered.setdefault(candidate.lower(), candidate)
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    if close:
        suggestions = [f'"{lowered[c]}"' for c in close]
        hint += f" Did you mean {' or '.join(suggestions)}?"
    return hint


def feature_map_of(module: torch.nn.Module, options: FastAttnOptions):
    """The learned feature map attached by conversion (`module.fastattn_feature_map`), else the configured one."""
    return getattr(module, "fastattn_feature_map", None) or options.feature_map


def _linear_like(module, query, key, value, attention_mask, is_causal, implementation, run):
    """Shared body of "linear" and "fast": padding, and queries that are only the last Nq of N positions."""
    check_supported(module, implementation)
    mask = _key_padding(attention_mask, key.shape[2], implementation)
    causal = _is_causal(module, is_causal)
    nq, n = query.shape[2], key.shape[2]
    if nq == n:
        out = run(query, key, value, causal, mask)
    elif causal and nq < n:
        out = _suffix_queries(query, key, value, mask, run)
    else:
        raise ValueError(f"hf_fastattn {implementation!r}: {nq} queries against {n} keys is only supported causally")
    return out.transpose(1, 2).contiguous(), None


def _suffix_queries(query, key, value, mask, run):
    """Causal queries at the last Nq of N positions (decoding with a plain K/V cache): the earlier keys are summed
    into one state in O(N), then the queries attend causally to their own tokens on top of it."""
    nq, n = query.shape[2], key.shape[2]
    prefix_mask = None if mask is None else mask[:, : n - nq]
    suffix_mask = None if mask is None else mask[:, n - nq :]
    return run(query, key[:, :, n - nq :], value[:, :, n - nq :], True, suffix_mask, (key[:, :, : n - nq], value[:, :, : n - nq], prefix_mask))


def linear_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"linear": Katharopoulos et al. elu+1 (or relu, or a learned map). `scaling` is not used: phi sees q, k as given."""
    value = key_dropout(value, dropout)  # attention dropout as whole keys dropped for every query (ops/dropout.py)
    options = get_options(module.config)
    fmap = feature_map_of(module, options)
    layer = getattr(module, "fastattn_recurrent_layer", None)
    if layer is not None:
        if options.window is not None:
            return _hybrid_recurrent_forward(module, layer, query, key, value, attention_mask, scaling, fmap, options.window)
        return _recurrent_forward(module, layer, query, key, value, attention_mask, "linear", options, fmap)
    if options.window is not None:
        return _hybrid_forward(module, query, key, value, attention_mask, scaling, is_causal, fmap, options.window)

    def run(q, k, v, causal, mask, prefix=None):
        if prefix is None:
            return linear_attention(
                q, k, v, causal=causal, feature_map=fmap, padding_mask=mask, chunk_size=options.chunk_size,
                backend=options.backend,
            )
        return _with_prefix_state(q, k, v, mask, prefix, fmap, options)

    return _linear_like(module, query, key, value, attention_mask, is_causal, "linear", run)


def _recurrent_forward(module, layer, query, key, value, attention_mask, implementation, options, fmap,
                       normalize=None, intra=None):
    """Decoding on a `RecurrentCache` layer: key/value hold only the new tokens; their features are folded into the
    layer's state (S, z). One token: `recurrent_linear_step`, O(F Dv) per head. Several (prefill, Jacobi guesses):
    the chunked form started from the stored state. Padded keys (2D mask) never enter the state."""
    check_supported(module, implementation)
    if not _is_causal(module, None):
        raise ValueError(f"hf_fastattn {implementation!r}: a RecurrentCache serves causal attention only")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"RecurrentCache: {query.shape[2]} queries but {key.shape[2]} new keys in layer {layer}")
    mask = _key_padding(attention_mask, key.shape[2], implementation)
    phi = get_feature_map(fmap)
    if getattr(phi, "per_head", False) and key.shape[1] != query.shape[1]:
        # one learned map per query head: the state is kept per query head
        key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    state = layer.state
    if state is not None and (state[0].shape[0] != key.shape[0] or state[0].shape[1] != key.shape[1]
                              or state[0].shape[-1] != value.shape[-1]):
        raise ValueError(
            f"RecurrentCache: the stored state has batch {state[0].shape[0]}, {state[0].shape[1]} heads and value dim "
            f"{state[0].shape[-1]}, but this forward has batch {key.shape[0]}, {key.shape[1]} heads and value dim "
            f"{value.shape[-1]}: continue with the same batch size (and model), or start a new cache."
        )
    q, k = query.float(), key.float()
    if normalize is not None:
        q, k = normalize(q), normalize(k)
    if q.shape[2] == 1 and state is not None:
        kf = phi(k) if mask is None else phi(k) * mask[:, None, :, None]
        out, state = recurrent_linear_step(phi(q), kf, value, state, backend=options.backend)
    elif use_triton(options.backend, q, k, value):
        kf = phi(k) if mask is None else phi(k) * mask[:, None, :, None]
        out, state = chunk_linear_attention(
            phi(q), kf, value, causal=True, initial_state=state, output_final_state=True, backend="triton"
        )
    else:
        out, state = causal_linear_attention(
            q, k, value, feature_map=phi, intra_weights=intra, key_mask=mask, initial_state=state,
            output_final_state=True, chunk_size=options.chunk_size,
        )
    layer.set_state(state)
    return out.transpose(1, 2).contiguous(), None


def _with_prefix_state(q, k, v, mask, prefix, fmap, options):
    phi = get_feature_map(fmap)
    pk, pv, pmask = prefix
    if getattr(phi, "per_head", False) and k.shape[1] != q.shape[1]:
        k, v, pk, pv = (repeat_kv(x, q.shape[1]) for x in (k, v, pk, pv))
    kf_prefix = phi(pk.float())
    if pmask is not None:
        kf_prefix = kf_prefix * pmask[:, None, :, None]
    state = (kf_prefix.transpose(-1, -2) @ pv.float(), kf_prefix.sum(2))
    kf = phi(k.float())
    if mask is not None:
        kf = kf * mask[:, None, :, None]
    out, _ = chunk_linear_attention(
        phi(q.float()), kf, v, causal=True, initial_state=state, chunk_size=options.chunk_size, backend=options.backend
    )
    return out


def fast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"fast": FAST fastmax of order 1 or 2. `scaling` is not used: q and k are normalized, `temperature` scales."""
    value = key_dropout(value, dropout)  # attention dropout as whole keys dropped for every query (ops/dropout.py)
    options = get_options(module.config)
    layer = getattr(module, "fastattn_recurrent_layer", None)
    if layer is not None:
        return _recurrent_forward(
            module, layer, query, key, value, attention_mask, "fast", options,
            fast_feature_map(options.order, options.temperature), normalize=fast_normalize,
            intra=lambda qc, kc: fastmax_weight(qc @ kc.transpose(-1, -2) / options.temperature, options.order),
        )

    def run(q, k, v, causal, mask, prefix=None):
        if prefix is None:
            return fast_attention(
                q, k, v, causal=causal, order=options.order, temperature=options.temperature, padding_mask=mask,
                chunk_size=options.chunk_size, backend=options.backend,
            )
        pk, pv, pmask = prefix
        fmap = fast_feature_map(options.order, options.temperature)
        return _with_prefix_state(
            fast_normalize(q.float()), fast_normalize(k.float()), v, mask,
            (fast_normalize(pk.float()), pv, pmask), fmap, options,
        )

    return _linear_like(module, query, key, value, attention_mask, is_causal, "fast", run)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"sparse": softmax attention under the Child et al. pattern of `config.fastattn` (pattern, stride, ...)."""
    check_supported(module, "sparse")
    options = get_options(module.config)
    mask = _key_padding(attention_mask, key.shape[2], "sparse")
    out = sparse_attention(
        query, key, value, causal=_is_causal(module, is_causal), pattern=options.pattern, stride=options.stride,
        local=options.local, summary=options.summary, scaling=scaling, padding_mask=mask, backend=options.backend,
        dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


def mean_pool_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hkv, N, D]` -> `[B, groups, N, D]`: the mean of each run of Hkv / groups consecutive heads."""
    b, hkv, n, d = x.shape
    if hkv % groups != 0:
        raise ValueError(f"mqa: kv_groups={groups} must divide the model's {hkv} key/value heads")
    return x.view(b, groups, hkv // groups, n, d).mean(2)


# set on attention modules that normalize each key head (Qwen3's `k_norm`) once `enable_mqa_key_pooling` hooked them
POOLED_BEFORE_NORM = "_fastattn_mqa_pooled_before_norm"


def mqa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"mqa": K/V mean-pooled into `kv_groups` heads at run time (Ainslie et al. 2023 init), then SDPA.

    This is exactly the model whose K/V projections were mean-pooled (`hf_fastattn.convert(model, "mqa")`, or "gqa"
    with `num_key_value_heads=kv_groups`), in every supported family:
    - Llama, Mistral, Qwen2, GPT-2, BERT: the keys arrive after RoPE (or none), which rotates every head alike, so
      pooling them here equals pooling the projections.
    - Qwen3 normalizes each key head (`k_norm`, RMSNorm) before RoPE, and the mean of normalized heads is not the
      normalized mean. So `enable_mqa_key_pooling` (run when "mqa" is set: `from_pretrained`, `from_config`,
      `set_attn_implementation`) hooks `k_norm` to pool the projected keys *before* the norm; the heads of a group
      then arrive equal and one per group is kept. A Qwen3 module without the hook is refused rather than computing
      the other model (mean of normalized keys).
    """
    check_supported(module, "mqa")
    groups = get_options(module.config).kv_groups
    if getattr(module, "k_norm", None) is not None:
        if not getattr(module, POOLED_BEFORE_NORM, False):
            raise ValueError(
                f"hf_fastattn 'mqa': {type(module).__name__} normalizes each key head (k_norm), so its keys must be "
                "pooled before the norm; set the implementation with model.set_attn_implementation('mqa') or "
                "from_pretrained(..., attn_implementation='mqa') (not by assigning config._attn_implementation), "
                "or call hf_fastattn.integration.registry.enable_mqa_key_pooling(model)"
            )
        hkv = key.shape[1]
        if hkv % groups != 0:
            mean_pool_heads(key, groups)  # raises the error naming the valid values
        key = key[:, :: hkv // groups]  # the group's heads are equal (pooled before k_norm)
    else:
        key = mean_pool_heads(key, groups)
    value = mean_pool_heads(value, groups)
    shim = SimpleNamespace(
        num_key_value_groups=query.shape[1] // groups, is_causal=getattr(module, "is_causal", True),
        layer_idx=getattr(module, "layer_idx", None),
    )
    return sdpa_attention_forward(shim, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def _pool_keys_before_norm(attention: torch.nn.Module, norm: torch.nn.Module, args):
    """Forward pre-hook of `attention.k_norm` (input `[B, N, Hkv, D]`, the projected keys): under "mqa", replace each
    head by the mean of its group of Hkv / kv_groups heads, as a model with mean-pooled K projections computes."""
    if getattr(attention.config, "_attn_implementation", None) != "mqa":
        return None
    (keys, *rest) = args
    groups = get_options(attention.config).kv_groups
    b, n, hkv, d = keys.shape
    if hkv % groups != 0:
        raise ValueError(f"mqa: kv_groups={groups} must divide the model's {hkv} key/value heads")
    pooled = keys.view(b, n, groups, hkv // groups, d).mean(3, keepdim=True).expand(b, n, groups, hkv // groups, d)
    return (pooled.reshape(b, n, hkv, d), *rest)


def enable_mqa_key_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Hook the key norm (`k_norm`, Qwen3) of every attention module of `model` so that "mqa" pools the keys before
    it (see `mqa_attention_forward`). Idempotent; the hooks do nothing unless the implementation is "mqa".

    Returns:
        The model.
    """
    for module in model.modules():
        norm = getattr(module, "k_norm", None)
        if isinstance(norm, torch.nn.Module) and isinstance(getattr(module, "layer_idx", None), int):
            if not getattr(module, POOLED_BEFORE_NORM, False):
                norm.register_forward_pre_hook(functools.partial(_pool_keys_before_norm, module))
                setattr(module, POOLED_BEFORE_NORM, True)
    return model


ATTENTION_FUNCTIONS = {
    "linear": linear_attention_forward,
    "fast": fast_attention_forward,
    "sparse": sparse_attention_forward,
    "mqa": mqa_attention_forward,
}
MASK_FUNCTIONS = {"linear": padding_mask, "fast": padding_mask, "sparse": padding_mask, "mqa": sdpa_mask}


def register() -> None:
    """Register every implementation with `AttentionInterface` and `AttentionMaskInterface` (idempotent)."""
    for name, fn in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, MASK_FUNCTIONS[name])
