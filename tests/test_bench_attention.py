"""Smoke test of `hf-fastattn bench attention --quick`: it runs, prints the table, writes the plot."""

from hf_fastattn.cli import main


def test_bench_attention_quick(tmp_path, capsys):
    assert main(["bench", "attention", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| N | mode | method |" in printed.replace("  ", " ") or "speed-up vs sdpa" in printed
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    table = (tmp_path / "attention.md").read_text()
    for method in ("sdpa", "linear", "fast-1", "fast-2", "sparse"):
        assert method in table
