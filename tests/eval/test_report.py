"""nopetrain/eval/report.py: the report's files, its gate and paired comparisons, its cells and plots."""

from __future__ import annotations

from nopetrain.eval.config import (
    GateConfig,
    PairedConfig,
    ReportConfig,
)
from nopetrain.eval.report import COLUMNS, TRIAL_COLUMNS, TRIAL_METRIC, markdown, series_styles, write_report
from nopetrain.eval.stats import mcnemar, wilson


def niah_row(model: str, method: str, factor: int, successes: int, n: int, **extra) -> dict:
    """A NIAH task's mean as evaluate writes it, with its Wilson interval."""
    low, high = wilson(successes, n)
    cell = {"model": model, "method": method, "context_factor": factor, "context_len": 64 * factor, "metric": "niah"}
    rate = {"value": successes / n, "ci_low": low, "ci_high": high, "interval": "wilson", "n": n}
    return {**cell, "task": "standard", **rate, "successes": successes, "scoring": "teacher_forced", **extra}


def trial_rows(
    model: str, method: str, factor: int, scores: list[float], prompts: str = "p", spans: list[int] | None = None
) -> list[dict]:
    common = {"model": model, "method": method, "context_factor": factor, "context_len": 64 * factor}
    rows = [
        {**common, "metric": TRIAL_METRIC, "task": "standard", "trial": i, "value": v, "prompt_sha256": f"{prompts}{i}"}
        for i, v in enumerate(scores)
    ]
    return rows if spans is None else [{**row, "needle_span": span} for row, span in zip(rows, spans, strict=True)]


def test_report_files(tmp_path):
    rows = [
        {"model": "a", "method": m, "context_factor": f, "context_len": 64 * f, "metric": "ppl", "value": v, "n": 2}
        | {"tokens": 128 * f, "ci_low": v - 1, "ci_high": v + 1, "interval": "bootstrap"}
        for m, f, v in [("none", 1, 10.0), ("none", 2, 20.0), ("yarn", 1, 10.0), ("yarn", 2, 14.0)]
    ]
    fit = {"model": "b", "method": "logit_scale", "context_factor": None, "metric": "logit_scale_c", "value": -0.25}
    rows.append(fit | {"n": 4, "tokens": 512, "source": "web", "boundary": "low"})
    rows += [
        niah_row("a", "none", f, k, 4) | ({"depth": d} if d is not None else {})
        for f, d, k in [(1, None, 2), (1, 0.0, 4), (1, 1.0, 0), (2, None, 1), (2, 0.0, 2), (2, 1.0, 0)]
    ]
    rows.append({**rows[0], "metric": "ppl_bucket", "position": 0})
    rows += trial_rows("a", "none", 1, [1.0, 0.0, 1.0, 0.0])
    files = write_report(rows, tmp_path / "report")
    assert sorted(files) == [
        "niah_by_depth.png",
        "niah_by_length.png",
        "ppl_by_position.png",
        "ppl_vs_length.png",
        "results.csv",
        "results.md",
        "trials.csv",
    ]
    for name in files:
        if name.endswith(".png"):
            assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files["results.md"].read_text()
    assert "## Perplexity (95% bootstrap interval over documents)" in table
    assert "| a | yarn | 10.000 [9.000, 11.000] | 14.000 [13.000, 15.000] |" in table
    # Each rate beside its Wilson interval (2 of 4: [15.0, 85.0]); the title says how trials were scored and how many.
    assert (
        "## NIAH standard (success %, teacher-forced exact match of the answer tokens, n=4 trials per cell, 95% "
        "Wilson interval)" in table
    )
    assert "| a | none | 50.0 [15.0, 85.0] | 25.0 [4.6, 69.9] |" in table
    assert "- a: 2 documents at every length; tokens 128 (1x) / 256 (2x)" in table
    assert "| b | -0.2500 | web: 4 documents, 512 tokens | at the low end of the interval" in table
    assert not table.startswith("# Long-context evaluation\n\n**")  # no gate configured
    results = files["results.csv"].read_text().splitlines()
    assert len(results) == len(rows) - 4 + 1 and "niah_trial" not in files["results.csv"].read_text()
    assert results[0] == ",".join(COLUMNS) and "ci_low,ci_high,interval,n,successes" in results[0]
    trials = files["trials.csv"].read_text().splitlines()
    assert trials[0] == ",".join(TRIAL_COLUMNS) and trials[1] == "a,none,1,64,standard,0,,p0,,,1.0"


def report_lines(rows: list[dict], **gate) -> list[str]:
    return markdown(rows, ReportConfig(gate=GateConfig(**gate))).splitlines()


def test_gate_says_whether_retrieval_was_learned_in_context():
    rows = [niah_row("rope", "none", 1, 135, 300), niah_row("rope", "none", 2, 3, 300)]
    below = report_lines(rows, model="rope")
    assert below[:3] == [
        "# Long-context evaluation",
        "",
        "**Underpowered: retrieval not learned in context.** rope standard NIAH at 1x: 45.0% [39.5, 50.7] (n=300) "
        "< 80% gate; the comparisons beyond the context below carry no information about length generalisation.",
    ]
    rows[0] = niah_row("rope", "none", 1, 276, 300)
    assert (
        report_lines(rows, model="rope")[2] == "Gate passed: rope standard NIAH at 1x: 92.0% [88.4, 94.6] (n=300) "
        ">= 80% gate."
    )
    # The gate's own threshold, method and factor; a cell that was not evaluated is said to be missing.
    at_2x = report_lines(rows, model="rope", factor=2, threshold=0.01)[2]
    assert at_2x.startswith("Gate passed: rope standard NIAH at 2x: 1.0% [")
    assert report_lines(rows, model="rope", threshold=0.95)[2].startswith("**Underpowered")
    assert report_lines(rows, model="rope", method="yarn")[2] == (
        "**Gate not evaluated: no result for rope/yarn standard NIAH at 1x.** Without it, the comparisons beyond the "
        "context below are not shown to carry information about length generalisation."
    )


def test_paired_comparison_is_mcnemar_on_the_same_prompts():
    a = [1.0] * 10 + [0.0] * 2 + [1.0] * 5 + [0.0] * 3
    b = [0.0] * 10 + [1.0] * 2 + [1.0] * 5 + [0.0] * 3
    rows = [niah_row("drope", "logit_scale", 2, 15, 20), niah_row("rope", "yarn", 2, 7, 20)]
    rows += trial_rows("drope", "logit_scale", 2, a) + trial_rows("rope", "yarn", 2, b)
    rows += trial_rows("drope", "logit_scale", 4, a) + trial_rows("rope", "yarn", 4, b, prompts="q")
    paired = [PairedConfig(a="drope/logit_scale", b="rope/yarn", tasks=["standard", "multi_key"], factors=[2, 4])]
    table = markdown(rows, ReportConfig(paired=paired))
    section = table[table.index("## Paired comparison (McNemar, same prompts)") :].splitlines()
    _, _, p = mcnemar([v == 1 for v in a], [v == 1 for v in b])
    assert section[2] == (
        "| a | b | task | factor | n | a right % | b right % | a only right | b only right | p (exact, two-sided) |"
    )
    assert section[4:8] == [
        f"| drope/logit_scale | rope/yarn | standard | 2x | 20 | 75.0 | 35.0 | 10 | 2 | {p:.3g} |",
        "| drope/logit_scale | rope/yarn | standard | 4x | - | - | - | - | - | not the same prompts |",
        "| drope/logit_scale | rope/yarn | multi_key | 2x | - | - | - | - | - | "
        "no trials for drope/logit_scale and rope/yarn |",
        "| drope/logit_scale | rope/yarn | multi_key | 4x | - | - | - | - | - | "
        "no trials for drope/logit_scale and rope/yarn |",
    ]
    assert "a trial is right with all" not in table
    # Greedy per-value recall: only a whole answer (score 1) is right, and the table says so.
    rows = trial_rows("drope", "logit_scale", 2, [1.0, 0.5, 0.75, 0.0]) + trial_rows("rope", "yarn", 2, [0.5] * 4)
    table = markdown(rows, ReportConfig(paired=paired[:1]))
    assert "| drope/logit_scale | rope/yarn | standard | 2x | 4 | 25.0 | 0.0 | 1 | 0 | 1 |" in table
    assert "a trial is right with all" in table


def test_standard_niah_is_split_by_needle_span_against_the_trained_context():
    """A trial is within when its needle-to-answer span fits the trained context (64 here), beyond when it does not;
    each cell is the rate of its trials with its Wilson interval, n in the column's header."""
    rows = [niah_row("a", "none", f, 1, 4) for f in (1, 2)]
    rows += trial_rows("a", "none", 1, [1.0, 1.0, 0.0, 1.0], spans=[64, 40, 20, 10])
    rows += trial_rows("a", "none", 2, [0.0, 1.0, 1.0, 0.0], spans=[128, 65, 64, 10])
    rows += trial_rows("b", "yarn", 2, [1.0, 1.0, 1.0, 1.0], spans=[128, 65, 64, 10])
    lines = report_lines(rows)
    header = "| model | method | 1x within (n=4) | 2x within (n=2) | 2x beyond (n=2) |"
    at = lines.index(header)
    assert lines[at - 4] == "## NIAH standard by needle-to-answer span (success %, 95% Wilson interval)"
    low, high = wilson(3, 4)
    assert (
        lines[at + 2]
        == f"| a | none | 75.0 [{100 * low:.1f}, {100 * high:.1f}] | 50.0 [9.5, 90.5] | 50.0 [9.5, 90.5] |"
    )
    assert lines[at + 3].startswith("| b | yarn | - | 100.0 [34.2, 100.0] | 100.0 [34.2, 100.0] |")
    assert "## NIAH standard by needle" not in "\n".join(report_lines(rows[:2]))  # no spans, no section


def test_every_plotted_series_has_its_own_colour_marker_and_line():
    # 12 series once shared 10 colours, and logit_scale at c = 0 hid none behind it.
    models = ["rope", "rope_nope4", "nope", "drope"]
    series = [(model, method) for model in models for method in ("none", "pi", "ntk", "yarn", "logit_scale")]
    styles = series_styles(series)
    looks = {(str(s["color"]), s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(series)
    assert styles[("nope", "none")]["marker"] != styles[("nope", "logit_scale")]["marker"]
