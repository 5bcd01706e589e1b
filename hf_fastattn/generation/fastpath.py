"""Making a forward over a few tokens cost about what a forward over one token costs, on a CPU.

Speculative decoding pays off only if verifying k guesses costs little more than one greedy step. On a CPU with a
small model one token is memory-bound (every weight read once per forward), so a handful of tokens could ride along
almost for free; whether they do depends on which GEMM kernel the BLAS picks for a few rows, and that differs from
one CPU to the next. Two costs outside the model's arithmetic:

* **Linear layers.** How `F.linear(x, W)` runs for 2..~32 rows is MKL's choice: on some CPUs it packs the transposed
  weight into its panel layout on every call (an extra read and write of every weight, most of a memory-bound
  forward), on others it jumps at 4 rows and again at 12. So the route is *measured*, not assumed: `RowPlan` times
  whole forwards over k tokens with each of four routes to the same product, `F.linear` (MKL), `torch.mm(W, x^T)^T`
  (the small activation as the packed operand), oneDNN's matmul on the plain weight
  (`torch.ops.mkldnn._linear_pointwise`) and our AVX-512 kernel that streams the weight once for all the rows
  (`kernels.rows_linear`, up to `ROWS_MAX_ROWS` rows, where it builds), picks the fastest per size, and computes a
  size as a larger one (extra rows repeating the last, dropped after) where the larger one is measurably faster.
  Measured on SmolLM2-135M, fp32, 200 cached tokens, whole forward, on two CPUs: the stop-21 machine (AVX2), 1
  thread, 2 / 4 / 8 tokens 75 / 81 / 124 ms with `mm` against 94 / 100 / 112 with `F.linear`, one token 60; this
  project's Xeon with AVX-512, 1 thread, `F.linear` 2 / 3 / 4 / 8 / 12 / 16 tokens 72 / 76 / 105 / 133 / 160 / 132
  ms (one token 64) and `mm` 131 ms at 2 to 5 tokens: `mm` doubles the cost there, where it saved a fifth on the
  other CPU. Our kernel on that Xeon (stop 28): 4 / 8 / 12 tokens 67 / 76 / 88 ms against 82 / 101 / 114 for the
  best of the other three (one token 55-57).
* **Grouped-query attention with a mask.** transformers' sdpa path uses `enable_gqa` only when there is no mask,
  and for one query token packs the query heads onto the K/V heads; a speculative forward has several query tokens
  and a mask, so it falls back to `repeat_kv`, which copies the whole K/V cache of every layer (3x for SmolLM2's 9
  query / 3 K/V heads) on every forward: a cost that grows with the context. `gqa_sdpa_attention` generalizes the
  one-token packing: the `n_rep` query heads that share a K/V head become `n_rep * q` query rows of that head, the
  mask is repeated along rows, and nothing of the cache is copied.

`fast_verification(model, plan)` applies both for the duration of a decoding call (per forward only where that
forward's size uses them: `FastPath.prepare`) and undoes them afterwards. The
results are the same products summed in another order: equal to the plain forward up to float rounding (the
exactness tests run in float64, where any difference is ~1e-15).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from ..kernels.rows_linear import available as rows_kernel_available
from ..kernels.rows_linear import rows_linear

ATTENTION_NAME = "hf_fastattn_gqa_sdpa"  # registered with transformers while a decoding call uses it
_registered = False


ROUTES = ("linear", "mm", "onednn", "rows")  # the ways `routed_linear` computes the same product (module docstring)
ROWS_MAX_ROWS = 16  # the "rows" kernel is offered up to this many rows (MKL's own blocking wins from 16 on)


def routed_linear(module: nn.Linear, x: torch.Tensor, route: str = "linear", rows_computed: int = 0) -> torch.Tensor:
    """`module(x)` computed by `route` (one of `ROUTES`) on `rows_computed` rows.

    Args:
        module: a plain `nn.Linear`.
        x: `[..., in_features]`; its rows are all leading positions (batch x tokens).
        route: "linear" (`F.linear`), "mm" (`(W @ x^T)^T`), "onednn" (`torch.ops.mkldnn._linear_pointwise` on the
            plain weight) or "rows" (`kernels.rows_linear`, our AVX-512 kernel that streams the weight once). A
            route that does not apply (not a CPU tensor, another dtype than the weight's; oneDNN and rows: not
            float32 or under autograd; oneDNN: torch built without it; rows: the kernel not available, more than
            `ROWS_MAX_ROWS` rows) falls back to `F.linear`.
        rows_computed: compute this many rows if more than x has (the extra rows repeat the last one and are
            dropped): for a row count the BLAS multiplies more slowly than a larger one.

    Returns:
        `[..., out_features]`, contiguous (the next layer's input).
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    weight, bias = module.weight, module.bias
    rows = x.numel() // weight.shape[1] if x.numel() else 0
    padded = max(rows, rows_computed)
    if rows == 0 or (route == "linear" and padded == rows) or not _applies(route, x, weight, padded):
        return nn.functional.linear(x, weight, bias)
    rows_in = x.reshape(rows, weight.shape[1])
    if padded > rows:
        rows_in = torch.cat([rows_in, rows_in[-1:].expand(padded - rows, -1)])
    if route == "mm":
        # the rows must be contiguous: the transposed view is then the column-major operand MKL takes without a copy
        # (a row-major [in, rows] operand is 3x slower)
        out = torch.mm(weight, rows_in.contiguous().t()).t()
        out = out if bias is None else out + bias
    elif route == "onednn":
        out = torch.ops.mkldnn._linear_pointwise(rows_in, weight, bias, "none", [], "")
    elif route == "rows":
        return rows_linear(rows_in, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])
    else:
        out = nn.functional.linear(rows_in, weight, bias)
    return out[:rows].contiguous().view(*x.shape[:-1], weight.shape[0])


def _applies(route: str, x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether `route` can compute `x`'s product with `weight` over `rows` rows (padding included)."""
    if route == "linear":
        return True
    if x.device.type != "cpu" or x.dtype != weight.dtype:
        return False
    if route == "mm":
        return True
    # oneDNN's op and our kernel have no backward: only where autograd records nothing
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.dtype != torch.float32 or needs_grad:
        return False
    if route == "rows":
        return rows <= ROWS_MAX_ROWS and weight.is_contiguous() and rows_kernel_available()
    return torch.backends.mkldnn.is_available()


class RowPlan:
    """How the linear layers compute a forward over k tokens per row: a route of `ROUTES` per size, and a larger
    size to compute instead where that is measurably faster. Measured for one model, thread count and batch size
    (`for_model`) by timing whole forwards (`calibrate`); until then, and for sizes beyond the largest measured,
    `F.linear` as the model has it.

    Args:
        batch (`int`): rows of the forwards (a forward over k tokens per row multiplies `batch * k` rows).
    """

    SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # tokens per row timed (`speculation.BUCKETS` keeps these sizes)
    MAX_ROWS = 64  # and batch x tokens at most this (larger batches time fewer sizes)
    MM_MAX_ROWS = 8  # beyond this `mm` loses to the BLAS's own blocking on every CPU measured
    ONEDNN_MAX_ROWS = 16  # oneDNN tied `F.linear` from 16 rows on (measured on this project's Xeon)
    PAD_GAIN = 0.95  # compute a size as a larger one only if that is at least 5% faster
    RECHECK = 1.15  # the second round re-times the routes within 15% of a size's best

    def __init__(self, batch: int = 1, key: str | None = None):
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int (rows per forward), got {batch!r}")
        self.batch = batch
        self.key = key  # where `save` files it (`plan_key`); None: not saved
        self.routes: dict[int, tuple[str, int]] = {}  # measured size -> (route, size computed)
        self.seconds: dict[int, float] = {}  # measured size -> seconds of a forward as routed (`calibrate`'s result)
        self.forced: str | None = None  # while calibrating: every row count takes this route
        self._by_rows: dict[int, tuple[str, int]] = {}  # `route`'s answers so far

    @classmethod
    def for_model(cls, model, batch: int = 1) -> RowPlan:
        """The plan of `model` at the current torch thread count and `batch` rows: shared across calls, and across
        processes through a file in hf_fastattn's cache folder (`plan_key`; `$HF_FASTATTN_CACHE`, default
        `~/.cache/hf_fastattn`, file `row_plans.json`: delete it to measure again)."""
        per_model = _PLANS.setdefault(model, {})
        threads = torch.get_num_threads()
        if (threads, batch) not in per_model:
            plan = per_model[threads, batch] = cls(batch, plan_key(model, threads, batch))
            plan.load()
        return per_model[threads, batch]

    def load(self) -> bool:
        """Take the routes and times saved under `key`, if any (an unreadable file counts as none)."""
        entry = _read_plans().get(self.key) if self.key else None
        try:
            routes = {int(k): (str(r), int(c)) for k, (r, c) in entry["routes"].items()}
            seconds = {int(k): float(v) for k, v in entry["seconds"].items()}
        except (TypeError, KeyError, ValueError):
            return False
        if set(routes) != set(seconds) or any(r not in ROUTES for r, _ in routes.values()):
            return False
        self.routes, self.seconds, self._by_rows = routes, seconds, {}
        return True

    def save(self) -> None:
        """File the routes and times under `key` (best effort: a cache folder that cannot be written is skipped)."""
        if not self.key or not self.measured:
            return
        path = _plans_file()
        plans = _read_plans()
        plans[self.key] = {"routes": self.routes, "seconds": self.seconds}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(plans, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass

    @property
    def measured(self) -> bool:
        """Whether the plan holds measurements (from `calibrate` or a saved file)."""
        return bool(self.seconds)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes `calibrate` times at this batch size."""
        return tuple(s for s in self.SIZES if s == 1 or s * self.batch <= self.MAX_ROWS)

    def route(self, rows: int) -> tuple[str, int]:
        """`(route, rows computed)` for a product over `rows` rows."""
        if self.forced is not None:
            return self.forced, rows
        known = self._by_rows.get(rows)
        if known is None:
            known = self._by_rows[rows] = self._decide(rows)
        return known

    def _decide(self, rows: int) -> tuple[str, int]:
        size = self._size_for(-(-rows // self.batch))
        if rows <= 1 or size is None:
            return "linear", rows
        route, computed = self.routes[size]
        return route, max(rows, computed * self.batch)

    def _size_for(self, tokens: int) -> int | None:
        """The smallest measured size of at least `tokens` tokens per row (None: beyond them, or not measured)."""
        return next((s for s in sorted(self.routes) if s >= tokens), None)

    def computed_tokens(self, tokens: int) -> int:
        """The tokens per row a forward over `tokens` tokens per row computes: a size between two measured ones as
        the next measured size (whose time is known: on this project's Xeon `F.linear` over 13-15 rows took 2.7x a
        one-token forward, 16 rows 2.1x), a measured size as its plan says, a size beyond them as it is."""
        size = self._size_for(tokens)
        return tokens if tokens <= 1 or size is None else self.routes[size][1]

    def candidates(self, size: int, float32: bool) -> list[str]:
        """The routes worth timing for `size` tokens per row."""
        if size == 1:
            return ["linear"]
        rows = size * self.batch
        mm = ["mm"] if rows <= self.MM_MAX_ROWS else []
        onednn = ["onednn"] if float32 and rows <= self.ONEDNN_MAX_ROWS else []
        ours = ["rows"] if float32 and rows <= ROWS_MAX_ROWS and rows_kernel_available() else []
        return ["linear", *mm, *onednn, *ours]

    def calibrate(self, timed_forward, float32: bool) -> dict[int, float]:
        """Time `timed_forward(k)` (a forward over k tokens per row, undone) per size and route, keep the fastest
        route per size, and compute a size as a larger one that is at least 5% faster. After one untimed forward,
        two rounds: every route once, then again one token and where two or more routes are within 15% of their
        size's best (the second round is skipped when a forward takes over 0.25 s: a large model on a CPU).
        Returns `{size: seconds}` of each size as it will be computed, for `speculation.ForwardCost`.

        float32: whether oneDNN's route can apply (the model computes in float32)."""
        times: dict[tuple[int, str], float] = {}

        def measure(size: int, route: str) -> None:
            self.forced = route
            try:
                start = time.perf_counter()
                timed_forward(size)
                seconds = time.perf_counter() - start
            finally:
                self.forced = None
            times[size, route] = min(seconds, times.get((size, route), float("inf")))

        timed_forward(1)  # untimed: the first forward of a series runs slow, and t(1) anchors the whole curve
        for size in self.sizes:
            for route in self.candidates(size, float32):
                measure(size, route)
        if times[1, "linear"] <= 0.25:
            for size in self.sizes:
                best = min(times[size, r] for r in self.candidates(size, float32))
                close = [r for r in self.candidates(size, float32) if times[size, r] <= self.RECHECK * best]
                for route in close if len(close) > 1 or size == 1 else ():
                    measure(size, route)
        best = {size: min((times[size, r], r) for r in self.candidates(size, float32)) for size in self.sizes}
        self.routes, self._by_rows, effective = {}, {}, {}
        for size in self.sizes:
            seconds, route = best[size]
            larger = min(((best[s][0], s) for s in self.sizes if s > size), default=(float("inf"), size))
            if size > 1 and larger[0] < self.PAD_GAIN * seconds:  # (a one-token step stays one token)
                seconds, size_computed = larger
                route = best[size_computed][1]
            else:
                size_computed = size
            self.routes[size] = (route, size_computed)
            effective[size] = seconds
        self.seconds = effective
        self.save()
        return effective


def plan_key(model, threads: int, batch: int) -> str:
    """What a `RowPlan` depends on: the CPU (its name and the instruction set torch uses), torch's version, the
    thread count and batch size, and the model's dtype and linear layers (shapes and how many of each)."""
    shapes: dict[tuple, int] = {}
    for module in model.modules():
        if type(module) is nn.Linear:
            shape = tuple(module.weight.shape)
            shapes[shape] = shapes.get(shape, 0) + 1
    cpu = f"{_cpu_name()} {torch.backends.cpu.get_cpu_capability()} x{os.cpu_count()}"
    layers = ",".join(f"{o}x{i}*{n}" for (o, i), n in sorted(shapes.items()))
    routes = "+".join(r for r in ROUTES if r != "rows" or rows_kernel_available())  # a plan timed every route offered
    return f"{cpu} | torch {torch.__version__} | {threads} threads | batch {batch} | {model.dtype} | {layers} | {routes}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plans_file() -> Path:
    from ..pretrained import cache_root

    return cache_root() / "row_plans.json"


def _read_plans() -> dict:
    try:
        plans = json.loads(_plans_file().read_text())
    except (OSError, ValueError):
        return {}
    return plans if isinstance(plans, dict) else {}


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(threads, batch): RowPlan}


def gqa_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' sdpa attention, without copying the K/V cache for grouped-query attention with a mask.

    Args:
        module: the attention module (`num_key_value_groups` is read).
        query (`torch.Tensor` `[B, H, q, D]`), key, value (`[B, Hkv, kv, D]`): after RoPE and the cache update.
        attention_mask (`torch.Tensor` `[B or 1, 1, q, kv]`, *optional*): additive float or boolean mask.

    Returns:
        `(out [B, q, H, D], None)`, as `sdpa_attention_forward`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    q_len = query.shape[2]
    if (
        groups == 1
        or q_len == 1  # transformers packs one query token itself
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or (dropout and module.training)
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # heads h * groups .. h * groups + groups - 1 share K/V head h (transformers' repeat_kv order)
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    mask = attention_mask.repeat(1, 1, groups, 1)  # row r * q_len + i of the packed query is query row i
    out = nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


class FastPath:
    """The patches `fast_verification` applies, switched per forward by `prepare`: a forward whose linear layers all
    take plain `F.linear` (one token per row, or a size the plan computes as it is) runs without the wrappers, and a
    one-token forward without the attention swap (transformers packs one query token itself). The wrappers cost a
    Python call per linear layer: SmolLM2-135M, 1 thread, 96 one-token steps 5.23 s without them, 5.40 s with."""

    def __init__(self, model, plan: RowPlan | None):
        self.plan = plan
        self.modules = [
            m
            for m in (model.modules() if plan is not None else ())
            if type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.device.type == "cpu"
        ]
        self.configs = []
        if model.config._attn_implementation == "sdpa":
            _register()
            self.configs = [
                c for c in _configs(model.config) if getattr(c, "_attn_implementation_internal", None) == "sdpa"
            ]
        self.linear_patched = self.attention_patched = False

    def prepare(self, tokens: int) -> None:
        """Set the patches for a forward over `tokens` tokens per row."""
        plan = self.plan
        rows = tokens * (plan.batch if plan is not None else 1)
        routed = plan is not None and (plan.forced is not None or plan.route(rows) != ("linear", rows))
        self.patch_linear(routed)
        self.patch_attention(tokens > 1)

    def patch_linear(self, on: bool) -> None:
        if on == self.linear_patched:
            return
        for module in self.modules:
            if on:
                module.forward = _bound(module, self.plan)
            else:
                del module.forward
        self.linear_patched = on

    def patch_attention(self, on: bool) -> None:
        if on == self.attention_patched:
            return
        for config in self.configs:
            config._attn_implementation_internal = ATTENTION_NAME if on else "sdpa"
        self.attention_patched = on


@contextlib.contextmanager
def fast_verification(model, plan: RowPlan | None = None, enabled: bool = True):
    """Within the block, `model`'s forwards over a few tokens take the fast paths of the module docstring.

    Applied only where they are the same computation: plain `nn.Linear` layers on the CPU (not already wrapped by
    hooks that replace `forward`), and the attention swap only for models running transformers' "sdpa"
    implementation. Everything is restored on exit, also after an exception.

    Args:
        model: a `PreTrainedModel`.
        plan (`RowPlan`, *optional*): how the linear layers compute a few rows (`RowPlan.for_model`, measured by
            its `calibrate`); None leaves them as they are.
        enabled (`bool`): False makes this a no-op (for comparisons).

    Yields:
        a `FastPath` (None when not enabled) with everything applied; its `prepare(tokens)` before a forward keeps
        only what a forward of that size uses.
    """
    if not enabled:
        yield None
        return
    fast = FastPath(model, plan)
    fast.patch_linear(True)
    fast.patch_attention(True)
    try:
        yield fast
    finally:
        fast.patch_linear(False)
        fast.patch_attention(False)


def _bound(module: nn.Linear, plan: RowPlan):
    columns = module.weight.shape[1]

    def forward(x):
        return routed_linear(module, x, *plan.route(x.numel() // columns))

    return forward


def _configs(config):
    """`config` and its sub-configs (a text config inside a multimodal one)."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation_internal"):
            yield sub
