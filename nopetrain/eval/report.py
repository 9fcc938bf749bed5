"""The evaluation's outputs: results.csv (the long-format rows), results.md (tables), PNG plots, and a W&B run.

Every file is written under a temporary name and renamed, so an interrupted report leaves whole files only.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from nopetrain.data_pipelines.atomic import write_bytes

COLUMNS = (
    "model",
    "method",
    "context_factor",
    "context_len",
    "metric",
    "task",
    "depth",
    "position",
    "value",
    "n",
    "tokens",
    "source",
    "boundary",
)
# The metric of the row that carries a model's fitted logit-scale coefficient c (no length: one per model).
FIT_METRIC = "logit_scale_c"


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _series(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model, method) pairs in the order they first appear."""
    return list(dict.fromkeys((row["model"], row["method"]) for row in rows))


def _factors(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({row["context_factor"] for row in rows})


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _perplexity_support(rows: list[dict[str, Any]]) -> list[str]:
    """Per model, the documents and tokens behind its perplexity cells (the same for every method)."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        cells = {r["context_factor"]: (r["n"], r["tokens"]) for r in rows if r["model"] == model}
        counts = {n for n, _ in cells.values()}
        documents = f"{counts.pop()} documents at every length" if len(counts) == 1 else "documents per length vary"
        tokens = " / ".join(f"{tokens} ({factor}x)" for factor, (_, tokens) in sorted(cells.items()))
        lines.append(f"- {model}: {documents}; tokens {tokens}")
    return lines


def _fit_table(rows: list[dict[str, Any]]) -> list[str]:
    """The fitted logit scale of each model, what it was fitted on, and whether it is at an end of the interval."""
    body = [
        [
            row["model"],
            f"{row['value']:.4f}",
            f"{row['source']}: {row['n']} documents, {row['tokens']} tokens",
            f"at the {row['boundary']} end of the interval (the best c may lie beyond)"
            if row["boundary"]
            else "inside the interval",
        ]
        for row in rows
    ]
    return _table(["model", "c", "fitted on (held out, not scored above)", "optimum"], body)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Perplexity by length (with the documents and tokens behind it), per NIAH task the success rate (%) by
    length, one line per model and method, and the fitted logit scales."""
    fits = [row for row in rows if row["metric"] == FIT_METRIC]
    rows = [row for row in rows if row["metric"] != FIT_METRIC]
    factors = _factors(rows)
    lengths = {row["context_factor"]: row["context_len"] for row in rows}
    cell: dict[tuple, float] = {}
    for row in rows:
        if row["metric"] == "ppl" or (row["metric"] == "niah" and row.get("depth") is None):
            cell[(row["model"], row["method"], row["metric"], row.get("task"), row["context_factor"])] = row["value"]
    header = ["model", "method", *(f"{f}x ({lengths[f]})" for f in factors)]
    out = ["# Long-context evaluation", ""]
    sections = [("ppl", None, "Perplexity", "{:.3f}", 1.0)]
    tasks = list(dict.fromkeys(row["task"] for row in rows if row["metric"] == "niah"))
    sections += [("niah", task, f"NIAH {task} (success %)", "{:.1f}", 100.0) for task in tasks]
    for metric, task, title, fmt, scale in sections:
        body = []
        for model, method in _series(rows):
            values = [cell.get((model, method, metric, task, f)) for f in factors]
            if any(v is not None for v in values):
                body.append([model, method, *("-" if v is None else fmt.format(v * scale) for v in values)])
        if body:
            out += [f"## {title}", "", *_table(header, body), ""]
            if metric == "ppl":
                out += [*_perplexity_support([row for row in rows if row["metric"] == "ppl"]), ""]
    if fits:
        out += ["## Logit scale", "", *_fit_table(fits), ""]
    return "\n".join(out)


def _length_axis(axis: Any, lengths: list[int]) -> None:
    """A log2 x axis labelled with the evaluated lengths themselves."""
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.minorticks_off()
    axis.set_xlabel("context length (tokens)")


def _png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """ppl_vs_length.png, ppl_by_position.png (at the longest length), niah_by_length.png (a panel per task) and
    niah_by_depth.png (standard task, success by depth and length, a panel per model and method)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    rows = [row for row in rows if row["metric"] != FIT_METRIC]
    series = _series(rows)
    ppl = [row for row in rows if row["metric"] == "ppl"]
    if ppl:
        figure, axes = plt.subplots(figsize=(6, 4))
        for model, method in series:
            points = sorted((r["context_len"], r["value"]) for r in ppl if (r["model"], r["method"]) == (model, method))
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=f"{model} / {method}")
        _length_axis(axes, sorted({r["context_len"] for r in ppl}))
        axes.set_ylabel("perplexity")
        axes.legend(fontsize=7)
        _png(figure, out_dir / "ppl_vs_length.png")
        written.append(out_dir / "ppl_vs_length.png")
        plt.close(figure)
    buckets = [row for row in rows if row["metric"] == "ppl_bucket"]
    if buckets:
        longest = max(row["context_factor"] for row in buckets)
        figure, axes = plt.subplots(figsize=(6, 4))
        for model, method in series:
            points = sorted(
                (r["position"], r["value"])
                for r in buckets
                if (r["model"], r["method"], r["context_factor"]) == (model, method, longest)
            )
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=f"{model} / {method}")
        axes.set(xlabel=f"position (bucket start) at {longest}x", ylabel="perplexity")
        axes.legend(fontsize=7)
        _png(figure, out_dir / "ppl_by_position.png")
        written.append(out_dir / "ppl_by_position.png")
        plt.close(figure)
    niah = [row for row in rows if row["metric"] == "niah" and row.get("depth") is None]
    tasks = list(dict.fromkeys(row["task"] for row in niah))
    if tasks:
        figure, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
        for axis, task in zip(axes[0], tasks, strict=True):
            for model, method in series:
                points = sorted(
                    (r["context_len"], 100 * r["value"])
                    for r in niah
                    if (r["model"], r["method"], r["task"]) == (model, method, task)
                )
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", label=f"{model} / {method}")
            _length_axis(axis, sorted({r["context_len"] for r in niah}))
            axis.set(ylim=(-5, 105), title=task, ylabel="success %")
        axes[0][0].legend(fontsize=7)
        _png(figure, out_dir / "niah_by_length.png")
        written.append(out_dir / "niah_by_length.png")
        plt.close(figure)
    by_depth = [row for row in rows if row["metric"] == "niah" and row.get("depth") is not None]
    if by_depth:
        panels = [s for s in series if any((r["model"], r["method"]) == s for r in by_depth)]
        depths = sorted({row["depth"] for row in by_depth})
        factors = _factors(by_depth)
        figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        for axis, (model, method) in zip(axes[0], panels, strict=True):
            grid = [[float("nan")] * len(factors) for _ in depths]
            for r in by_depth:
                if (r["model"], r["method"]) == (model, method):
                    grid[depths.index(r["depth"])][factors.index(r["context_factor"])] = 100 * r["value"]
            image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            axis.set_xticks(range(len(factors)), [f"{f}x" for f in factors])
            axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            axis.set(title=f"{model} / {method}", xlabel="context")
        axes[0][0].set_ylabel("needle depth")
        figure.colorbar(image, ax=axes[0].tolist(), label="standard NIAH success %")
        _png(figure, out_dir / "niah_by_depth.png")
        written.append(out_dir / "niah_by_depth.png")
        plt.close(figure)
    return written


def log_wandb(rows: list[dict[str, Any]], images: list[Path], out_dir: Path, wandb_cfg: Any) -> None:
    """The rows as a table, the plots as images and each ppl / NIAH mean as a summary value."""
    import wandb

    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        name=wandb_cfg.name,
        mode=wandb_cfg.mode,
        dir=str(out_dir),
        job_type="eval",
    )
    table = wandb.Table(columns=list(COLUMNS), data=[[row.get(c) for c in COLUMNS] for row in rows])
    run.log({"eval/results": table, **{f"eval/{path.stem}": wandb.Image(str(path)) for path in images}})
    for row in rows:
        if row["metric"] == "ppl" or (row["metric"] == "niah" and row.get("depth") is None):
            key = "/".join(str(p) for p in (row["model"], row["method"], row["metric"], row.get("task")) if p)
            run.summary[f"eval/{key}/{row['context_factor']}x"] = row["value"]
    run.finish()


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, wandb_cfg: Any = None) -> dict[str, Path]:
    """Writes results.csv, results.md and the plots into `out_dir` (created if needed); logs them to W&B when
    `wandb_cfg` (an EvalWandbConfig) is given and not disabled. Returns the files written by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / "results.csv", _csv(rows).encode())
    write_bytes(out_dir / "results.md", markdown(rows).encode())
    images = plots(rows, out_dir)
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        log_wandb(rows, images, out_dir, wandb_cfg)
    files = [out_dir / "results.csv", out_dir / "results.md", *images]
    return {path.name: path for path in files}
