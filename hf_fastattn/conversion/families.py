"""What conversion needs to know about each supported architecture family, in one table.

A family says which modules are the attention modules handed to the attention function (where learned feature maps
are attached), their head counts, whether they are causal, how K and V are projected (for mean pooling) and which
modules LoRA targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONVERTED_PREFIX = "hf_fastattn_"


@dataclass(frozen=True)
class Family:
    """Args:
    name: the base `model_type` ("llama", "gpt2", ...).
    attention_class: class name of the module that calls the attention function.
    native_gqa: the architecture has `num_key_value_heads` (a pooled model is a standard checkpoint).
    causal: decoder (True) or encoder (False).
    lora_targets: a peft `target_modules` regex for the attention projections.
    """

    name: str
    attention_class: str
    native_gqa: bool
    causal: bool
    lora_targets: str


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaAttention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "mistral": Family(
        "mistral", "MistralAttention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    ),
    "qwen2": Family("qwen2", "Qwen2Attention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "qwen3": Family("qwen3", "Qwen3Attention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "gpt2": Family("gpt2", "GPT2Attention", False, True, r".*\.attn\.(c_attn|c_proj)"),
    "bert": Family(
        "bert", "BertSelfAttention", False, False, r".*attention\.(self\.(query|key|value)|output\.dense)"
    ),
}


def base_model_type(config) -> str:
    return str(getattr(config, "model_type", "")).removeprefix(CONVERTED_PREFIX)


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model, or a ValueError naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = base_model_type(config) if config is not None else None
    if model_type not in FAMILIES:
        raise ValueError(
            f"hf_fastattn.convert: model_type {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"model types are {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def attention_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The self-attention modules, in layer order (GPT-2 cross attention excluded)."""
    found = [
        m
        for m in model.modules()
        if type(m).__name__ == family.attention_class and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise ValueError(
            f"hf_fastattn.convert: no {family.attention_class} modules found in {type(model).__name__}"
        )
    return found


def head_counts(config, family: Family) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head dim D)."""
    if family.name == "gpt2":
        return config.n_head, config.n_head, config.n_embd // config.n_head
    h = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // h
    return h, getattr(config, "num_key_value_heads", None) or h, d


def _pool_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Rows `[heads * D, ...]` -> `[groups * D, ...]`: the mean over each run of heads / groups consecutive heads."""
    rest = w.shape[1:]
    return w.reshape(groups, heads // groups, head_dim, *rest).mean(1).reshape(groups * head_dim, *rest)


def _tie_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Like `_pool_rows` but each group's mean is written back to all its heads (same shape as `w`)."""
    rest = w.shape[1:]
    pooled = w.reshape(groups, heads // groups, head_dim, *rest).mean(1, keepdim=True)
    return pooled.expand(groups, heads // groups, head_dim, *rest).reshape(w.shape)


@torch.no_grad()
def pool_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Mean-pool the K and V projections (weights and biases) into `groups` heads, in place.

    Native-GQA families get smaller k/v projections and `config.num_key_value_heads = groups` (a standard model).
    GPT-2 and BERT keep their shapes: every head of a group gets the group's mean, so the model equals the pooled one
    and the "mqa" attention function (kv_groups = groups) computes it with `groups` K/V heads.
    """
    config = model.config
    h, hkv, d = head_counts(config, family)
    if groups < 1 or hkv % groups != 0:
        raise ValueError(
            f"num_key_value_heads={groups} must divide the model's {hkv} key/value heads "
            f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
        )
    for module in attention_modules(model, family):
        if family.native_gqa:
            for name in ("k_proj", "v_proj"):
                old: nn.Linear = getattr(module, name)
                new = nn.Linear(old.in_features, groups * d, bias=old.bias is not None)
                new.to(device=old.weight.device, dtype=old.weight.dtype)
                new.weight.copy_(_pool_rows(old.weight, hkv, groups, d))
                if old.bias is not None:
                    new.bias.copy_(_pool_rows(old.bias, hkv, groups, d))
                setattr(module, name, new)
            module.num_key_value_groups = h // groups
        elif family.name == "gpt2":
            # Conv1D: weight [E, 3E] with output columns q | k | v, bias [3E]
            e = h * d
            w, b = module.c_attn.weight, module.c_attn.bias
            for part in (1, 2):
                cols = slice(part * e, (part + 1) * e)
                w[:, cols] = _tie_rows(w[:, cols].t(), h, groups, d).t()
                b[cols] = _tie_rows(b[cols], h, groups, d)
        else:  # bert
            for lin in (module.key, module.value):
                lin.weight.copy_(_tie_rows(lin.weight, h, groups, d))
                lin.bias.copy_(_tie_rows(lin.bias, h, groups, d))
    if family.native_gqa:
        config.num_key_value_heads = groups


# ---------------------------------------------------------------------------------------------------------------
# circuit-preserving K/V pooling (init="svd" of "mqa" / "gqa")


def _linear_rows(lin: nn.Linear) -> torch.Tensor:
    """`[out, in + 1]`: the weight with the bias (zeros if none) as a last column."""
    bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
    return torch.cat([lin.weight, bias[:, None]], 1)


def _attention_parts(model: nn.Module, family: Family, module: nn.Module):
    """(Q [H, D, E+1], K [Hkv, D, E+1], V [Hkv, D, E+1], O [E, H, D], rotary) of one attention module, in float64:
    projection rows with their biases as a last column (E the hidden size), O the output projection per head."""
    h, hkv, d = head_counts(model.config, family)
    if family.name == "gpt2":
        e = h * d
        w = torch.cat([module.c_attn.weight.t(), module.c_attn.bias[:, None]], 1).double()  # [3E, E+1]
        q, k, v = w[:e], w[e : 2 * e], w[2 * e :]
        o = module.c_proj.weight.t().double()  # Conv1D [in H*D, out E] -> [E, H*D]
    elif family.name == "bert":
        q, k, v = (_linear_rows(lin).double() for lin in (module.query, module.key, module.value))
        o = _bert_output(model, module).weight.double()
    else:
        q, k, v = (_linear_rows(lin).double() for lin in (module.q_proj, module.k_proj, module.v_proj))
        o = module.o_proj.weight.double()
    n = q.shape[1]
    return q.view(h, d, n), k.view(hkv, d, n), v.view(hkv, d, n), o.view(o.shape[0], h, d), family.native_gqa


def _bert_output(model: nn.Module, module: nn.Module) -> nn.Linear:
    """The output projection of a BertSelfAttention: the `output.dense` of its parent BertAttention."""
    for parent in model.modules():
        if getattr(parent, "self", None) is module and hasattr(parent, "output"):
            return parent.output.dense
    raise ValueError("hf_fastattn: cannot find the output projection of a BERT self-attention module")


def _split_svd(stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [M, r], right [r, N]) with left @ right the best rank-r approximation of `stack`, the singular values
    split evenly (sqrt each side) so that both factors keep the scale of the weights they replace."""
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def _fit_group(q, k, v, o, heads: list[int], kv_of: list[int], d: int, rotary: bool):
    """Shared K and V rows `[D, E+1]` of one group of query heads, with the group's new Q rows and O columns."""
    n, e = q.shape[-1], o.shape[0]
    # values: the output-value circuits O_h V_h of the group's heads, stacked, at rank D: V' shared, O_h' per head
    left, v_new = _split_svd(torch.cat([o[:, h] @ v[kv_of[h]] for h in heads]), d)
    o_new = {h: left[i * e : (i + 1) * e] for i, h in enumerate(heads)}
    q_new = {h: q[h].clone() for h in heads}
    k_new = torch.empty(d, n, dtype=q.dtype)
    if not rotary:
        # scores x_q^T Q_h^T K_h x_k: the query-key circuits Q_h^T K_h stacked, at rank D
        left, k_new = _split_svd(torch.cat([q[h].t() @ k[kv_of[h]] for h in heads]), d)
        for i, h in enumerate(heads):
            q_new[h] = left[i * n : (i + 1) * n].t()
        return q_new, k_new, v_new, o_new
    # RoPE rotates dims (j, j + D/2) as one complex number z_j = x_j + i x_{j+D/2}; a complex factor per head and
    # pair commutes with it, so each pair gets a shared key row and per-head query rows from a complex rank-1 fit
    # of the circuits conj(q_hj) k_hj^T (score = Re(conj(z_q) z_k e^{i(theta_k - theta_q)})).
    half = d // 2
    for j in range(half):
        qz = {h: torch.complex(q[h, j], q[h, j + half]) for h in heads}
        kz = {h: torch.complex(k[kv_of[h], j], k[kv_of[h], j + half]) for h in heads}
        left, right = _split_svd(torch.cat([torch.outer(qz[h].conj(), kz[h]) for h in heads]), 1)
        k_new[j], k_new[j + half] = right[0].real, right[0].imag
        for i, h in enumerate(heads):
            qh = left[i * n : (i + 1) * n, 0].conj()
            q_new[h][j], q_new[h][j + half] = qh.real, qh.imag
    return q_new, k_new, v_new, o_new


@torch.no_grad()
def fit_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Pool K/V into `groups` heads keeping the attention circuits, in place (the "svd" init of mqa / gqa).

    Mean pooling (`pool_kv`) averages the K and V projections of a group's heads. This fit instead keeps what the
    heads compute as closely as a shared K/V head allows, from the weights alone: per group, the value-output
    circuits `O_h V_h` of its heads are stacked and factored at rank D (truncated SVD), giving the shared V
    projection and new per-head output columns; the query-key circuits `Q_h^T K_h` likewise give the shared K
    projection and new per-head query rows. With rotary embeddings the fit is per rotary pair, a complex rank-1
    factorization (a complex factor commutes with the rotation). Exact when nothing is pooled (groups = K/V heads);
    Q, K, V and O change (biases included), the shapes are those of `pool_kv`. Not for models that normalize
    q and k per head (Qwen3's q_norm / k_norm): that normalization does not commute with the refit.
    """
    config = model.config
    h, hkv, d = head_counts(config, family)
    if groups < 1 or hkv % groups != 0:
        raise ValueError(
            f"num_key_value_heads={groups} must divide the model's {hkv} key/value heads "
            f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
        )
    modules = attention_modules(model, family)
    if any(hasattr(m, "q_norm") or hasattr(m, "k_norm") for m in modules):
        raise ValueError(
            f"init='svd' does not apply to {family.name!r}: its attention normalizes q and k per head (q_norm / "
            "k_norm), which the refit of the query rows does not commute with; use init='mean'"
        )
    if family.native_gqa and d % 2:
        raise ValueError(f"init='svd' needs an even head dim for the rotary pairs, got {d}")
    per = h // groups
    kv_of = [i // (h // hkv) for i in range(h)]
    for module in modules:
        q, k, v, o, rotary = _attention_parts(model, family, module)
        n = q.shape[-1]
        new_q, new_o = q.clone(), o.clone()
        new_k = torch.empty(groups, d, n, dtype=q.dtype)
        new_v = torch.empty(groups, d, n, dtype=q.dtype)
        for g in range(groups):
            heads = list(range(g * per, (g + 1) * per))
            qg, new_k[g], new_v[g], og = _fit_group(q, k, v, o, heads, kv_of, d, rotary)
            for i in heads:
                new_q[i], new_o[:, i] = qg[i], og[i]
        _write_parts(model, family, module, new_q, new_k, new_v, new_o, per)
    if family.native_gqa:
        config.num_key_value_heads = groups


def _set_linear(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight.copy_(rows[:, :-1].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(rows[:, -1].to(lin.bias.dtype))


def _write_parts(model, family, module, q, k, v, o, per: int) -> None:
    h, d, n = q.shape
    e = o.shape[0]
    q2, o2 = q.reshape(h * d, n), o.reshape(e, h * d)
    if family.native_gqa:
        groups = k.shape[0]
        for name, rows in (("k_proj", k), ("v_proj", v)):
            old: nn.Linear = getattr(module, name)
            new = nn.Linear(old.in_features, groups * d, bias=old.bias is not None)
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            _set_linear(new, rows.reshape(groups * d, n))
            setattr(module, name, new)
        _set_linear(module.q_proj, q2)
        module.o_proj.weight.copy_(o2.to(module.o_proj.weight.dtype))
        module.num_key_value_groups = h // groups
        return
    # GPT-2 / BERT keep one K/V row block per head: every head of a group gets the group's shared rows
    k2 = k.repeat_interleave(per, 0).reshape(h * d, n)
    v2 = v.repeat_interleave(per, 0).reshape(h * d, n)
    if family.name == "gpt2":
        w = module.c_attn.weight
        rows = torch.cat([q2, k2, v2])  # [3E, E+1]
        w.copy_(rows[:, :-1].t().to(w.dtype))
        module.c_attn.bias.copy_(rows[:, -1].to(w.dtype))
        module.c_proj.weight.copy_(o2.t().to(module.c_proj.weight.dtype))
    else:
        _set_linear(module.query, q2)
        _set_linear(module.key, k2)
        _set_linear(module.value, v2)
        out = _bert_output(model, module).weight
        out.copy_(o2.to(out.dtype))
