"""DDGviz: the decoding dependency picture of Jacobi decoding (after Santilli et al.'s visualizer).

One row per forward pass (iteration), one column per generated position. A cell shows the token the model predicted
for that position in that pass, coloured by its status and shaded by the model's confidence (its softmax
probability):

    committed  (grey)   already verified by an earlier pass, in the K/V cache
    accepted   (green)  verified by this pass
    final      (blue)   not verified yet, but already the token greedy decoding will emit: the guess has converged
    wrong      (red)    will still change
    (blank)             outside this pass's window

Long blue runs are what Jacobi iteration exploits; a staircase of single green cells is greedy decoding in disguise.
Written as a PNG (matplotlib, Agg) and a self-contained HTML page (inline styles, token and confidence on hover).
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from .jacobi import jacobi_decoding

# status -> RGB
COLOURS = {"committed": (0.55, 0.55, 0.55), "accepted": (0.16, 0.63, 0.17), "final": (0.12, 0.47, 0.71)}
COLOURS["wrong"] = (0.84, 0.15, 0.16)


def ddgviz(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    mode: str = "jacobi",
    block_size: int | None = None,
    adaptive: bool = False,
    out_dir: str | Path | None = None,
    out_path: str | Path | None = None,
) -> dict[str, Path]:
    """Decode `prompt` with Jacobi decoding, record every pass and draw the iteration x position grid.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        prompt (`str`): the text to continue (batch 1).
        max_new_tokens (`int`): columns of the grid.
        mode, block_size, adaptive: passed to `jacobi_decoding` (default: textbook Jacobi over the whole output).
        out_dir: folder for `ddgviz.png` and `ddgviz.html` (default `ddgviz/`); or
        out_path: a file stem (`run1` -> `run1.png`, `run1.html`).

    Returns:
        `{"png": Path, "html": Path}`; the grid is also checked: the last row's tokens are the greedy output.
    """
    stem = Path(out_path).with_suffix("") if out_path is not None else Path(out_dir or "ddgviz") / "ddgviz"
    stem.parent.mkdir(parents=True, exist_ok=True)
    grid = trace_grid(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        mode=mode,
        block_size=block_size,
        adaptive=adaptive,
    )
    png, page = stem.with_suffix(".png"), stem.with_suffix(".html")
    draw_png(grid, png)
    page.write_text(render_html(grid))
    return {"png": png, "html": page}


def trace_grid(model, tokenizer, prompt, *, max_new_tokens, mode, block_size, adaptive) -> dict:
    """Run Jacobi decoding and turn its trace into `cells[pass][position] = (token, confidence, status) | None`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    trace: list[dict] = []
    with torch.no_grad():
        out = jacobi_decoding(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            mode=mode,
            block_size=block_size,
            adaptive=adaptive,
            jacobi_trace=trace,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    prompt_len = ids.shape[1]
    final = out[0, prompt_len:].tolist()
    width = len(final)
    cells, committed = [], 0
    for record in trace:
        if record["accepted"] == 0:  # a recurrent cache re-feeding accepted tokens: no new information
            continue
        start = record["start"] - prompt_len
        preds, conf = record["predictions"][0].tolist(), record["confidence"][0].tolist()
        row: list[tuple[int, float, str] | None] = [None] * width
        for pos in range(min(committed, width)):
            row[pos] = (final[pos], 1.0, "committed")
        for j, (token, c) in enumerate(zip(preds, conf, strict=True)):
            pos = start + j
            if pos >= width:
                break
            if j < record["accepted"]:
                status = "accepted"
            else:
                status = "final" if token == final[pos] else "wrong"
            row[pos] = (token, c, status)
        committed = start + record["accepted"]
        cells.append(row)
    labels = {t: _label(tokenizer, t) for row in cells for cell in row if cell for t in [cell[0]]}
    return {"prompt": prompt, "mode": mode, "final": final, "cells": cells, "labels": labels}


def _label(tokenizer, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    text = text.replace("\n", "⏎").replace(" ", "·")
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "∅"


def draw_png(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = grid["cells"]
    rows, cols = len(cells), len(grid["final"])
    image = torch.ones(rows, cols, 3)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is not None:
                token, confidence, status = cell
                alpha = 0.25 + 0.75 * confidence  # pale = unsure
                image[r, c] = torch.tensor([1 - alpha * (1 - x) for x in COLOURS[status]])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * cols + 1), max(3, 0.35 * rows + 1.5)))
    ax.imshow(image.numpy(), aspect="auto", interpolation="nearest")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is not None:
                ax.text(c, r, grid["labels"][cell[0]][:5], ha="center", va="center", fontsize=6)
    ax.set_xlabel("generated position")
    ax.set_ylabel("iteration (forward pass)")
    ax.set_title(f"DDGviz, mode={grid['mode']}: {rows} passes for {cols} tokens", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render_html(grid: dict) -> str:
    """A standalone page: one table row per pass, cells shaded by confidence, token + probability on hover."""
    cells, labels = grid["cells"], grid["labels"]
    lines = []
    for r, row in enumerate(cells):
        tds = [f"<th>{r + 1}</th>"]
        for cell in row:
            if cell is None:
                tds.append("<td></td>")
                continue
            token, confidence, status = cell
            red, green, blue = (int(255 * x) for x in COLOURS[status])
            alpha = 0.25 + 0.75 * confidence
            label = html.escape(labels[token])
            tds.append(
                f'<td style="background:rgba({red},{green},{blue},{alpha:.2f})" '
                f'title="{label} (id {token}), p={confidence:.3f}, {status}">{label}</td>'
            )
        lines.append("<tr>" + "".join(tds) + "</tr>")
    legend = " ".join(
        f'<span style="background:rgb({int(255 * c[0])},{int(255 * c[1])},{int(255 * c[2])});color:white;'
        f'padding:2px 6px">{name}</span>'
        for name, c in COLOURS.items()
    )
    header = "<tr><th>pass</th>" + "".join(f"<th>{i}</th>" for i in range(len(grid["final"]))) + "</tr>"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>DDGviz</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse;font-family:monospace;font-size:12px}}
td,th{{border:1px solid #ddd;padding:2px 4px;text-align:center;white-space:pre}}</style></head>
<body><h2>DDGviz: Jacobi decoding, mode={html.escape(grid["mode"])}</h2>
<p>Prompt: <code>{html.escape(grid["prompt"])}</code><br>{len(cells)} forward passes for {len(grid["final"])} tokens.
Shading: the model's probability of the token (pale = unsure). Hover a cell for details.</p>
<p>{legend}</p>
<table>{header}{"".join(lines)}</table></body></html>
"""
