"""Smoke test of `hf-fastattn bench decode --quick`: it runs, prints the table and the targets, writes the table,
the JSON and the plot; recurrent caches keep the same bytes at every context while the sdpa K/V cache grows."""

import json

import torch

from hf_fastattn.cli import main


def test_bench_decode_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "decode", "--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # --threads is undone
    printed = capsys.readouterr().out
    assert "linear ms/token" in printed and "cache bytes constant" in printed

    table = (tmp_path / "quick_decode.md").read_text()
    for column in ("sdpa ms/token", "sdpa-static ms/token", "linear ms/token", "fast ms/token",
                   "linear speed-up vs sdpa", "fast speed-up vs sdpa-static", "fast cache MiB"):
        assert column in table
    assert (tmp_path / "quick_decode.png").stat().st_size > 10_000

    data = json.loads((tmp_path / "quick_decode.json").read_text())
    results = data["results"]
    contexts = ["64", "256"]
    assert set(results) == {"sdpa", "sdpa-static", "linear", "fast", "hybrid"}
    for impl in results:
        assert set(results[impl]) == set(contexts)
        for n in contexts:
            r = results[impl][n]
            assert r["ms"] > 0 and len(r["step_ms"]) == data["args"]["steps"]

    # constant recurrent state, growing K/V cache: exactly layers * 2 (K, V) * heads * N * head_dim fp32 values
    for impl in ("linear", "fast", "hybrid"):  # hybrid: the state and the last 64 keys/values (a full window)
        sizes = [results[impl][n]["cache_bytes"] for n in contexts]
        assert sizes[0] == sizes[1] > 0
    shape = data["model"]
    for n in contexts:
        assert results["sdpa"][n]["cache_bytes"] == shape["layers"] * 2 * shape["hidden"] * int(n) * 4
        assert results["sdpa-static"][n]["cache_bytes"] == shape["layers"] * 2 * shape["hidden"] * (int(n) + 1) * 4
    # fast's 256-token context reuses the 64-token prefill's state (the --fast-prefill-limit path), linear is real
    assert results["fast"]["256"]["real_prefill_tokens"] == 64
    assert results["linear"]["256"]["real_prefill_tokens"] == 256
    assert results["hybrid"]["256"]["real_prefill_tokens"] == 256
    # hybrid holds linear's state plus 64 window and 4 sink keys and values per layer (fp32) and their masks (bool)
    window = shape["layers"] * (2 * shape["hidden"] * (64 + 4) * 4 + 64 + 4)
    assert results["hybrid"]["64"]["cache_bytes"] == results["linear"]["64"]["cache_bytes"] + window
    targets = {t["target"].split(":")[0] for t in data["targets"]}
    assert {"linear latency flat", "linear cache bytes constant in context"} <= targets
    assert set(data["no_attention_ms"]) == set(contexts) and min(data["no_attention_ms"].values()) > 0
    assert "no-attention ms/token" in table and "no attention can be more than" in table


def test_floor_model_has_no_attention():
    """The bench's "no-attention" floor: the model's own layers with zeros for attention, so a token's logits do not
    depend on what came before it (the sdpa model's do) and equal a forward whose attention output projection sees
    only zeros (o_proj's bias, none in Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fastattn.showcase.bench.decode import floor_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    floor = floor_model(model)
    a, b = torch.tensor([[3, 5, 9, 11]]), torch.tensor([[40, 2, 7, 11]])
    with torch.no_grad():
        fa, fb = floor(a).logits[0, -1], floor(b).logits[0, -1]
        torch.testing.assert_close(fa, fb, rtol=0, atol=1e-6)
        assert not torch.allclose(model(a).logits[0, -1], model(b).logits[0, -1], atol=1e-3)
        # by hand: every attention module's output is o_proj(0) = 0, so only the MLP path changes the residual
        hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: (torch.zeros_like(o[0]), *o[1:]))
                 for layer in model.model.layers]
        try:
            torch.testing.assert_close(model(a).logits[0, -1], fa, rtol=1e-5, atol=1e-5)
        finally:
            for hook in hooks:
                hook.remove()
    assert model.config._attn_implementation == "sdpa"  # the original is left as it was


def test_bench_decode_on_a_pretrained_model_folder(tmp_path, capsys):
    """--model runs the same measurement on a saved checkpoint (here a tiny Llama; the README's table is the real
    SmolLM2): every implementation on a copy of its weights, the prefill limit applied to every recurrent cache,
    the crossovers reported."""
    from hf_fastattn.conversion.tiny import tiny_llama, tiny_tokenizer

    folder = tmp_path / "model"
    tokenizer = tiny_tokenizer("to be or not to be, that is the question " * 20, vocab_size=128)
    model = tiny_llama(len(tokenizer), heads=4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    args = ["bench", "decode", "--model", str(folder), "--contexts", "32", "96", "--steps", "2", "--warmup", "1",
            "--prefill-limit", "48", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{folder} (llama, 2 layers" in printed and "pretrained weights" in printed
    data = json.loads((out / "decode.json").read_text())
    assert data["model"] == str(folder)
    assert set(data["crossovers"]) == {f"{r} vs {k}" for r in ("linear", "fast", "hybrid") for k in ("sdpa", "sdpa-static")}
    for impl in ("linear", "fast", "hybrid"):
        assert data["results"][impl]["32"]["real_prefill_tokens"] == 32
        assert data["results"][impl]["96"]["real_prefill_tokens"] == 48  # the limit, count set to 96
        assert data["results"][impl]["32"]["cache_bytes"] == data["results"][impl]["96"]["cache_bytes"]
    sdpa = data["results"]["sdpa"]
    assert sdpa["96"]["cache_bytes"] == 3 * sdpa["32"]["cache_bytes"]  # 4 K/V heads of 16, 2 layers: grows with N
