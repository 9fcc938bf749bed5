"""The evaluation's outputs: results.csv (the long-format rows), trials.csv (every NIAH trial's score), results.md
(tables with 95% intervals, the gate on retrieval in context, paired tests), PNG plots, and a W&B run.

Every file is written under a temporary name and renamed, so an interrupted report leaves whole files only.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from nopetrain.atomic import write_bytes
from nopetrain.eval.config import GateConfig, PairedConfig, ReportConfig, split_series
from nopetrain.eval.stats import mcnemar, wilson

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
    "ci_low",
    "ci_high",
    "interval",
    "n",
    "successes",
    "tokens",
    "scoring",
    "source",
    "boundary",
)
# The metric of the row that carries a model's fitted logit-scale coefficient c (no length: one per model).
FIT_METRIC = "logit_scale_c"
# The metric of one NIAH trial's score; these rows go to trials.csv, not results.csv.
TRIAL_METRIC = "niah_trial"
TRIAL_COLUMNS = (
    "model",
    "method",
    "context_factor",
    "context_len",
    "task",
    "trial",
    "depth",
    "prompt_sha256",
    "needle_span",
    "scoring",
    "value",
)
SCORING = {"greedy": "greedy decoding", "teacher_forced": "teacher-forced exact match of the answer tokens"}
INTERVALS = {"wilson": "95% Wilson interval", "bootstrap": "95% bootstrap interval over trials"}


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
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


def _with_interval(row: dict[str, Any], fmt: str, scale: float) -> str:
    """ "value [low, high]" (scaled), or the value alone for a row without an interval."""
    value = fmt.format(row["value"] * scale)
    if row.get("ci_low") is None:
        return value
    return f"{value} [{fmt.format(row['ci_low'] * scale)}, {fmt.format(row['ci_high'] * scale)}]"


def _niah_title(task: str, cells: list[dict[str, Any]]) -> str:
    """The section title of a NIAH task: how it was scored, the trials per cell, the interval."""
    details = ["success %"]
    details += [SCORING[mode] for mode in dict.fromkeys(row["scoring"] for row in cells if row.get("scoring"))]
    counts = sorted({row["n"] for row in cells})
    details.append(f"n={counts[0]} trials per cell" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]} trials")
    kinds = list(dict.fromkeys(row["interval"] for row in cells if row.get("interval")))
    if kinds:
        details.append(" or ".join(INTERVALS[kind] for kind in kinds))
    return f"NIAH {task} ({', '.join(details)})"


def _gate(cell: dict[tuple, dict[str, Any]], gate: GateConfig) -> list[str]:
    """Whether retrieval was learned in context: the gate's cell against its threshold, or that it is missing."""
    series = gate.model if gate.method == "none" else f"{gate.model}/{gate.method}"
    where = f"{series} {gate.task} NIAH at {gate.factor}x"
    threshold = f"{100 * gate.threshold:g}%"
    row = cell.get((gate.model, gate.method, "niah", gate.task, gate.factor))
    if row is None:
        return [
            f"**Gate not evaluated: no result for {where}.** Without it, the comparisons beyond the context below are "
            "not shown to carry information about length generalisation."
        ]
    interval = "" if row.get("ci_low") is None else f" [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
    figure = f"{where}: {100 * row['value']:.1f}%{interval} (n={row['n']})"
    if row["value"] < gate.threshold:
        return [
            f"**Underpowered: retrieval not learned in context.** {figure} < {threshold} gate; the comparisons "
            "beyond the context below carry no information about length generalisation."
        ]
    return [f"Gate passed: {figure} >= {threshold} gate."]


def _paired(trials: list[dict[str, Any]], pairs: list[PairedConfig]) -> list[str]:
    """Per pair, task and factor: both series' rates on the same prompts and McNemar's exact test of the trials
    only one of them got right (a trial is right with score 1)."""
    outcomes: dict[tuple, dict[int, tuple[float, str]]] = {}
    for row in trials:
        key = (row["model"], row["method"], row["task"], row["context_factor"])
        outcomes.setdefault(key, {})[row["trial"]] = (row["value"], row["prompt_sha256"])
    body = []
    for pair in pairs:
        for task in pair.tasks:
            for factor in pair.factors:
                a, b = (outcomes.get((*split_series(side), task, factor)) for side in (pair.a, pair.b))
                cells = [pair.a, pair.b, task, f"{factor}x"]
                if not a or not b:
                    missing = " and ".join(side for side, found in ((pair.a, a), (pair.b, b)) if not found)
                    body.append([*cells, "-", "-", "-", "-", "-", f"no trials for {missing}"])
                    continue
                if a.keys() != b.keys() or any(a[index][1] != b[index][1] for index in a):
                    body.append([*cells, "-", "-", "-", "-", "-", "not the same prompts"])
                    continue
                first = [a[index][0] == 1.0 for index in sorted(a)]
                second = [b[index][0] == 1.0 for index in sorted(a)]
                only_a, only_b, p = mcnemar(first, second)
                rates = [f"{100 * sum(right) / len(right):.1f}" for right in (first, second)]
                body.append([*cells, str(len(first)), *rates, str(only_a), str(only_b), f"{p:.3g}"])
    header = ["a", "b", "task", "factor", "n", "a right %", "b right %", "a only right", "b only right"]
    lines = _table([*header, "p (exact, two-sided)"], body)
    if any(row["value"] not in (0.0, 1.0) for row in trials):
        lines += ["", "Greedy decoding scores several values by the fraction found; here a trial is right with all."]
    return lines


def _by_span(trials: list[dict[str, Any]], task: str = "standard") -> list[str]:
    """`task`'s success by the span its look-up reaches over (needle_span: from the needle's first token to the
    answer's last) against the trained context (context_len / context_factor): within it, the needle, question and
    answer fit in one window of the training length; beyond it, they do not. Empty without spans."""
    spanned = [row for row in trials if row["task"] == task and row.get("needle_span") not in (None, "")]
    if not spanned:
        return []
    scores: dict[tuple, list[float]] = {}
    for row in spanned:
        beyond = int(row["needle_span"]) > row["context_len"] // row["context_factor"]
        scores.setdefault((row["model"], row["method"], row["context_factor"], beyond), []).append(row["value"])
    columns = sorted({(factor, beyond) for _, _, factor, beyond in scores})
    counts = {column: {len(found) for key, found in scores.items() if key[2:] == column} for column in columns}
    header = [
        f"{factor}x {'beyond' if beyond else 'within'} (n={'/'.join(map(str, sorted(counts[(factor, beyond)])))})"
        for factor, beyond in columns
    ]
    body = []
    for model, method in _series(spanned):
        cells = []
        for column in columns:
            found = scores.get((model, method, *column))
            if not found:
                cells.append("-")
                continue
            right = sum(score == 1.0 for score in found)
            low, high = wilson(right, len(found))
            cells.append(f"{100 * right / len(found):.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        body.append([model, method, *cells])
    trained = sorted({row["context_len"] // row["context_factor"] for row in spanned})
    return [
        f"## NIAH {task} by needle-to-answer span (success %, 95% Wilson interval)",
        "",
        f"Within: the needle, question and answer fit in {'/'.join(map(str, trained))} tokens, the trained context; "
        "beyond: the look-up reaches farther back than any training window.",
        "",
        *_table(["model", "method", *header], body),
        "",
    ]


def markdown(rows: list[dict[str, Any]], report: ReportConfig | None = None) -> str:
    """The gate's verdict first (report.gate), then perplexity by length (with its bootstrap interval and the
    documents and tokens behind it), per NIAH task the success rate (%) with its interval by length, one line per
    model and method, the standard task's success by needle-to-answer span (within or beyond the trained context),
    the paired comparisons (report.paired) and the fitted logit scales."""
    report = report or ReportConfig()
    fits = [row for row in rows if row["metric"] == FIT_METRIC]
    trials = [row for row in rows if row["metric"] == TRIAL_METRIC]
    rows = [row for row in rows if row["metric"] not in (FIT_METRIC, TRIAL_METRIC)]
    factors = _factors(rows)
    lengths = {row["context_factor"]: row["context_len"] for row in rows}
    cell: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row["metric"] == "ppl" or (row["metric"] == "niah" and row.get("depth") is None):
            cell[(row["model"], row["method"], row["metric"], row.get("task"), row["context_factor"])] = row
    header = ["model", "method", *(f"{f}x ({lengths[f]})" for f in factors)]
    out = ["# Long-context evaluation", ""]
    if report.gate.model is not None:
        out += [*_gate(cell, report.gate), ""]
    ppl = [row for row in rows if row["metric"] == "ppl"]
    bootstrapped = any(row.get("ci_low") is not None for row in ppl)
    title = "Perplexity (95% bootstrap interval over documents)" if bootstrapped else "Perplexity"
    sections = [("ppl", None, title, "{:.3f}", 1.0)]
    tasks = list(dict.fromkeys(row["task"] for row in rows if row["metric"] == "niah"))
    for task in tasks:
        cells = [row for key, row in cell.items() if key[2:4] == ("niah", task)]
        sections.append(("niah", task, _niah_title(task, cells), "{:.1f}", 100.0))
    for metric, task, title, fmt, scale in sections:
        body = []
        for model, method in _series(rows):
            found = [cell.get((model, method, metric, task, f)) for f in factors]
            if any(row is not None for row in found):
                body.append([model, method, *("-" if r is None else _with_interval(r, fmt, scale) for r in found)])
        if body:
            out += [f"## {title}", "", *_table(header, body), ""]
            if metric == "ppl":
                out += [*_perplexity_support(ppl), ""]
    out += _by_span(trials)
    if report.paired:
        out += ["## Paired comparison (McNemar, same prompts)", "", *_paired(trials, report.paired), ""]
    if fits:
        out += ["## Logit scale", "", *_fit_table(fits), ""]
    return "\n".join(out)


def _length_axis(axis: Any, lengths: list[int], train_context: int | None) -> None:
    """A log2 x axis labelled with the evaluated lengths themselves, the training context marked."""
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.minorticks_off()
    axis.set_xlabel("context length (tokens)")
    if train_context is not None:
        axis.axvline(train_context, color="0.5", linestyle=":", linewidth=1)
        axis.annotate("training context", (train_context, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                      textcoords="offset points", fontsize=7, color="0.4")  # fmt: skip


# Methods by line style and marker, models by colour: every (model, method) pair is told apart, and a method whose
# values equal another's (logit_scale at c = 0 and none) still shows both.
METHOD_STYLES = {
    "none": ("-", "o"),
    "pi": ("--", "s"),
    "ntk": ("-.", "^"),
    "yarn": (":", "D"),
    "logit_scale": ("--", "x"),
}
OTHER_STYLES = [("-", "v"), ("--", "P"), ("-.", "*"), (":", "h")]


def series_styles(series: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    from matplotlib import colormaps

    models = list(dict.fromkeys(model for model, _ in series))
    colours = colormaps["tab10"].colors
    others = [method for method in dict.fromkeys(m for _, m in series) if method not in METHOD_STYLES]
    styles = {**METHOD_STYLES, **{m: OTHER_STYLES[i % len(OTHER_STYLES)] for i, m in enumerate(others)}}
    return {
        (model, method): {
            "color": colours[models.index(model) % len(colours)],
            "linestyle": styles[method][0],
            "marker": styles[method][1],
            "label": f"{model} / {method}",
        }
        for model, method in series
    }


def _curve(axis: Any, rows: list[dict[str, Any]], x: str, scale: float, style: dict[str, Any]) -> None:
    """One series: its points and, where the rows carry one, its 95% interval as a band."""
    rows = sorted(rows, key=lambda row: row[x])
    xs = [row[x] for row in rows]
    axis.plot(xs, [scale * row["value"] for row in rows], markersize=4, linewidth=1.2, **style)
    if all(row.get("ci_low") not in (None, "") for row in rows):
        low, high = [scale * row["ci_low"] for row in rows], [scale * row["ci_high"] for row in rows]
        axis.fill_between(xs, low, high, color=style["color"], alpha=0.08, linewidth=0)


def _counts(rows: list[dict[str, Any]]) -> str:
    """n of the rows behind a plot, e.g. "24" or "8-24" when it varies."""
    counts = sorted({int(row["n"]) for row in rows if row.get("n") not in (None, "")})
    return "?" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """ppl_vs_length.png, ppl_by_position.png (at the longest length), niah_by_length.png (a panel per task) and
    niah_by_depth.png (standard task, success by depth and length, a panel per model and method). Each says what was
    measured and on how many documents or trials, marks the training context and keeps the legend off the data."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    rows = [row for row in rows if row["metric"] != FIT_METRIC]
    series = _series(rows)
    styles = series_styles(series)
    contexts = {row["context_len"] for row in rows if row.get("context_factor") == 1}
    train_context = min(contexts) if contexts else None

    def save(figure: Any, name: str) -> None:
        _png(figure, out_dir / name)
        written.append(out_dir / name)
        plt.close(figure)

    ppl = [row for row in rows if row["metric"] == "ppl"]
    if ppl:
        figure, axis = plt.subplots(figsize=(7, 4))
        for key in series:
            found = [r for r in ppl if (r["model"], r["method"]) == key]
            if found:
                _curve(axis, found, "context_len", 1.0, styles[key])
        _length_axis(axis, sorted({r["context_len"] for r in ppl}), train_context)
        axis.set(ylabel="perplexity", title=f"Held-out perplexity by length ({_counts(ppl)} documents per point)")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        save(figure, "ppl_vs_length.png")
    buckets = [row for row in rows if row["metric"] == "ppl_bucket"]
    if buckets:
        longest = max(row["context_factor"] for row in buckets)
        at_longest = [r for r in buckets if r["context_factor"] == longest]
        figure, axis = plt.subplots(figsize=(7, 4))
        for key in series:
            found = [r for r in at_longest if (r["model"], r["method"]) == key]
            if found:
                _curve(axis, found, "position", 1.0, styles[key])
        if train_context is not None:
            axis.axvline(train_context, color="0.5", linestyle=":", linewidth=1)
        axis.set(
            xlabel="position in the sequence (bucket start, tokens)",
            ylabel="perplexity",
            title=f"Perplexity by position at {longest}x ({_counts(at_longest)} documents; dotted: training context)",
        )
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        save(figure, "ppl_by_position.png")
    niah = [row for row in rows if row["metric"] == "niah" and row.get("depth") is None]
    tasks = list(dict.fromkeys(row["task"] for row in niah))
    if tasks:
        figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False, sharey=True)
        for axis, task in zip(axes[0], tasks, strict=True):
            cells = [r for r in niah if r["task"] == task]
            for key in series:
                found = [r for r in cells if (r["model"], r["method"]) == key]
                if found:
                    _curve(axis, found, "context_len", 100.0, styles[key])
            _length_axis(axis, sorted({r["context_len"] for r in cells}), train_context)
            scoring = next((SCORING[r["scoring"]] for r in cells if r.get("scoring")), "")
            axis.set(ylim=(-5, 105), title=f"NIAH {task}: {_counts(cells)} trials per point\n{scoring}")
            axis.title.set_fontsize(9)
        axes[0][0].set_ylabel("success % (band: 95% interval)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
        figure.tight_layout()
        save(figure, "niah_by_length.png")
    by_depth = [row for row in rows if row["metric"] == "niah" and row.get("depth") is not None]
    if by_depth:
        panels = [s for s in series if any((r["model"], r["method"]) == s for r in by_depth)]
        depths = sorted({row["depth"] for row in by_depth})
        factors = _factors(by_depth)
        columns = min(4, len(panels))
        grid_rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(
            grid_rows, columns, figsize=(3.3 * columns, 2.9 * grid_rows), squeeze=False, constrained_layout=True
        )
        for index, axis in enumerate(axes.flat):
            if index >= len(panels):
                axis.set_visible(False)
                continue
            model, method = panels[index]
            grid = [[float("nan")] * len(factors) for _ in depths]
            for r in by_depth:
                if (r["model"], r["method"]) == (model, method):
                    grid[depths.index(r["depth"])][factors.index(r["context_factor"])] = 100 * r["value"]
            image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            axis.set_xticks(range(len(factors)), [f"{f}x" for f in factors])
            axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            axis.set_title(f"{model} / {method}", fontsize=9)
            axis.set_xlabel("context (x training)", fontsize=8)
            if index % columns == 0:
                axis.set_ylabel("needle depth", fontsize=8)
        figure.suptitle(f"Standard NIAH success by needle depth ({_counts(by_depth)} trials per cell)", fontsize=10)
        figure.colorbar(image, ax=axes.ravel().tolist(), label="success %")
        save(figure, "niah_by_depth.png")
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


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    report: ReportConfig | None = None,
    wandb_cfg: Any = None,
) -> dict[str, Path]:
    """Writes results.csv, trials.csv (when there are NIAH trials), results.md (with `report`'s gate and paired
    tests) and the plots into `out_dir` (created if needed); logs them to W&B when `wandb_cfg` (an EvalWandbConfig)
    is given and not disabled. Returns the files written by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [row for row in rows if row["metric"] != TRIAL_METRIC]
    trials = [row for row in rows if row["metric"] == TRIAL_METRIC]
    files = [out_dir / "results.csv", out_dir / "results.md"]
    write_bytes(files[0], _csv(results, COLUMNS).encode())
    write_bytes(files[1], markdown(rows, report).encode())
    if trials:
        write_bytes(out_dir / "trials.csv", _csv(trials, TRIAL_COLUMNS).encode())
        files.append(out_dir / "trials.csv")
    images = plots(results, out_dir)
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        log_wandb(results, images, out_dir, wandb_cfg)
    return {path.name: path for path in [*files, *images]}
