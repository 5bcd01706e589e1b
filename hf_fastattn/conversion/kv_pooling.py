"""K/V pooling of the attention modules that `families.Family` describes, in place: mean pooling (`pool_kv`, the
"mean" init of "mqa" / "gqa") and the circuit-preserving fit (`fit_kv`, the "svd" init). Split from `families.py`:
that module reads a model, this one rewrites its K/V projections.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .families import (
    K_NAMES,
    POOLING_SUPPORTED,
    Q_NAMES,
    V_NAMES,
    Family,
    _child,
    _forward_owner,
    _fused_projection,
    _output_projection,
    _text_config,
    attention_modules,
    module_heads,
)

# ---------------------------------------------------------------------------------------------------------------
# the K/V projections of one attention module, as rows [out, in + 1] (the bias, zeros if none, as a last column)


def _rows(proj: nn.Module) -> torch.Tensor:
    w = proj.weight.t() if isinstance(proj, Conv1D) else proj.weight  # Conv1D: [in, out]
    bias = proj.bias if proj.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, bias[:, None]], 1)


def _set_rows(proj: nn.Module, rows: torch.Tensor) -> None:
    w = rows[:, :-1].to(proj.weight.dtype)
    proj.weight.copy_(w.t() if isinstance(proj, Conv1D) else w)
    if proj.bias is not None:
        proj.bias.copy_(rows[:, -1].to(proj.bias.dtype))


def _new_linear(old: nn.Module, rows: torch.Tensor) -> nn.Linear:
    """A Linear with `rows` (fewer outputs than `old`), on `old`'s device and dtype."""
    new = nn.Linear(rows.shape[1] - 1, rows.shape[0], bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    _set_rows(new, rows)
    return new


def _fused_index(layout: str, h: int, hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of q, k and v in a fused projection."""
    if layout == "blocks":
        q = torch.arange(h * d)
        k = h * d + torch.arange(hkv * d)
        return q, k, h * d + hkv * d + torch.arange(hkv * d)
    if h != hkv:
        raise ValueError(
            f"hf_fastattn: a per-head fused q/k/v projection needs as many K/V heads as heads ({hkv} != {h})"
        )
    per = torch.arange(h)[:, None] * 3 * d + torch.arange(d)  # [H, D]
    return per.flatten(), (per + d).flatten(), (per + 2 * d).flatten()


def _kv_check(model: nn.Module, family: Family) -> None:
    if family.kv_layout is None:
        raise ValueError(
            f'hf_fastattn: K/V pooling ("mqa" / "gqa") does not support {family.name!r}: {family.kv_refusal}. '
            f"Supported: {POOLING_SUPPORTED}"
        )


def _read_qkv(module: nn.Module, family: Family, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [H D, E+1], k [Hkv D, E+1], v [Hkv Dv, E+1]) rows of one attention module."""
    h, hkv, d = heads
    if family.kv_layout == "separate":
        q = _child(module, Q_NAMES)
        k, v = _child(module, K_NAMES)[1], _child(module, V_NAMES)[1]
        return (_rows(q[1]) if q else None), _rows(k), _rows(v)
    rows = _rows(_fused_projection(module)[1])
    qi, ki, vi = _fused_index(family.kv_layout, h, hkv, d)
    return rows[qi], rows[ki], rows[vi]


def _write_qkv(module: nn.Module, family: Family, heads, q, k, v) -> None:
    """Write q, k, v rows back; k and v with fewer heads than the module has (native GQA) replace the projections
    by smaller ones and update the module's head attributes."""
    h, hkv, d = heads
    groups = k.shape[0] // d
    if family.kv_layout == "separate":
        found = _child(module, Q_NAMES)
        if q is not None and found is not None:
            _set_rows(found[1], q)
        for names, rows in ((K_NAMES, k), (V_NAMES, v)):
            name, proj = _child(module, names)
            if rows.shape[0] == proj.weight.shape[0 if isinstance(proj, nn.Linear) else 1]:
                _set_rows(proj, rows)
            else:
                setattr(module, name, _new_linear(proj, rows))
    else:
        name, proj = _fused_projection(module)
        if groups == hkv:
            full = _rows(proj).clone()
            qi, ki, vi = _fused_index(family.kv_layout, h, hkv, d)
            full[qi], full[ki], full[vi] = q.to(full.dtype), k.to(full.dtype), v.to(full.dtype)
            _set_rows(proj, full)
        else:  # blocks, fewer K/V heads
            setattr(module, name, _new_linear(proj, torch.cat([q, k, v]).to(proj.weight.dtype)))
    if groups != hkv:
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, groups)
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = h // groups


def _check_groups(model: nn.Module, groups: int) -> list[tuple[nn.Module, tuple[int, int, int]]]:
    modules = [(m, module_heads(m, model.config)) for m in attention_modules(model)]
    for _, (_, hkv, _) in modules:
        if not isinstance(groups, int) or groups < 1 or hkv % groups != 0:
            raise ValueError(
                f"num_key_value_heads={groups} must divide the model's {hkv} key/value heads "
                f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
            )
    return modules


def _pool_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Rows `[heads * D, ...]` -> `[groups * D, ...]`: the mean over each run of heads / groups consecutive heads."""
    rest = w.shape[1:]
    return w.reshape(groups, heads // groups, head_dim, *rest).mean(1).reshape(groups * head_dim, *rest)


def _tie_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Like `_pool_rows` but each group's mean is written back to all its heads (same shape as `w`)."""
    rest = w.shape[1:]
    pooled = w.reshape(groups, heads // groups, head_dim, *rest).mean(1, keepdim=True)
    return pooled.expand(groups, heads // groups, head_dim, *rest).reshape(w.shape)


def _set_config_kv_heads(model: nn.Module, groups: int) -> None:
    _text_config(model.config).num_key_value_heads = groups
    if model.config is not _text_config(model.config) and hasattr(model.config, "num_key_value_heads"):
        model.config.num_key_value_heads = groups


@torch.no_grad()
def pool_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Mean-pool the K and V projections (weights and biases) into `groups` heads, in place.

    Native-GQA families get smaller K/V projections and `config.num_key_value_heads = groups` (a standard model).
    The others keep their shapes: every head of a group gets the group's mean, so the model equals the pooled one
    and the "mqa" attention function (kv_groups = groups) computes it with `groups` K/V heads.
    """
    _kv_check(model, family)
    for module, heads in _check_groups(model, groups):
        _, hkv, _ = heads
        q, k, v = _read_qkv(module, family, heads)
        dk, dv = k.shape[0] // hkv, v.shape[0] // hkv
        pool = _pool_rows if family.native_gqa else _tie_rows
        _write_qkv(module, family, heads, q, pool(k, hkv, groups, dk), pool(v, hkv, groups, dv))
    if family.native_gqa:
        _set_config_kv_heads(model, groups)


# ---------------------------------------------------------------------------------------------------------------
# circuit-preserving K/V pooling (init="svd" of "mqa" / "gqa")


def _plain_function(obj):
    """The Python function behind a modeling module's helper: the object itself, or, where the `kernels` package is
    installed and transformers wrapped the helper for hub kernels (`use_kernel_func_from_hub`, an `nn.Module` named
    `Func` whose forward calls the original), the function that wrapper holds. None when there is none to read."""
    if obj is None or inspect.isfunction(obj):
        return obj
    wrapped = getattr(obj, "__wrapped__", None)
    if inspect.isfunction(wrapped):
        return wrapped
    forward = getattr(type(obj), "forward", None)
    cells = getattr(forward, "__closure__", None) or ()
    inner = [c.cell_contents for c in cells if inspect.isfunction(getattr(c, "cell_contents", None))]
    return inner[0] if len(inner) == 1 else None


def _rope_pairs(model: nn.Module, d: int) -> tuple[list[tuple[int, int]], list[int]] | None:
    """None without a rotary embedding in q and k; else (the pairs of head dims RoPE rotates together, the dims it
    leaves alone). Read from the config (partial rotary: `partial_rotary_factor`, `rotary_dim`, `rotary_pct`) and from
    the modeling code's rotation: Llama's `rotate_half` pairs (j, j + R/2), the interleaved forms (`x[..., ::2]` or
    `x[..., 0::2]`: Cohere, GLM, GPT-J's `rotate_every_two`) pair (2j, 2j + 1); the first R dims of each head are rotated. A ValueError otherwise."""
    text = _text_config(model.config)
    rope = getattr(text, "rope_parameters", None)
    rotary_dim = getattr(text, "rotary_dim", None)
    if rope is None and rotary_dim is None and getattr(text, "position_embedding_type", None) != "rotary":
        return None
    factors = [getattr(text, "partial_rotary_factor", None), getattr(text, "rotary_pct", None)]
    if isinstance(rope, dict):
        nested = [p for p in rope.values() if isinstance(p, dict)] or [rope]
        factors += [p.get("partial_rotary_factor") for p in nested]
    factors = {f for f in factors if f is not None}
    if len(factors) > 1:
        raise ValueError(
            f"its rotary embedding covers different fractions of the head per layer type {sorted(factors)}"
        )
    r = rotary_dim if rotary_dim is not None else int(d * factors.pop()) if factors else d
    if r % 2 or not 0 < r <= d:
        raise ValueError(f"its rotary embedding covers {r} of the {d} head dims, not an even number of them")
    module = sys.modules.get(_forward_owner(type(attention_modules(model)[0])).__module__)
    apply = _plain_function(getattr(module, "apply_rotary_pos_emb", None))
    source = inspect.getsource(apply) if apply is not None else ""
    rotate = next((getattr(module, n) for n in ("rotate_half", "rotate_every_two") if f"{n}(" in source), None)
    rotate = _plain_function(rotate)
    rotate_source = inspect.getsource(rotate) if rotate is not None else ""
    if any(f"x[{lead}{start}::2]" in rotate_source for lead in ("..., ", ":, :, :, ") for start in ("", "0")):
        return [(2 * j, 2 * j + 1) for j in range(r // 2)], list(range(r, d))
    if "x[..., : x.shape[-1] // 2]" in rotate_source:
        return [(j, j + r // 2) for j in range(r // 2)], list(range(r, d))
    raise ValueError("its rotary embedding's rotation is not one the per-pair fit knows (rotate_half, interleaved)")


# a rotary pair that turns less than this many radians over the calibration context is fit as unrotated dims
SLOW_TURN = 0.5


def _rotary_frequencies(model: nn.Module) -> torch.Tensor | None:
    """The rotary embedding's frequency (radians per position) of each rotated pair, from the `inv_freq` buffers of
    the model's rotary modules; where there are several (Gemma's local and global layers), the fastest of each pair.
    None where the model holds none, or where they differ in length."""
    found = [
        buf.detach().float().cpu()
        for name, buf in model.named_buffers()
        if (leaf := name.rsplit(".", 1)[-1]).endswith("inv_freq") and "original" not in leaf
    ]
    if not found or len({len(f) for f in found}) != 1:
        return None
    return torch.stack(found).amax(0)


def _slow_pairs_unrotated(rope, frequencies: torch.Tensor | None, context: int | None):
    """`rope` (pairs, plain) with the pairs that turn less than `SLOW_TURN` radians over `context` positions moved
    to the plain dims: over such a context their rotation is nearly the identity, and fit as plain dims they share
    one real subspace with a full per-head query map instead of a complex factor per head and pair (a less lossy
    fit; SmolLM2-135M: the 8 slowest of 32 pairs at 2048 tokens). Unchanged without frequencies or a context."""
    if rope is None or frequencies is None or not context or len(frequencies) != len(rope[0]):
        return rope
    pairs, plain = rope
    slow = [pair for pair, f in zip(pairs, frequencies.tolist(), strict=True) if f * context < SLOW_TURN]
    fast = [pair for pair in pairs if pair not in slow]
    return fast, sorted(plain + [i for pair in slow for i in pair])


def _split_svd(stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [M, r], right [r, N]) with left @ right the best rank-r approximation of `stack`, the singular values
    split evenly (sqrt each side) so that both factors keep the scale of the weights they replace."""
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _rank1_of_stacked_outers(us: list[torch.Tensor], ws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_split_svd(cat([outer(u_h, w_h) for h]), 1)` without the [H N, N] matrix: it is B C with B = blockdiag(u_h)
    (orthogonal columns, norms r_h) and C the rows w_h, so its SVD is that of the [H, N] matrix diag(r) C, with the
    left vectors mapped back through B's normalized columns (an H x N SVD instead of an H N x N one; the same factors
    up to a unit phase shared by both, which leaves their product unchanged)."""
    norms = torch.stack([u.norm() for u in us])
    small = norms[:, None].to(ws[0].dtype) * torch.stack(ws)
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    root = s[0].sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    left = torch.cat([us[h] / safe[h] * u[h, 0] * root for h in range(len(us))])
    return left[:, None], root * vh[:1]


def _complex_rows(pair: torch.Tensor) -> torch.Tensor:
    """Rows [2, N] of one rotary pair (a, b) as the complex row a + i b."""
    return torch.complex(pair[0], pair[1])


@torch.no_grad()
def _fit_group(q, k, v, o, heads: list[int], kv_of: list[int], d: int, rope, root=None):
    """Shared K and V rows `[D, E+1]` of one group of query heads, with the group's new Q rows and O columns.
    `rope`: None, or (pairs of dims rotated together, dims not rotated) from `_rope_pairs`. `root`: None (every input
    direction weighs the same), or (S, S^-1) with S the square root of the inputs' second moment E[x x^T] (x with a
    trailing 1 for the bias): the circuits are then fit in the norm the inputs see, ||(C - C') S||."""
    n, e = q.shape[-1], o.shape[0]
    s, s_inv = root if root is not None else (None, None)

    def w(m):  # a circuit's input side, whitened
        return m if s is None else m @ s

    def unw(m):
        return m if s is None else m @ s_inv

    # values: the output-value circuits O_h V_h of the group's heads, stacked, at rank D: V' shared, O_h' per head
    left, v_new = _split_svd(torch.cat([w(o[:, h] @ v[kv_of[h]]) for h in heads]), d)
    v_new = unw(v_new)
    o_new = {h: left[i * e : (i + 1) * e] for i, h in enumerate(heads)}
    q_new = {h: q[h].clone() for h in heads}
    k_new = torch.empty(d, n, dtype=q.dtype)
    pairs, plain = rope if rope is not None else ([], list(range(d)))
    if plain:
        # scores x_q^T Q_h^T K_h x_k over the dims RoPE leaves alone: the circuits Q_h^T K_h stacked, at their rank
        stack = torch.cat([w(q[h, plain]).t() @ w(k[kv_of[h], plain]) for h in heads])
        left, right = _split_svd(stack, len(plain))
        k_new[plain] = unw(right)
        for i, h in enumerate(heads):
            q_new[h][plain] = unw(left[i * n : (i + 1) * n].t())
    # RoPE rotates each pair of dims (a, b) as one complex number z = x_a + i x_b; a complex factor per head and pair
    # commutes with it, so each pair gets a shared key row and per-head query rows from a complex rank-1 fit of the
    # circuits conj(q_h) k_h^T (score = Re(conj(z_q) z_k e^{i(theta_k - theta_q)})).
    for a, b in pairs:
        qz = {h: _complex_rows(w(q[h, [a, b]])) for h in heads}
        kz = {h: _complex_rows(w(k[kv_of[h], [a, b]])) for h in heads}
        left, right = _rank1_of_stacked_outers([qz[h].conj() for h in heads], [kz[h] for h in heads])
        k_new[[a, b]] = unw(torch.stack([right[0].real, right[0].imag]))
        for i, h in enumerate(heads):
            qh = left[i * n : (i + 1) * n, 0].conj()
            q_new[h][[a, b]] = unw(torch.stack([qh.real, qh.imag]))
    return q_new, k_new, v_new, o_new


def _svd_refusal(model: nn.Module, family: Family, module: nn.Module, heads) -> str | None:
    """Why the circuit fit cannot refit this module, or None."""
    h, hkv, d = heads
    if family.kv_layout == "separate" and _child(module, Q_NAMES) is None:
        return "no separate query projection was found"
    out = _output_projection(model, module)
    if out is None:
        return "no output projection was found"
    q, k, v = _read_qkv(module, family, heads)
    if v.shape[0] != hkv * d or q.shape[0] != h * d:
        return "its value (or query) heads are not of the key head size"
    if (out[1].weight.shape[1] if isinstance(out[1], nn.Linear) else out[1].weight.shape[0]) != h * d:
        return "its output projection does not take the H * D attention outputs"
    projections = {id(p) for m in (*_projection_modules(module, family), out[1]) for p in m.parameters()}
    other = [n for n, p in module.named_parameters() if id(p) not in projections]
    other += [n for n, _ in module.named_children() if "norm" in n.lower() and n not in other]  # parameter-free norms
    if other:
        return (
            f"its attention has parameters or norms beside the q/k/v/o projections ({', '.join(other[:4])}: norms, "
            "gates or sinks), which do not commute with the refit of the query and output rows"
        )
    return None


def _projection_modules(module: nn.Module, family: Family) -> list[nn.Module]:
    if family.kv_layout == "separate":
        found = [_child(module, names) for names in (Q_NAMES, K_NAMES, V_NAMES)]
        return [child for _, child in filter(None, found)]
    return [_fused_projection(module)[1]]


@torch.no_grad()
def input_second_moments(model: nn.Module, family: Family, batches) -> dict[nn.Module, torch.Tensor]:
    """E[x x^T] (float64, [E+1, E+1], x with a trailing 1 for the bias) of the hidden states entering each attention
    module's q/k/v projections, over the token id batches `batches` (each `[B, T]`, or a dict with "input_ids" and
    an optional "attention_mask"), run through `model` without a cache. Padding positions are not counted."""
    stats: dict[nn.Module, list] = {}
    hooks, current = [], {"mask": None}  # the running batch's attention mask (on the model's device), for the hooks

    def hook_for(module):
        def hook(_, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().double()
            if current["mask"] is not None:
                x = x[current["mask"]]
            x = x.reshape(-1, x.shape[-1])
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
            acc = stats.setdefault(module, [0.0, 0])
            acc[0] = acc[0] + x.t() @ x
            acc[1] += x.shape[0]

        return hook

    for module in attention_modules(model):
        proj = _projection_modules(module, family)[0]
        hooks.append(proj.register_forward_pre_hook(hook_for(module), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = batch if isinstance(batch, dict) else {"input_ids": batch}
            ids = torch.as_tensor(batch["input_ids"])
            ids = ids[None] if ids.dim() == 1 else ids
            mask = batch.get("attention_mask")
            mask = None if mask is None else torch.as_tensor(mask).reshape(ids.shape).to(device)
            current["mask"] = None if mask is None else mask.bool()
            model(input_ids=ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("input_second_moments: no batches were given (calibration data is empty)")
    return {module: total / count for module, (total, count) in stats.items()}


def calibration_length(batches) -> int:
    """The longest sequence among calibration batches (as `input_second_moments` takes them): the context the
    calibrated fit serves."""
    lengths = [torch.as_tensor(b["input_ids"] if isinstance(b, dict) else b).shape[-1] for b in batches]
    if not lengths:
        raise ValueError("calibration_length: no batches were given (calibration data is empty)")
    return max(lengths)


def _root(moment: torch.Tensor, damp: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1), S the symmetric square root of `moment` damped by `damp` x its mean eigenvalue (directions the
    inputs never take keep a small weight instead of an infinite inverse)."""
    eigvals, eigvecs = torch.linalg.eigh(moment)
    eigvals = eigvals.clamp_min(0) + damp * eigvals.clamp_min(0).mean()
    return (eigvecs * eigvals.sqrt()) @ eigvecs.t(), (eigvecs / eigvals.sqrt()) @ eigvecs.t()


@torch.no_grad()
def fit_kv(
    model: nn.Module,
    family: Family,
    groups: int,
    second_moments: dict[nn.Module, torch.Tensor] | None = None,
    context: int | None = None,
) -> None:
    """Pool K/V into `groups` heads keeping the attention circuits, in place (the "svd" init of mqa / gqa).

    Mean pooling (`pool_kv`) averages the K and V projections of a group's heads. This fit instead keeps what the
    heads compute as closely as a shared K/V head allows, from the weights alone: per group, the value-output
    circuits `O_h V_h` of its heads are stacked and factored at rank D (truncated SVD), giving the shared V
    projection and new per-head output columns; the query-key circuits `Q_h^T K_h` likewise give the shared K
    projection and new per-head query rows. With rotary embeddings the fit is per rotary pair, a complex rank-1
    factorization (a complex factor commutes with the rotation); half-split, interleaved and partial RoPE. Exact when nothing is pooled (groups = K/V heads);
    Q, K, V and O change (biases included), the shapes are those of `pool_kv`. Not for attention with other
    parameters between the projections (Qwen3's q_norm / k_norm, output gates, sinks), rotations it does not
    recognize, or value heads of another size: a ValueError says which.

    `second_moments` (from `input_second_moments`): fit in the norm the inputs induce ("calibrated"). `context`: the
    longest sequence the fit serves (for "calibrated", `calibration_length` of the calibration blocks); the rotary
    pairs that turn less than `SLOW_TURN` radians over it are fit as unrotated dims (`_slow_pairs_unrotated`). None:
    none are.
    """
    _kv_check(model, family)
    modules = _check_groups(model, groups)
    for module, heads in modules:
        reason = _svd_refusal(model, family, module, heads)
        if reason is None:
            try:
                _rope_pairs(model, heads[2])
            except ValueError as err:
                reason = str(err)
        if reason is not None:
            raise ValueError(f"init='svd' does not apply to {family.name!r}: {reason}; use init='mean'")
    frequencies = _rotary_frequencies(model) if context else None
    for module, (h, hkv, d) in modules:
        q, k, v = (x.double() for x in _read_qkv(module, family, (h, hkv, d)))
        out = _output_projection(model, module)[1]
        o = (out.weight.t() if isinstance(out, Conv1D) else out.weight).double()  # [E, H D]
        n = q.shape[-1]
        q, k, v, o = q.view(h, d, n), k.view(hkv, d, n), v.view(hkv, d, n), o.view(o.shape[0], h, d)
        per = h // groups
        kv_of = [i // (h // hkv) for i in range(h)]
        rope = _rope_pairs(model, d)
        # pooled groups only: a group of one original K head keeps its exact per-pair fit
        pooled_rope = _slow_pairs_unrotated(rope, frequencies, context)
        root = None if second_moments is None else _root(second_moments[module].double())
        new_q, new_o = q.clone(), o.clone()
        new_k = torch.empty(groups, d, n, dtype=q.dtype)
        new_v = torch.empty(groups, d, n, dtype=q.dtype)
        for g in range(groups):
            members = list(range(g * per, (g + 1) * per))
            pooled = len({kv_of[i] for i in members}) > 1
            qg, new_k[g], new_v[g], og = _fit_group(q, k, v, o, members, kv_of, d, pooled_rope if pooled else rope, root)
            for i in members:
                new_q[i], new_o[:, i] = qg[i], og[i]
        if not family.native_gqa:  # one K/V row block per head: every head of a group gets the group's shared rows
            new_k, new_v = new_k.repeat_interleave(hkv // groups, 0), new_v.repeat_interleave(hkv // groups, 0)
        _write_qkv(module, family, (h, hkv, d), new_q.reshape(h * d, n), new_k.reshape(-1, n), new_v.reshape(-1, n))
        o2 = new_o.reshape(o.shape[0], h * d)
        out.weight.copy_((o2.t() if isinstance(out, Conv1D) else o2).to(out.weight.dtype))
    if family.native_gqa:
        _set_config_kv_heads(model, groups)
