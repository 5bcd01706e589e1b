"""Smoke test of `hf-fastattn bench attention --quick`: it runs, prints the table, writes the plot."""

from hf_fastattn.cli import main
from hf_fastattn.ops.reference import sparse_pattern_mask
from hf_fastattn.showcase.bench.attention import flops, sparse_pairs


def test_bench_attention_quick(tmp_path, capsys):
    assert main(["bench", "attention", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up vs sdpa" in printed and "sdpa GFLOP/s" in printed
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    table = (tmp_path / "attention.md").read_text()
    cells = {cell.strip() for line in table.splitlines() if line.startswith("|") for cell in line.split("|")}
    for method in ("sdpa", "linear", "fast-1", "fast-2", "sparse", "sparse-fixed"):
        assert method in cells
    for direction in ("causal", "bidirectional"):
        assert direction in table
    assert "Decoding step" in table and "fast-2 decoding step" in table


def test_flop_counts():
    """sdpa counts the allowed pairs (causal: N(N+1)/2) at 4 D flops each; the sparse operators compute a superset
    of their pattern's pairs."""
    assert flops("sdpa", 4, 1, 8, causal=True) == 4 * 8 * 10
    assert flops("sdpa", 4, 1, 8, causal=False) == 4 * 8 * 16
    for method, pattern in (("sparse", "strided"), ("sparse-fixed", "fixed")):
        for causal in (True, False):
            allowed = sparse_pattern_mask(1024, causal=causal, pattern=pattern, stride=128).sum().item()
            assert allowed <= sparse_pairs(method, 1024, causal) <= 3 * allowed
