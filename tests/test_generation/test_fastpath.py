"""`fast_verification`: the same forward (up to float rounding), with the linear layers' measured fastest route and
no K/V copies."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from gen_helpers import tiny_llama
from transformers.cache_utils import DynamicCache

from hf_fastattn.generation.fastpath import (
    ATTENTION_NAME,
    ROUTES,
    ROWS_MAX_ROWS,
    RowPlan,
    fast_verification,
    gqa_sdpa_attention,
    routed_linear,
    rows_kernel_available,
)
from hf_fastattn.integration.cache import cache_argument


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routed_linear_equals_linear(route, rows, dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40).to(dtype)
    x = torch.randn(1, rows, 24, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(routed_linear(layer, x, route), layer(x), **tol)
    out = routed_linear(layer, x.transpose(0, 1), route)  # a non-contiguous input
    torch.testing.assert_close(out, layer(x.transpose(0, 1)), **tol)
    assert out.is_contiguous()
    padded = routed_linear(layer, x, route, rows + 3)  # computed on more rows
    torch.testing.assert_close(padded, layer(x), **tol)
    assert padded.shape == (1, rows, 40) and padded.is_contiguous()
    layer.bias = None
    torch.testing.assert_close(routed_linear(layer, x, route, rows + 1), layer(x), **tol)
    with torch.enable_grad():  # under autograd every route still has a gradient
        x.requires_grad_(True)
        routed_linear(layer, x, route, rows + 1).sum().backward()
        torch.testing.assert_close(x.grad, layer.weight.sum(0).expand_as(x), **tol)


def test_rows_route_runs_our_kernel_only_where_it_applies(monkeypatch):
    """"rows" computes float32 products of up to `ROWS_MAX_ROWS` rows (padding included) with `kernels.rows_linear`
    and leaves everything else to `F.linear` (the values: `test_routed_linear_equals_linear`)."""
    import hf_fastattn.generation.fastpath as fastpath

    calls = []
    monkeypatch.setattr(fastpath, "rows_kernel_available", lambda: True)
    monkeypatch.setattr(fastpath, "rows_linear", lambda x, w, b: calls.append(x.shape[0]) or torch.nn.functional.linear(x, w, b))
    layer = torch.nn.Linear(24, 40)
    routed_linear(layer, torch.randn(1, 5, 24), "rows")
    routed_linear(layer, torch.randn(1, 5, 24), "rows", ROWS_MAX_ROWS)
    routed_linear(layer, torch.randn(1, 5, 24), "rows", ROWS_MAX_ROWS + 1)  # padded beyond: F.linear
    routed_linear(layer.double(), torch.randn(1, 5, 24, dtype=torch.float64), "rows")  # not float32
    with torch.enable_grad():
        routed_linear(layer.float(), torch.randn(1, 5, 24, requires_grad=True), "rows")  # under autograd
    assert calls == [5, ROWS_MAX_ROWS]


def test_row_plan_keeps_the_fastest_route_and_pads_to_a_faster_size(monkeypatch):
    """A machine where `mm` wins at 2-3 rows, oneDNN at 6-8, and 12 rows cost more than 16 (the routes are then
    timed twice where close, and the plan hands the forward cost the times of what it will run); our kernel, where
    it builds, is slower than every other route here."""

    def seconds(size, route):
        base = {1: 1.0, 2: 1.5, 3: 1.6, 4: 2.0, 6: 2.2, 8: 2.4, 12: 3.0, 16: 2.5, 24: 3.5, 32: 4.0}[size]
        if route == "mm":
            return base * (0.5 if size <= 3 else 2.0)
        if route == "rows":
            return base * 1.5
        if route == "onednn":  # (not a tie with linear elsewhere: the fake clock's rounding would decide it)
            return base * (0.9 if size in (6, 8) else 1.05)
        return base

    plan = RowPlan(batch=1)
    calls = []

    def timed(size):
        calls.append((size, plan.forced))
        fake_clock[0] += seconds(size, plan.forced) * 1e-3

    fake_clock = [0.0]
    real = time.perf_counter
    time.perf_counter = lambda: fake_clock[0]
    try:
        effective = plan.calibrate(timed, float32=True)
    finally:
        time.perf_counter = real
    assert plan.measured and plan.forced is None
    assert plan.routes[2] == ("mm", 2) and plan.routes[3] == ("mm", 3) and plan.routes[4] == ("linear", 4)
    assert plan.routes[6] == ("onednn", 6) and plan.routes[8] == ("onednn", 8)
    assert plan.routes[12] == ("linear", 16)  # 12 rows computed as 16
    assert effective[12] == pytest.approx(2.5e-3) and effective[2] == pytest.approx(0.75e-3)
    assert all(route != "mm" for size, route in calls if size > RowPlan.MM_MAX_ROWS)  # mm only for few rows
    assert calls[0] == (1, None) and calls.count((1, "linear")) == 2  # a warm-up, then one token twice
    assert calls.count((2, "mm")) == 1 and calls.count((2, "linear")) == 1  # a clear winner: timed once
    assert calls.count((6, "onednn")) == 2 and calls.count((6, "linear")) == 2  # within 15%: timed again
    assert (24, "onednn") not in calls and (16, "onednn") in calls
    # a row count between measured sizes is computed as the next measured size (its time is the one known);
    # beyond the largest measured, F.linear as it is
    assert plan.route(1) == ("linear", 1) and plan.route(5) == ("onednn", 6) and plan.route(10) == ("linear", 16)
    assert plan.route(40) == ("linear", 40)
    assert [plan.computed_tokens(k) for k in (1, 2, 5, 7, 9, 12, 13, 16, 17, 40)] == [1, 2, 6, 8, 16, 16, 16, 16, 24, 40]
    plan.forced = "mm"
    assert plan.route(10) == ("mm", 10)
    noisy = RowPlan(batch=2)  # a one-token step is never computed as more, however its time came out
    fake_clock[0] = 0.0
    time.perf_counter = lambda: fake_clock[0]
    try:
        noisy.calibrate(lambda k: fake_clock.__setitem__(0, fake_clock[0] + (5.0 if k == 1 else 1.0)), float32=False)
    finally:
        time.perf_counter = real
    assert noisy.routes[1] == ("linear", 1) and noisy.route(2) == ("linear", 2)
    assert noisy.routes[2] == ("linear", 2) and noisy.seconds[1] == 5.0  # (2 and up: all equal, nothing padded)


def test_row_plan_counts_rows_per_batch_row():
    plan = RowPlan(batch=2)
    plan.routes = {1: ("linear", 1), 2: ("onednn", 2), 3: ("linear", 4), 4: ("linear", 4)}
    assert plan.route(4) == ("onednn", 4)  # 2 tokens per row
    assert plan.route(6) == ("linear", 8)  # 3 tokens per row, computed as 4
    ours = ["rows"] if rows_kernel_available() else []  # our kernel, where it builds (tests/test_kernels)
    assert plan.candidates(4, float32=True) == ["linear", "mm", "onednn", *ours]
    assert plan.candidates(8, float32=False) == ["linear"]  # 16 rows: no mm; not float32: no oneDNN nor ours
    assert RowPlan(batch=3).candidates(6, float32=True) == ["linear"]  # 18 rows: beyond oneDNN and ours
    assert RowPlan(batch=4).sizes == (1, 2, 3, 4, 6, 8, 12, 16)  # at most 64 rows timed


def test_gqa_attention_equals_repeated_kv_without_copying(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    query = torch.randn(2, 6, 4, 8, dtype=torch.float64)
    key, value = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, 7, dtype=torch.float64)
    mask[0, 0, :, :2] = torch.finfo(torch.float64).min  # row 0: two padding keys
    mask[:, 0, :, 3:] = torch.full((4, 4), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
    reference, _ = sdpa.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)

    def no_repeat(*args, **kwargs):
        raise AssertionError("repeat_kv called: the K/V cache was copied")

    monkeypatch.setattr(sdpa, "repeat_kv", no_repeat)
    ours, _ = gqa_sdpa_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("routes", [{}, {2: ("mm", 2), 4: ("mm", 8)}, {4: ("linear", 6)}, {8: ("onednn", 8)}])
def test_fast_verification_keeps_logits_and_restores_the_model(routes, monkeypatch):
    import hf_fastattn.generation.fastpath as fastpath

    model = tiny_llama()
    prompt, block = torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9, 10]])
    blocked = torch.finfo(model.dtype).min
    mask = torch.zeros(1, 1, 3, 8, dtype=model.dtype)
    mask[0, 0, :, 5:] = torch.full((3, 3), blocked, dtype=model.dtype).triu(1)
    plan = RowPlan()
    plan.routes = routes
    routed = []

    def recording(module, x, route="linear", rows_computed=0):
        routed.append((route, rows_computed))
        return routed_linear(module, x, route, rows_computed)

    monkeypatch.setattr(fastpath, "routed_linear", recording)

    def logits(fast):
        cache = {cache_argument(model): DynamicCache(config=model.config)}
        model(prompt, use_cache=True, **cache)
        with fast_verification(model, plan, enabled=fast):
            assert (model.config._attn_implementation == ATTENTION_NAME) == fast
            patched = [m for m in model.modules() if "forward" in m.__dict__]
            assert all(type(m) is torch.nn.Linear for m in patched) and (len(patched) > 0) == fast
            return model(block, attention_mask=mask, position_ids=torch.arange(5, 8)[None], **cache).logits

    torch.testing.assert_close(logits(True), logits(False))
    assert routed and set(routed) == {plan.route(3)}  # every linear layer of the 3-token forward took the route
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), fast_verification(model, plan):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fast_path_keeps_only_what_a_forward_of_each_size_uses():
    """`FastPath.prepare`: the linear wrappers only for a size the plan routes otherwise than `F.linear` (or while
    calibrating), the attention swap only for several tokens; the logits are those of the plain model."""
    model = tiny_llama()
    plan = RowPlan()
    plan.routes = {1: ("linear", 1), 2: ("linear", 2), 3: ("mm", 3), 4: ("linear", 6)}

    def wrapped():
        return [m for m in model.modules() if "forward" in m.__dict__]

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    reference = model(ids).logits
    with fast_verification(model, plan) as fast:
        for tokens, linear, attention in ((1, False, False), (2, False, True), (3, True, True), (4, True, True)):
            fast.prepare(tokens)
            assert (len(wrapped()) > 0) == linear, tokens
            assert (model.config._attn_implementation == ATTENTION_NAME) == attention, tokens
            torch.testing.assert_close(model(ids).logits, reference)
        fast.prepare(1)
        plan.forced = "mm"  # calibrating: every size takes the forced route
        fast.prepare(1)
        assert wrapped()
        plan.forced = None
    assert not wrapped() and model.config._attn_implementation == "sdpa"
    with fast_verification(model, plan, enabled=False) as fast:
        assert fast is None and not wrapped()


def test_row_plans_are_saved_per_machine_threads_batch_and_model(monkeypatch, tmp_path):
    from hf_fastattn.generation.fastpath import plan_key

    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    model = tiny_llama()  # (shared between tests: changed only in copies)
    key = plan_key(model, 1, 1)
    assert key != plan_key(model, 2, 1) and key != plan_key(model, 1, 4)
    assert key != plan_key(copy.deepcopy(model).float(), 1, 1)  # dtype
    wider = copy.deepcopy(model)
    wider.lm_head = torch.nn.Linear(wider.lm_head.in_features, wider.lm_head.out_features + 1, bias=False)
    assert key != plan_key(wider, 1, 1)  # linear layers
    plan = RowPlan(batch=1, key=key)
    assert not plan.load()  # nothing saved yet
    plan.calibrate(lambda k: None, float32=False)
    loaded = RowPlan(batch=1, key=key)
    assert loaded.load() and loaded.measured
    assert loaded.routes == plan.routes and loaded.seconds == pytest.approx(plan.seconds)
    assert not RowPlan(batch=1, key=plan_key(model, 2, 1)).load()
    (tmp_path / "row_plans.json").write_text("{not json")  # a damaged file: measured again, then replaced
    assert not RowPlan(batch=1, key=key).load()
    plan.save()
    assert RowPlan(batch=1, key=key).load()
    (tmp_path / "row_plans.json").write_text(json.dumps({key: {"routes": {"2": ["gemm", 2]}, "seconds": {"2": 1}}}))
    assert not RowPlan(batch=1, key=key).load()  # an unknown route is not taken


def test_bad_route_and_batch_are_refused():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"route must be one of \('linear', 'mm', 'onednn', 'rows'\), got 'gemm'"):
        routed_linear(layer, torch.randn(2, 4), "gemm")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        RowPlan(batch=0)
