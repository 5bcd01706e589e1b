"""Causal "linear" / "fast" models generate with a constant-size `RecurrentCache` (issue 3).

Every check compares against something computed another way:
- `generate(use_cache=False)` (the whole sequence re-run at every step, no state),
- a quadratic attention written out in this file (`_reference_attention`, registered as its own attention
  implementation): w_ij = phi(q_i).phi(k_j) or f(q_hat_i.k_hat_j / T), masked, rows normalized; one forward over
  the final sequence gives the logits of every step (causality),
- the same prompt run alone (for left padding), token-by-token feeding (for chunked prefill), the bytes of the
  state computed from the shapes (for constant memory), a DynamicCache (which must grow).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from stream_recorder import StreamRecorder
from tiny_models import tiny_model
from transformers import AttentionInterface, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import hf_fastattn
from hf_fastattn.integration import hybrid_attention
from hf_fastattn.integration.common import padding_mask

VOCAB, PAD = 96, 0


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------------------------------------------
# models


# (family, implementation, fastattn options); ids name the family, the implementation and the FAST order
CASES = {
    "llama-linear": ("llama", "linear", {}),
    "llama-fast2": ("llama", "fast", {"order": 2}),
    "llama-fast1": ("llama", "fast", {"order": 1, "temperature": 2.0}),
    "qwen3-linear": ("qwen3", "linear", {}),
    "qwen3-fast2": ("qwen3", "fast", {"order": 2}),
    "mistral-fast1": ("mistral", "fast", {"order": 1}),
    "qwen2-linear-relu": ("qwen2", "linear", {"feature_map": "relu"}),
    "gpt2-linear": ("gpt2", "linear", {}),
    "gpt2-fast2": ("gpt2", "fast", {"order": 2}),
    "gpt2-fast1": ("gpt2", "fast", {"order": 1}),
}
# smaller sets for the costlier checks (every family, implementation and order still appears)
CORE = ["llama-linear", "qwen3-fast2", "gpt2-fast1"]
GREEDY = [c for c in CASES if c not in ("mistral-fast1", "gpt2-fast2")]


def make(case: str, **overrides):
    """A tiny random model of `case`, seeded, with peaky logits (init 0.2: greedy text is not one repeated token, and
    argmax ties are out of reach of float32 rounding) and no EOS unless a test sets one."""
    family, impl, options = CASES[case]
    torch.manual_seed(0)
    overrides.setdefault("initializer_range", 0.2)
    model = tiny_model(family, attn_implementation=impl, **overrides)
    if options:
        hf_fastattn.configure(model, **options)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def converted(method: str, family: str = "llama", **options):
    from hf_fastattn.conversion import convert

    torch.manual_seed(0)
    model = convert(tiny_model(family, initializer_range=0.2), method, **options)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


def prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------------------
# the independent reference: quadratic causal attention, written out


def _features(module, x):
    learned = getattr(module, "fastattn_feature_map", None)
    if learned is not None:
        return learned(x)
    name = (getattr(module.config, "fastattn", None) or {}).get("feature_map", "elu")
    return F.elu(x) + 1 if name == "elu" else F.relu(x)


def _reference_weights(kind):
    def weights(module, q, k):
        if kind == "linear":
            return _features(module, q) @ _features(module, k).transpose(-1, -2)
        options = getattr(module.config, "fastattn", None) or {}
        order, temperature = options.get("order", 2), options.get("temperature", 1.0)
        q = q - q.mean(-1, keepdim=True)
        k = k - k.mean(-1, keepdim=True)
        # (a zero vector, e.g. the key of a padding embedding, stays zero)
        q, k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6), k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        s = q @ k.transpose(-1, -2) / temperature
        return 1 + s if order == 1 else 1 + s + s * s / 2

    return weights


def _reference_attention(kind):
    weights_of = _reference_weights(kind)

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        h, n = query.shape[1], key.shape[2]
        assert query.shape[2] == n, "the reference runs without a cache"
        key = key.repeat_interleave(h // key.shape[1], dim=1).float()
        value = value.repeat_interleave(h // value.shape[1], dim=1).float()
        w = weights_of(module, query.float(), key)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        w = torch.where(allowed, w, 0.0)
        out = (w @ value) / w.sum(-1, keepdim=True).clamp_min(1e-6)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


for _kind in ("linear", "fast"):
    AttentionInterface.register(f"recurrent_test_{_kind}", _reference_attention(_kind))
    AttentionMaskInterface.register(f"recurrent_test_{_kind}", padding_mask)


def reference_logits(model, ids, mask=None):
    """Logits of every position from one cache-free forward of a copy running the written-out attention."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(f"recurrent_test_{model.config._attn_implementation}")
    kwargs = {} if mask is None else dict(attention_mask=mask, position_ids=positions(mask))
    return ref(input_ids=ids, use_cache=False, **kwargs).logits


def step_logits(out):
    return torch.stack(out.logits, dim=1)  # [B, new tokens, V]


def assert_steps_match_reference(model, out, prompt_len, mask=None):
    """The logits of step t equal the reference's logits at position prompt_len - 1 + t of the final sequence."""
    seq = out.sequences
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    expected = reference_logits(model, seq, full_mask)[:, prompt_len - 1 : -1]
    torch.testing.assert_close(step_logits(out), expected, atol=2e-4, rtol=1e-4)


def feed_token_by_token(model, ids, mask, cache):
    """Run the left-padded batch through `cache` one token per forward; returns the last token's logits."""
    pos = positions(mask)
    for t in range(ids.shape[1]):
        last = model(
            input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache
        ).logits
    return last


def gen(model, ids, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **kwargs)


def states(cache):
    return [(layer.recurrent_states[0], layer.recurrent_states[1]) for layer in cache.layers]


def expected_nbytes(model, batch):
    """Bytes of S [B, Hs, F, Dv] and z [B, Hs, F] in float32, per layer, from the config alone."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    impl = cfg._attn_implementation
    learned = [m.fastattn_feature_map for m in model.modules() if getattr(m, "fastattn_feature_map", None) is not None]
    if learned:
        feats, state_heads = learned[0](torch.zeros(1, heads, 1, head_dim)).shape[-1], heads  # per query head
    elif impl == "fast":  # [1, x, upper triangle of x x^T] for order 2: F = 1 + D + D(D+1)/2
        order = (cfg.fastattn or {}).get("order", 2)
        feats, state_heads = 1 + head_dim + (head_dim * (head_dim + 1) // 2 if order == 2 else 0), kv_heads
    else:
        feats, state_heads = head_dim, kv_heads
    return cfg.num_hidden_layers * batch * state_heads * (feats * head_dim + feats) * 4


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


# --------------------------------------------------------------------------------------------------------------
# 1. constant memory and constant time per token


@pytest.mark.parametrize("case", [*CORE, "llama-fast2", "mistral-fast1", "gpt2-linear"])
def test_generate_makes_a_recurrent_cache_of_constant_size(case, monkeypatch):
    model = make(case)
    ids = torch.tensor(prompts([7])[0:1])
    steps = []
    from hf_fastattn.integration import fast_attention as fast_glue
    from hf_fastattn.integration import linear_attention as glue
    from hf_fastattn.ops import linear as linear_ops  # the recurrent step of `linear_attention_with_state`

    def spying(real):
        def spy(qf, kf, v, state, *args, **kwargs):
            steps.append(kf.shape[2])
            return real(qf, kf, v, state, *args, **kwargs)

        return spy

    # the step that makes a new state, and the ones that update the cache's own in place (inference decoding):
    # linear's, and fast's (`fast_recurrent_step_`: the C++ step for order 2 where it is available)
    monkeypatch.setattr(linear_ops, "_recurrent_step", spying(linear_ops._recurrent_step))
    monkeypatch.setattr(glue, "recurrent_linear_step_", spying(glue.recurrent_linear_step_))
    monkeypatch.setattr(fast_glue, "fast_recurrent_step_", spying(fast_glue.fast_recurrent_step_))
    short = gen(model, ids, max_new_tokens=4)
    steps.clear()
    long = gen(model, ids, max_new_tokens=40)
    cache_short, cache_long = short.past_key_values, long.past_key_values
    assert type(cache_short) is hf_fastattn.RecurrentCache and type(cache_long) is hf_fastattn.RecurrentCache
    assert long.sequences.shape[1] == 7 + 40
    # constant memory: the same bytes after 4 and 40 tokens, those of S and z as the shapes say
    assert cache_short.nbytes() == cache_long.nbytes() == expected_nbytes(model, batch=1) > 0
    assert cache_long.get_seq_length() == 7 + 40 - 1  # every token but the last generated one was folded in
    # constant time: after the prefill, every step of every layer folded exactly one token into the state
    assert steps == [1] * (model.config.num_hidden_layers * 39)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sdpa_dynamic_cache_grows_for_comparison(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts([7])[0:1])
    short = gen(model, ids, max_new_tokens=4).past_key_values
    long = gen(model, ids, max_new_tokens=40).past_key_values
    assert type(short) is DynamicCache and type(long) is DynamicCache
    assert dynamic_nbytes(long) == dynamic_nbytes(short) * (7 + 39) // (7 + 3) > dynamic_nbytes(short)


def test_cache_bytes_do_not_depend_on_prompt_length():
    model = make("llama-fast2")
    sizes = {gen(model, torch.tensor(prompts([n])), max_new_tokens=2).past_key_values.nbytes() for n in (3, 60)}
    assert sizes == {expected_nbytes(model, 1)}


# --------------------------------------------------------------------------------------------------------------
# 2. exactness of greedy decoding, padding, sampling, beams, streamer, stopping


@pytest.mark.parametrize("case", GREEDY)
def test_greedy_equals_no_cache_and_reference_logits_with_left_padding(case):
    """Batch of two left-padded prompts: tokens equal use_cache=False, every step's logits equal the reference, and
    the padded row is exactly the short prompt run alone (batch 1), state included."""
    model = make(case)
    rows = prompts([9, 4])
    ids, mask = left_padded(rows)
    out = gen(model, ids, mask, max_new_tokens=12)
    assert isinstance(out.past_key_values, hf_fastattn.RecurrentCache)
    plain = gen(model, ids, mask, max_new_tokens=12, use_cache=False)
    assert out.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(plain), atol=1e-4, rtol=1e-4)
    assert_steps_match_reference(model, out, ids.shape[1], mask)

    alone = gen(model, torch.tensor(rows[1:]), max_new_tokens=12)
    pad = ids.shape[1] - len(rows[1])
    assert out.sequences[1, pad:].tolist() == alone.sequences[0].tolist()
    torch.testing.assert_close(step_logits(out)[1:], step_logits(alone), atol=1e-4, rtol=1e-4)
    assert_steps_match_reference(model, alone, len(rows[1]))
    # padding never entered the state: the padded row's S and z are those of the prompt run alone
    for (s, z), (s1, z1) in zip(states(out.past_key_values), states(alone.past_key_values)):
        torch.testing.assert_close(s[1:], s1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z[1:], z1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CORE)
def test_sampling_with_a_seed_equals_no_cache(case):
    model = make(case)
    ids, mask = left_padded(prompts([6, 3]))
    kwargs = dict(do_sample=True, max_new_tokens=10, temperature=1.5, top_k=0, num_return_sequences=2)
    torch.manual_seed(123)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(123)
    plain = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert ours.tolist() == plain.tolist()
    torch.manual_seed(124)
    assert model.generate(ids, attention_mask=mask, **kwargs).tolist() != ours.tolist()  # the seed matters


@pytest.mark.parametrize("case", CORE)
def test_beam_search_reorders_the_state(case, monkeypatch):
    model = make(case)
    ids, mask = left_padded(prompts([6, 4]))
    reorders = []
    real = hf_fastattn.RecurrentCache.reorder_cache

    def spy(self, beam_idx):
        reorders.append(beam_idx.tolist())
        return real(self, beam_idx)

    monkeypatch.setattr(hf_fastattn.RecurrentCache, "reorder_cache", spy)
    kwargs = dict(do_sample=False, num_beams=3, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    assert isinstance(ours.past_key_values, hf_fastattn.RecurrentCache)
    # beams were really reordered (not the identity every time)
    assert reorders and any(r != sorted(r) or len(set(r)) < len(r) for r in reorders)
    plain = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert ours.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(ours.sequences_scores, plain.sequences_scores, atol=1e-4, rtol=1e-4)


def test_streamer_receives_prompt_then_tokens_in_order():
    model = make("llama-fast2")
    ids = torch.tensor(prompts([6]))
    ours, plain = StreamRecorder(), StreamRecorder()
    out = model.generate(ids, do_sample=False, max_new_tokens=9, streamer=ours)
    model.generate(ids, do_sample=False, max_new_tokens=9, streamer=plain, use_cache=False)
    assert ours.ended and ours.chunks == plain.chunks
    assert ours.chunks[0] == ids.tolist()  # the prompt first, then one token per step
    assert [c for chunk in ours.chunks[1:] for c in chunk] == out[0, 6:].tolist()


def test_text_streamer_prints_the_generated_text(capsys):
    from transformers import TextStreamer

    class _Tokenizer:  # the two methods TextStreamer calls
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    model = make("gpt2-linear")
    ids = torch.tensor(prompts([5]))
    out = model.generate(ids, do_sample=False, max_new_tokens=6, streamer=TextStreamer(_Tokenizer(), skip_prompt=True))
    printed = capsys.readouterr().out.strip()
    assert printed == "".join(f"<{i}>" for i in out[0, 5:].tolist())


class _StopWhenFirstRowSays(StoppingCriteria):
    """Stops every row once row 0 emits `token`."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[0, -1] == self.token).expand(input_ids.shape[0])


@pytest.mark.parametrize("case", ["llama-linear", "gpt2-fast2"])
def test_max_min_new_tokens_eos_and_stopping_criteria(case):
    model = make(case)
    ids, mask = left_padded(prompts([7, 5]))
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14)
    assert free.shape[1] == ids.shape[1] + 14  # max_new_tokens, no EOS set
    new = free[0, ids.shape[1] :].tolist()
    eos = new[4]  # a token the first row really produces at step 4
    first = new.index(eos)

    def both(**kwargs):
        ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14, **kwargs)
        plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14, use_cache=False, **kwargs)
        assert ours.tolist() == plain.tolist()
        return ours

    stopped = both(eos_token_id=eos)
    assert stopped[0, ids.shape[1] + first] == eos and stopped[0, ids.shape[1] + first + 1 :].eq(PAD).all()
    at_least = both(eos_token_id=eos, min_new_tokens=first + 3)
    assert eos not in at_least[0, ids.shape[1] : ids.shape[1] + first + 3].tolist()
    assert at_least.shape[1] >= ids.shape[1] + first + 3
    criteria = both(stopping_criteria=StoppingCriteriaList([_StopWhenFirstRowSays(eos)]))
    assert criteria.tolist() == free[:, : ids.shape[1] + first + 1].tolist()  # stopped right after that token


# --------------------------------------------------------------------------------------------------------------
# 3. chunked prefill = token-by-token feeding


@pytest.mark.parametrize(
    "case,length", [("llama-linear", 150), ("llama-fast2", 64), ("mistral-fast1", 70), ("gpt2-fast1", 70)]
)
def test_chunked_prefill_equals_token_by_token(case, length):
    """One forward over the prompt (chunks of 16 from the stored state) = the prompt fed one token at a time."""
    model = make(case)
    hf_fastattn.configure(model, chunk_size=16)
    rows = prompts([length, length - 19])
    ids, mask = left_padded(rows)
    pos = positions(mask)

    chunked = hf_fastattn.RecurrentCache(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=chunked).logits
    stepped = hf_fastattn.RecurrentCache(model)
    last = feed_token_by_token(model, ids, mask, stepped)
    torch.testing.assert_close(logits[:, -1:], last, atol=1e-4, rtol=1e-4)
    assert chunked.get_seq_length() == stepped.get_seq_length() == length
    for (s, z), (s1, z1) in zip(states(chunked), states(stepped)):
        torch.testing.assert_close(s, s1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z, z1, atol=1e-4, rtol=1e-4)
    # and the prefill's logits at every real position are the reference's
    expected = reference_logits(model, ids, mask)
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=2e-4, rtol=1e-4)


def test_generate_prefill_chunk_size_equals_plain_generate():
    """transformers' own chunked prefill (generation_config.prefill_chunk_size) feeds the prompt through the cache."""
    model = make("qwen3-fast2")
    ids, mask = left_padded(prompts([40, 23]))
    whole = gen(model, ids, mask, max_new_tokens=6)
    chunked = gen(model, ids, mask, max_new_tokens=6, prefill_chunk_size=16)
    assert chunked.sequences.tolist() == whole.sequences.tolist()
    torch.testing.assert_close(step_logits(chunked), step_logits(whole), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# 4. caches made up front, continuation, errors


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the old name still works
@pytest.mark.parametrize("make_from,argument", [("model", "past_key_values"), ("config", "cache")])
def test_cache_made_up_front_is_used_and_returned(make_from, argument):
    model = make("llama-linear")
    ids, mask = left_padded(prompts([8, 5]))
    expected = gen(model, ids, mask, max_new_tokens=10)
    cache = hf_fastattn.RecurrentCache(model if make_from == "model" else model.config)
    out = gen(model, ids, mask, max_new_tokens=10, **{argument: cache})
    assert out.past_key_values is cache
    assert out.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(expected), atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + 9 and cache.nbytes() == expected_nbytes(model, 2)
    # reset() empties it: the same cache serves a new generation as a fresh one would
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    again = gen(model, ids, mask, max_new_tokens=10, cache=cache)
    assert again.sequences.tolist() == expected.sequences.tolist()


@pytest.mark.parametrize("case", ["llama-linear", "qwen3-fast2", "gpt2-fast1"])
def test_continuing_from_a_returned_cache_equals_one_long_generation(case):
    model = make(case)
    ids, mask = left_padded(prompts([8, 5]))
    whole = gen(model, ids, mask, max_new_tokens=20)
    first = gen(model, ids, mask, max_new_tokens=8)
    cache = first.past_key_values
    mask2 = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    second = gen(model, first.sequences, mask2, max_new_tokens=12, cache=cache)
    assert second.past_key_values is cache
    assert second.sequences.tolist() == whole.sequences.tolist()
    torch.testing.assert_close(step_logits(second), step_logits(whole)[:, 8:], atol=1e-4, rtol=1e-4)
    # only the one token not yet seen was fed before the second run's steps
    assert cache.get_seq_length() == whole.sequences.shape[1] - 1


def test_continuing_without_attention_mask_batch_one():
    model = make("llama-fast1")
    ids = torch.tensor(prompts([8]))
    whole = gen(model, ids, max_new_tokens=15)
    first = gen(model, ids, max_new_tokens=5)
    second = gen(model, first.sequences, max_new_tokens=10, cache=first.past_key_values)
    assert second.sequences.tolist() == whole.sequences.tolist()
    torch.testing.assert_close(step_logits(second), step_logits(whole)[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(dict(num_hidden_layers=3), id="more-layers"),
        pytest.param(dict(num_hidden_layers=1), id="fewer-layers"),
        pytest.param(dict(num_attention_heads=8, num_key_value_heads=4), id="other-heads"),
        pytest.param(dict(impl="fast"), id="fast-vs-linear"),
        pytest.param(dict(order=1), id="fast-order"),
    ],
)
@pytest.mark.parametrize("how", ["generate", "forward"])
def test_cache_of_another_model_is_refused(other, how):
    other = dict(other)
    base = "llama-fast2" if "order" in other else "llama-linear"
    model = make(base)
    impl = other.pop("impl", None)
    order = other.pop("order", None)
    if impl is not None:
        foreign = make("llama-fast2")
    else:
        foreign = make(base, **other)
        if order is not None:
            hf_fastattn.configure(foreign, order=order)
    cache = hf_fastattn.RecurrentCache(foreign)
    ids = torch.tensor(prompts([6]))
    with pytest.raises(ValueError, match="another model"):
        if how == "generate":
            model.generate(ids, max_new_tokens=3, cache=cache)
        else:
            hf_fastattn.enable_recurrent_decoding(model)
            model(input_ids=ids, cache=cache)


def test_recurrent_cache_refused_by_sdpa_model():
    linear = make("llama-linear")
    torch.manual_seed(0)
    sdpa = tiny_model("llama", initializer_range=0.2)
    ids = torch.tensor(prompts([6]))
    with pytest.raises(ValueError, match="sdpa"):
        sdpa.generate(ids, max_new_tokens=3, cache=hf_fastattn.RecurrentCache(linear))
    with pytest.raises(ValueError, match="linear.*fast|RecurrentCache"):
        hf_fastattn.RecurrentCache(sdpa)
    with pytest.raises(ValueError, match="linear.*fast|RecurrentCache"):
        hf_fastattn.RecurrentCache(sdpa.config)
    # a model switched to sdpa after its modules were prepared: refused, not silently attending to one token
    switched = make("llama-linear")
    cache = hf_fastattn.RecurrentCache(switched)
    switched.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="sdpa"):
        switched(input_ids=ids, cache=cache)
    # and sdpa's own generate keeps its DynamicCache
    assert type(gen(sdpa, ids, max_new_tokens=2).past_key_values) is DynamicCache


@pytest.mark.parametrize("how", ["generate", "forward"])
def test_batch_size_mismatch_is_refused(how):
    model = make("llama-fast2")
    ids, mask = left_padded(prompts([6, 4]))
    cache = gen(model, ids, mask, max_new_tokens=3).past_key_values
    one = torch.tensor(prompts([5]))
    seen, before = cache.get_seq_length(), [(s.clone(), z.clone()) for s, z in states(cache)]
    with pytest.raises(ValueError, match="batch"):
        if how == "generate":
            model.generate(one, max_new_tokens=3, cache=cache)
        else:
            model(input_ids=one, cache=cache)
    # the refused call left the cache as it was: it still continues its own batch
    assert cache.get_seq_length() == seen
    for (s, z), (s0, z0) in zip(states(cache), before):
        assert torch.equal(s, s0) and torch.equal(z, z0)


# the LoLCATs sliding-window hybrid: a linear state plus the last `window` keys and values

HYBRID = {"t2r": dict(feature_dim=16, hybrid=True, window=4), "hedgehog": dict(hybrid=True, window=4)}


def hybrid_model(method, family="llama"):
    model = converted(method, family, **HYBRID[method])
    # away from the 1/2 - 1/2 start, so that the softmax window and the linear part weigh differently per head
    gen_ = torch.Generator().manual_seed(3)
    for module in model.modules():
        if getattr(module, "fastattn_window_factor", None) is not None:
            module.fastattn_window_factor.copy_(torch.randn(module.fastattn_window_factor.shape, generator=gen_))
    return model


def hybrid_nbytes(model, batch, held):
    """The linear state's bytes (float32) plus `held` stored keys and values (the model's dtype) and their mask."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    window = cfg.num_hidden_layers * batch * (kv_heads * held * 2 * head_dim * 4 + held)
    return expected_nbytes(model, batch) + window


@pytest.mark.parametrize(
    "method,family", [("t2r", "llama"), ("hedgehog", "llama"), ("t2r", "gpt2"), ("hedgehog", "qwen3")]
)
def test_sliding_window_hybrid_decodes_recurrently_in_constant_memory(method, family):
    """The hybrid decodes with a RecurrentCache holding the state and the last `window` keys/values: tokens and
    logits equal use_cache=False (the whole-sequence quadratic form, no state) and transformers' DynamicCache on a
    left-padded batch, the padded row equals its prompt alone, and the bytes stay the same as the context grows."""
    model = hybrid_model(method, family)
    rows = prompts([9, 5])
    ids, mask = left_padded(rows)
    out = gen(model, ids, mask, max_new_tokens=12)
    cache = out.past_key_values
    assert type(cache) is hf_fastattn.RecurrentCache
    plain = gen(model, ids, mask, max_new_tokens=12, use_cache=False)
    assert out.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(plain), atol=1e-4, rtol=1e-4)
    dynamic = gen(model, ids, mask, max_new_tokens=12, cache=DynamicCache(config=model.config))
    assert type(dynamic.past_key_values) is DynamicCache
    assert dynamic.sequences.tolist() == out.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(dynamic), atol=1e-4, rtol=1e-4)

    alone = gen(model, torch.tensor(rows[1:]), max_new_tokens=12)
    pad = ids.shape[1] - len(rows[1])
    assert out.sequences[1, pad:].tolist() == alone.sequences[0].tolist()
    torch.testing.assert_close(step_logits(out)[1:], step_logits(alone), atol=1e-4, rtol=1e-4)

    held = HYBRID[method]["window"] + model.config.fastattn["sinks"]  # the window's slots and the sinks'
    assert cache.nbytes() == hybrid_nbytes(model, 2, held)
    longer = gen(model, ids, mask, max_new_tokens=40)
    assert longer.past_key_values.nbytes() == cache.nbytes()
    assert dynamic.past_key_values.get_seq_length() == ids.shape[1] + 11  # the K/V cache, by contrast, grows


def test_sliding_window_hybrid_prefill_in_pieces_equals_token_by_token(monkeypatch):
    """A long prompt goes through the hybrid cache in pieces (16 here); fed at once, in pieces, or one token at a time,
    the logits and the stored state agree, and equal the full forward without a cache."""
    model = hybrid_model("t2r")
    monkeypatch.setattr(hybrid_attention, "_HYBRID_PREFILL_PIECE", 16)
    rows = prompts([70, 51])
    ids, mask = left_padded(rows)
    pos = positions(mask)
    whole = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    pieces = hf_fastattn.RecurrentCache(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=pieces).logits
    torch.testing.assert_close(logits[mask.bool()], whole[mask.bool()], atol=1e-4, rtol=1e-4)
    stepped = hf_fastattn.RecurrentCache(model)
    last = feed_token_by_token(model, ids, mask, stepped)
    torch.testing.assert_close(logits[:, -1:], last, atol=1e-4, rtol=1e-4)
    for a, b in zip(pieces.layers, stepped.layers):
        torch.testing.assert_close(a.state[0], b.state[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.state[1], b.state[1], atol=1e-4, rtol=1e-4)
        for x, y in zip(a.window_kv, b.window_kv):  # keys, values (projections of other shapes: rounding) and mask
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert a.window_kv[0].shape[2] == HYBRID["t2r"]["window"]


def test_sliding_window_hybrid_beam_search_equals_no_cache():
    model = hybrid_model("hedgehog")
    ids, mask = left_padded(prompts([6, 4]))
    kwargs = dict(do_sample=False, num_beams=3, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    assert isinstance(ours.past_key_values, hf_fastattn.RecurrentCache)
    plain = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert ours.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(ours.sequences_scores, plain.sequences_scores, atol=1e-4, rtol=1e-4)


def test_sliding_window_hybrid_state_against_a_written_out_reference():
    """The op on its own: a window of keys after a folded state = the weights of the module docstring summed in a
    loop over every key (state: keys beyond the window, linear weights only)."""
    from hf_fastattn.ops.feature_maps import T2RFeatureMap
    from hf_fastattn.ops.hybrid import fold_window_state, sliding_window_linear_attention

    torch.manual_seed(0)
    b, h, hkv, d, w, n_old, n_new = 2, 4, 2, 8, 3, 7, 5
    phi = T2RFeatureMap(h, d, 12)
    q = torch.randn(b, h, n_new, d)
    k, v = torch.randn(b, hkv, n_old + n_new, d), torch.randn(b, hkv, n_old + n_new, d)
    keep = torch.ones(b, n_old + n_new, dtype=torch.bool)
    keep[1, :3] = False  # left padding of row 1
    factor = torch.randn(h)
    # what a cache holds after n_old tokens: the first n_old - w folded, the last w kept
    state = fold_window_state(k[:, :, : n_old - w], v[:, :, : n_old - w], feature_map=phi, num_heads=h,
                              padding_mask=keep[:, : n_old - w])
    got = sliding_window_linear_attention(
        q, k[:, :, n_old - w :], v[:, :, n_old - w :], feature_map=phi, window=w, window_factor=factor,
        padding_mask=keep[:, n_old - w :], initial_state=state,
    )
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    fq, fk = phi(q), phi(kr)
    gamma = torch.sigmoid(factor)
    expected = torch.zeros(b, h, n_new, d)
    for bi in range(b):
        for hi in range(h):
            for qi in range(n_new):
                i = n_old + qi
                soft = [j for j in range(i + 1) if i - j < w and keep[bi, j]]
                scores = {j: float(q[bi, hi, qi] @ kr[bi, hi, j]) / d**0.5 for j in soft}
                m = max(scores.values())
                num, den = torch.zeros(d), 0.0
                for j in range(i + 1):
                    if not keep[bi, j]:
                        continue
                    wij = gamma[hi] * torch.exp(torch.tensor(scores[j] - m)) if j in scores else (
                        (1 - gamma[hi]) * (fq[bi, hi, qi] @ fk[bi, hi, j]))
                    num, den = num + wij * vr[bi, hi, j], den + wij
                expected[bi, hi, qi] = num / den
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hybrid_decode_step_equals_the_general_form():
    """The one-token fast path (`hybrid_decode_step`) = `sliding_window_linear_attention` on the stored window plus the
    new key with the stored state, empty (masked) window slots included; its new window and state are the old ones
    moved on by one token."""
    from hf_fastattn.ops.feature_maps import HedgehogFeatureMap
    from hf_fastattn.ops.hybrid import fold_window_state, hybrid_decode_step, sliding_window_linear_attention

    torch.manual_seed(1)
    b, h, hkv, d, w = 2, 4, 2, 8, 5
    phi = HedgehogFeatureMap(h, d)
    wk, wv = torch.randn(b, hkv, w, d), torch.randn(b, hkv, w, d)
    wmask = torch.ones(b, w, dtype=torch.bool)
    wmask[1, :3] = False  # row 1: three empty slots (a short context, or padding)
    state = fold_window_state(torch.randn(b, hkv, 3, d), torch.randn(b, hkv, 3, d), feature_map=phi, num_heads=h)
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    mask, factor = torch.ones(b, 1, dtype=torch.bool), torch.randn(h)
    out, (k2, v2, m2), (s2, z2) = hybrid_decode_step(
        q, k, v, mask, (wk, wv, wmask), state, feature_map=phi, window_factor=factor
    )
    expected = sliding_window_linear_attention(
        q, torch.cat([wk, k], 2), torch.cat([wv, v], 2), feature_map=phi, window=w, window_factor=factor,
        padding_mask=torch.cat([wmask, mask], 1), initial_state=state,
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(k2, torch.cat([wk[:, :, 1:], k], 2)) and torch.equal(m2, torch.cat([wmask[:, 1:], mask], 1))
    s_ref, z_ref = fold_window_state(wk[:, :, :1], wv[:, :, :1], feature_map=phi, num_heads=h,
                                     padding_mask=wmask[:, :1], state=state)
    torch.testing.assert_close(s2, s_ref)
    torch.testing.assert_close(z2, z_ref)
    assert torch.equal(s2[1], state[0][1])  # row 1's leaving slot was empty: its state did not change
    with pytest.raises(ValueError, match="one new token"):
        hybrid_decode_step(q.expand(b, h, 2, d), k, v, mask, (wk, wv, wmask), state, feature_map=phi)
    with pytest.raises(ValueError, match="does not match the new key"):
        hybrid_decode_step(q, k[:1], v[:1], mask[:1], (wk, wv, wmask), state, feature_map=phi)
    with pytest.raises(ValueError, match="differ in batch, heads or length"):
        fold_window_state(wk, wv[:, :, :2], feature_map=phi, num_heads=h)


# --------------------------------------------------------------------------------------------------------------
# 5. torch.compile of the decode step


def test_compiled_decode_step_equals_eager():
    model = make("llama-fast1")
    ids = torch.tensor(prompts([8]))
    eager_cache = hf_fastattn.RecurrentCache(model)
    model(input_ids=ids, cache=eager_cache)
    compiled_cache = copy.deepcopy(eager_cache)
    compiled = torch.compile(model.forward, backend="aot_eager")
    for token in (7, 31, 64):
        step = torch.tensor([[token]])
        expected = model(input_ids=step, cache=eager_cache).logits
        got = compiled(input_ids=step, cache=compiled_cache).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 11
    for (s, z), (s1, z1) in zip(states(compiled_cache), states(eager_cache)):
        torch.testing.assert_close(s, s1)
        torch.testing.assert_close(z, z1)


# --------------------------------------------------------------------------------------------------------------
# 6. converted models (learned per-head feature maps)


@pytest.mark.parametrize("method,options", [("t2r", dict(feature_dim=16)), ("hedgehog", {})], ids=["t2r", "hedgehog"])
def test_converted_models_decode_recurrently(method, options):
    model = converted(method, **options)
    ids, mask = left_padded(prompts([9, 5]))
    out = gen(model, ids, mask, max_new_tokens=12)
    cache = out.past_key_values
    assert type(cache) is hf_fastattn.RecurrentCache
    assert cache.nbytes() == expected_nbytes(model, 2)  # per query head, F from the learned map
    plain = gen(model, ids, mask, max_new_tokens=12, use_cache=False)
    assert out.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(plain), atol=1e-4, rtol=1e-4)
    assert_steps_match_reference(model, out, ids.shape[1], mask)


# --------------------------------------------------------------------------------------------------------------
# 7. a DynamicCache passed explicitly (issue 14 item 12): kept as given, and exact


@pytest.mark.parametrize("case", ["llama-linear", "qwen3-fast2", "gpt2-fast1", "qwen2-linear-relu"])
def test_explicit_dynamic_cache_is_kept_and_exact(case):
    """generate(cache=DynamicCache(...)) on a "linear" / "fast" model keeps that cache (it is the user's choice; only
    the default cache becomes a RecurrentCache): the keys and values grow, each step's query reads the prefix through
    one state sum (`linear_attention._suffix_queries`), and tokens and logits equal use_cache=False, the RecurrentCache's, and
    the written-out reference, on a left-padded batch."""
    model = make(case)
    ids, mask = left_padded(prompts([9, 4]))
    cache = DynamicCache(config=model.config)
    out = gen(model, ids, mask, max_new_tokens=10, cache=cache)
    assert out.past_key_values is cache and type(cache) is DynamicCache
    assert cache.get_seq_length() == ids.shape[1] + 9  # it grew: every token but the last one generated
    plain = gen(model, ids, mask, max_new_tokens=10, use_cache=False)
    recurrent = gen(model, ids, mask, max_new_tokens=10)
    assert type(recurrent.past_key_values) is hf_fastattn.RecurrentCache
    assert out.sequences.tolist() == plain.sequences.tolist() == recurrent.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(plain), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits(out), step_logits(recurrent), atol=1e-4, rtol=1e-4)
    assert_steps_match_reference(model, out, ids.shape[1], mask)


@pytest.mark.parametrize("case", ["llama-fast2", "gpt2-linear"])
def test_explicit_dynamic_cache_forward_with_several_new_tokens(case):
    """A forward with a DynamicCache holding a prefix and several new tokens at once (a Jacobi guess block): the new
    tokens' logits equal those of one cache-free forward over the whole sequence."""
    model = make(case)
    ids, mask = left_padded(prompts([14, 9]))
    pos = positions(mask)
    whole = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], cache=cache)
    assert type(cache) is DynamicCache and cache.get_seq_length() == 8
    rest = model(input_ids=ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:], cache=cache).logits
    torch.testing.assert_close(rest, whole[:, 8:], atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]


def test_fast_head_dim_64_decodes_recurrently():
    """FAST order 2 at a real head size (D = 64: 2145 features, the causal form's one-chunk-per-segment path of
    256-token chunks): the RecurrentCache's generation equals use_cache=False and the written-out reference, and the
    state has the bytes that F says."""
    torch.manual_seed(0)
    model = tiny_model("llama", attn_implementation="fast", initializer_range=0.2, hidden_size=128,
                       num_attention_heads=2, num_key_value_heads=1)
    hf_fastattn.configure(model, order=2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    ids, mask = left_padded(prompts([270, 250]))  # prefill: two chunks of 256, the second padded
    out = gen(model, ids, mask, max_new_tokens=6)
    assert type(out.past_key_values) is hf_fastattn.RecurrentCache
    assert out.past_key_values.nbytes() == expected_nbytes(model, 2)
    plain = gen(model, ids, mask, max_new_tokens=6, use_cache=False)
    assert out.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(step_logits(out), step_logits(plain), atol=1e-4, rtol=1e-4)
    assert_steps_match_reference(model, out, ids.shape[1], mask)
