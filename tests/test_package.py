"""The public entry points: `import hf_fastattn` alone is enough to convert and to reload a converted checkpoint."""

import subprocess
import sys
import textwrap

import torch

import hf_fastattn


def test_top_level_api():
    for name in ("convert", "RecurrentCache", "configure", "enable_recurrent_decoding", "FastAttnOptions"):
        assert hasattr(hf_fastattn, name), name
    assert set(hf_fastattn.IMPLEMENTATIONS) == {"linear", "fast", "sparse", "mqa"}


def test_import_hf_fastattn_alone_restores_a_converted_checkpoint(tmp_path, make_tiny_model):
    model = hf_fastattn.convert(make_tiny_model("llama"), "t2r")
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 90, (1, 12))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    # a fresh process that only imports hf_fastattn (not hf_fastattn.conversion) before loading
    code = textwrap.dedent(
        f"""
        import torch, hf_fastattn
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_jacobi_decoding_from_the_top_level():
    """`hf_fastattn.jacobi_decoding` is the callable `generate(custom_generate=...)` takes (as first asked)."""
    from hf_fastattn.generation import jacobi

    assert hf_fastattn.jacobi_decoding is jacobi.jacobi_decoding
    assert hf_fastattn.jacobi_generate is jacobi.jacobi_generate
    assert {"jacobi_decoding", "jacobi_generate", "load_causal_lm"} <= set(hf_fastattn.__all__)
    from hf_fastattn.loading import load_causal_lm

    assert hf_fastattn.load_causal_lm is load_causal_lm
