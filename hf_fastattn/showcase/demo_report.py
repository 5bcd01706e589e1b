"""The demo's report: a table, a paragraph saying what was measured and what to conclude, and a plot per section;
written as markdown, JSON and one self-contained HTML page by `hf_fastattn.showcase.demo`."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .bench.utils import describe_crossover

# untrained controls, each shown beside the converted model it explains (`conversion.recipes.RECIPES`)
CONTROLS = {"window-only": "hedgehog"}
PLOTS = ("perplexity.png", "decoding.png", "swap.png", "real_decoding.png", "jacobi.png")

QUALITY = "1. Conversion: validation perplexity (held-out tinyshakespeare)"
DECODING = "2. Decoding the converted models: cache and time per token against context length"
CROSSOVER = "3. Where each converted model overtakes the teacher in decoding"
SWAP = "4. The pretrained model with each attention swapped in, untrained"
REAL_DECODING = "5. Decoding on the architecture of the pretrained model: the K/V cache vs the recurrent cache"
JACOBI = "6. Jacobi decoding on the pretrained model vs greedy generate"


def decoding_rows(records: list[dict], baseline: str) -> list[list]:
    base_ms = {d["context"]: d["s_per_token"] for d in records if d["model"] == baseline}
    return [
        [d["model"], d["context"], d["cache"], f"{d['cache_bytes'] / 2**20:.2f}", d["s_per_token"] * 1000,
         f"{base_ms[d['context']] / d['s_per_token']:.2f}x"]
        for d in records
    ]


def results_tables(results: dict) -> dict[str, tuple[list, list]]:
    """{title: (header, rows)} for the six tables."""
    teacher_ppl = results["models"]["teacher"]["val_ppl"]
    quality = [
        [name, f"{r['val_ppl']:.2f}", f"{r['val_ppl'] / teacher_ppl:.4f}", r["train_tokens"], r["seconds"], r["attention"]]
        for name, r in results["models"].items()
    ]
    crossing = [
        [name, describe_crossover(c["time"]), describe_crossover(c["cache"])]
        for name, c in results["crossovers"].items()
    ]
    real = results["pretrained"]
    swap = [[r["variant"], r["attention"], f"{r['ppl']:.2f}", f"{r['x_sdpa']:.3f}"] for r in real["swap"]]
    totals = results["jacobi"]["totals"]
    greedy, identical = totals["greedy"]["seconds"], results["jacobi"]["identical"]
    jacobi = [
        [m, t["tokens"] / t["passes"], t["seconds"], greedy / t["seconds"], "yes" if identical else "NO"]
        for m, t in totals.items()
    ]
    decode_header = ["model", "context", "cache", "cache MiB", "ms/token"]
    return {
        QUALITY: (["model", "val ppl", "x teacher", "train tokens", "seconds", "attention"], quality),
        DECODING: ([*decode_header, "speed vs teacher"], decoding_rows(results["decoding"], "teacher")),
        CROSSOVER: (["model", "faster per token than the teacher", "smaller cache than the teacher"], crossing),
        SWAP: (["attention", "implementation", "ppl", "x sdpa"], swap),
        REAL_DECODING: ([*decode_header, "speed vs sdpa"], decoding_rows(real["decoding"], "sdpa")),
        JACOBI: (["method", "tokens/forward", "total s", "speed-up", "identical to greedy"], jacobi),
    }


def section_notes(results: dict) -> dict[str, str]:
    """{title: a short paragraph}: what each table measured and what to conclude from this run's numbers."""
    models = results["models"]
    teacher_ppl = models["teacher"]["val_ppl"]
    ratio = lambda name: models[name]["val_ppl"] / teacher_ppl
    controls = "; ".join(
        f"{target} scores {ratio(target):.3f}x the teacher's perplexity, its control {control} (the softmax window "
        f"alone, untrained) {ratio(control):.3f}x: "
        + ("the linear part adds what lies beyond the window" if ratio(target) < ratio(control)
           else "on these short validation windows the softmax window carries the hybrid, and this table cannot "
           "tell what its linear part adds (`hf-fastattn bench conversion --seq-len 512` can)")
        for control, target in CONTROLS.items()
        if control in models and target in models
    )
    cross = results["crossovers"]
    cross_text = "; ".join(
        f"{name} is faster per token {describe_crossover(c['time'])} and holds less cache "
        f"{describe_crossover(c['cache'])}"
        for name, c in cross.items()
    )
    longest = max(d["context"] for d in results["decoding"])
    real = results["pretrained"]
    swap = {r["variant"]: r["x_sdpa"] for r in real["swap"]}
    covering = all(abs(swap[v] - 1) < 1e-3 for v in swap if v.startswith("sparse"))
    real_cross = "; ".join(
        f"{name} is faster per token {describe_crossover(c['time'])} and holds less cache "
        f"{describe_crossover(c['cache'])}"
        for name, c in real["crossovers"].items()
    )
    totals = results["jacobi"]["totals"]
    speedups = ", ".join(
        f"{m} {totals['greedy']['seconds'] / t['seconds']:.2f}x" for m, t in totals.items() if m != "greedy"
    )
    return {
        QUALITY: (
            "Perplexity on the held-out last 10% of the corpus, every token scored in windows of "
            f"{results['sizes']['seq_len']} tokens, the same computation for every model. Lower is better; "
            "'x teacher' is the ratio to the softmax teacher the others were converted from, on a token budget "
            f"of about a tenth of its training. {controls}."
        ),
        DECODING: (
            "Greedy `generate` after prompts of growing length (the median step time of the fastest run, prefill "
            "excluded) and the bytes of the cache `generate` kept. Softmax attention's K/V cache (teacher, mqa) "
            "grows with the context and each step reads all of it; the recurrent cache of t2r and hedgehog keeps "
            "a fixed-size state (plus, for the hybrid, the last window's keys and values), so its bytes and step "
            f"time stay flat. Contexts past the teacher's training length ({results['sizes']['seq_len']} tokens "
            "per window) measure cost only, not quality."
        ),
        CROSSOVER: (
            "The context from which each model's curve passes under the teacher's (interpolated between the "
            f"measured contexts, up to {longest:,} tokens): {cross_text}. Below that point softmax attention is "
            "cheaper; this is the length where conversion starts to pay for decoding."
        ),
        SWAP: (
            f"{real['model']} ({real['size']}) with each attention implementation set by `set_attn_implementation`, "
            f"no training: perplexity on {results['sizes']['swap_tokens']} held-out tokens in windows of "
            f"{results['sizes']['swap_seq_len']}. "
            + ("The sparse patterns cover every key at this length, so they equal sdpa. " if covering else
               "The sparse patterns drop keys at this length and pay for it. ")
            + f"Run-time mqa ({swap.get('mqa', float('nan')):.3g}x) and the untrained linear "
            f"({swap.get('linear (untrained)', float('nan')):.3g}x) and fast ({swap.get('fast (untrained)', float('nan')):.3g}x) "
            "swaps run, but a pretrained model does not survive them untrained: that is why `hf-fastattn convert` "
            "uptrains (section 1 shows what uptraining recovers on the small teacher, where it fits in minutes)."
        ),
        REAL_DECODING: (
            f"Greedy `generate` on the architecture of {real['model']} after prompts of growing length, as in section 2: "
            "sdpa with the DynamicCache generate gives it, and the same weights with linear attention and with the "
            "hybrid (linear + a softmax window of 64 tokens) on a RecurrentCache, untrained (the cost of a step "
            f"does not depend on the weights). {real_cross} (interpolated between the measured contexts)."
        ),
        JACOBI: (
            f"Greedy decoding of held-out prompts with Jacobi iterations and lookahead n-gram guesses, on "
            f"{real['model']}, against transformers' greedy `generate`; every output was checked identical token for "
            f"token. Speed-ups in this run: {speedups}. Tokens per forward above 1 means guesses were accepted; "
            "on a CPU a forward that feeds more tokens costs more, so fewer forwards is not always less time."
        ),
    }


def _context_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_all(results: dict, out: Path) -> list[Path]:
    """`PLOTS` under `out`: perplexity.png, decoding.png and real_decoding.png (cache size and step time against
    context, crossovers marked), swap.png and jacobi.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    names = list(results["models"])
    colors = ["gray" if n == "teacher" else "lightgray" if n in CONTROLS else "C0" for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(names, [results["models"][n]["val_ppl"] for n in names], color=colors)
    ax.bar_label(bars, [f"{results['models'][n]['val_ppl']:.2f}" for n in names], fontsize=8)
    ax.set(ylabel="validation perplexity", title="teacher, converted models (blue) and controls (light gray)")
    ax.margins(y=0.12)
    save(fig, "perplexity.png")

    def decoding_plot(records: list[dict], crossings: dict, baseline: str, name: str, title: str) -> None:
        fig, (size_ax, time_ax) = plt.subplots(1, 2, figsize=(11.5, 4))
        contexts = sorted({d["context"] for d in records})
        for i, model in enumerate(dict.fromkeys(d["model"] for d in records)):
            rows = [d for d in records if d["model"] == model]
            label = f"{model} ({rows[0]['cache']})"
            color = "gray" if model == baseline else f"C{i}"
            size_ax.plot([d["context"] for d in rows], [d["cache_bytes"] / 2**20 for d in rows], "o-", color=color,
                         label=label)
            time_ax.plot([d["context"] for d in rows], [d["s_per_token"] * 1000 for d in rows], "o-", color=color,
                         label=label)
            crossing = crossings.get(model)
            for ax, key in ((time_ax, "time"), (size_ax, "cache")):
                if crossing and crossing[key]["status"] == "crosses":
                    ax.axvline(crossing[key]["from"], color=color, ls=":", lw=1)
                    ax.annotate(
                        f"{model} wins from ~{crossing[key]['from']:,}",
                        (crossing[key]["from"], 0.97 - 0.07 * i),
                        xycoords=("data", "axes fraction"),
                        fontsize=7,
                        color=color,
                    )
        for ax in (size_ax, time_ax):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(contexts))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _context_label(int(round(x)))))
            ax.grid(alpha=0.3)
        size_ax.set_yscale("log")
        size_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        size_ax.set(xlabel="context (tokens)", ylabel="cache size (MiB, log scale)", title="cache size")
        time_ax.set(xlabel="context (tokens)", ylabel="ms per new token", title="decode step time (dotted: crossover)")
        time_ax.set_ylim(bottom=0)
        size_ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        save(fig, name)

    decoding_plot(results["decoding"], results["crossovers"], "teacher", "decoding.png",
                  "the teacher and the converted models")
    real = results["pretrained"]
    decoding_plot(real["decoding"], real["crossovers"], "sdpa", "real_decoding.png",
                  f"{real['model']}: sdpa vs linear / hybrid attention (untrained: cost only)")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["variant"] for r in real["swap"]]
    bars = ax.bar(names, [r["x_sdpa"] for r in real["swap"]], color=["gray"] + ["C1"] * (len(names) - 1))
    ax.bar_label(bars, [f"{r['x_sdpa']:.3g}x" for r in real["swap"]], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.set(ylabel="perplexity / sdpa's (log scale)", title=f"{real['model']}: attention swapped in, untrained")
    ax.tick_params(axis="x", labelrotation=20)
    ax.margins(y=0.15)
    save(fig, "swap.png")

    totals = results["jacobi"]["totals"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bars = ax.bar(list(totals), [totals["greedy"]["seconds"] / t["seconds"] for t in totals.values()], color="C2")
    ax.bar_label(
        bars,
        [f"{totals['greedy']['seconds'] / t['seconds']:.2f}x, {t['tokens'] / t['passes']:.2f} tok/fwd" for t in totals.values()],
        fontsize=8,
    )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.margins(y=0.12)
    ax.set(ylabel="speed-up over greedy generate", title=f"Jacobi decoding on {real['model']} (identical outputs)")
    save(fig, "jacobi.png")
    return paths


def html_report(results: dict, tables: dict, plots: list[Path]) -> str:
    """One HTML page with a paragraph, the table and the plot of each section, the plots inlined as base64 PNGs
    (no other files needed)."""

    def cell(c):
        return f"{c:.3g}" if isinstance(c, float) else html.escape(str(c))

    notes = section_notes(results)
    plot_of = {QUALITY: "perplexity", DECODING: "decoding", SWAP: "swap", REAL_DECODING: "real_decoding",
               JACOBI: "jacobi"}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>hf-fastattn demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        "<h1>hf-fastattn demo</h1>",
        f"<p>teacher (sections 1-3): {html.escape(results['teacher'])} ({html.escape(results['teacher_size'])}), "
        f"{html.escape(results['machine'])}; pretrained model (sections 4-6): "
        f"{html.escape(results['pretrained']['model'])} ({html.escape(results['pretrained']['size'])}), "
        f"{html.escape(results['pretrained']['machine'])}; "
        f"{results['seconds']:.0f} s in all. The models are saved under "
        f"{html.escape(str(Path(next(iter(results['saved'].values()))).parent))}.</p>",
    ]
    for title, (header, rows) in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(notes[title])}</p><table><tr>")
        parts.append("".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts.extend("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append("</table>")
        for path in plots:
            if path.stem == plot_of.get(title):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                parts.append(f"<img alt='{path.stem}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
