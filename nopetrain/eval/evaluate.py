"""One evaluation: every model x method x length, as long-format rows (see `evaluate`)."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nopetrain.config import ConfigError, ModelConfig
from nopetrain.data.shards import read_documents
from nopetrain.data_pipelines.encoders import Encoder, sha256_file
from nopetrain.data_pipelines.lookup_text import NeedleTask, needle_task
from nopetrain.eval import logit_scale, niah
from nopetrain.eval.config import EvalConfig, model_specs, split_series, validate
from nopetrain.eval.models import LoadedModel, apply_logit_scale, architecture, load_model
from nopetrain.eval.partial import Progress, Unit, UnitStore, fingerprint
from nopetrain.eval.perplexity import perplexity, same_documents
from nopetrain.eval.report import FIT_METRIC, TRIAL_METRIC
from nopetrain.eval.stats import bootstrap_mean, bootstrap_ppl, wilson
from nopetrain.rope import RopeScaling

log = logging.getLogger("nopetrain.eval")

Row = dict[str, Any]
# Tokens NIAH decoding may write beyond the length of the expected answer (a leading space, a separator).
ANSWER_SLACK = 2


def heldout_documents(paths: list[str], vocab_size: int, tokenizer_sha256: str) -> dict[str, list[np.ndarray]]:
    """The documents of each held-out source (path -> documents), checked to be tokenized with the model's
    tokenizer."""
    sources = {}
    for path in paths:
        found, tokenizer = read_documents(path, vocab_size)
        if tokenizer.get("sha256") not in (None, tokenizer_sha256):
            raise ConfigError(f"heldout source {path} was tokenized with {tokenizer.get('path')}, not the model's")
        sources[path] = found
    return sources


def split_heldout(
    sources: dict[str, list[np.ndarray]], fit_names: list[str]
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Per source, the documents the report scores (perplexity, NIAH haystacks) and those the logit scale is
    fitted on: a source whose folder name is in `fit_names` gives its documents 0, 2, 4, ... to the fit and
    1, 3, 5, ... to the report, so the two never share a text (whether or not a model needs a fit, so every
    model of a report is scored on the same documents)."""
    report, fit = {}, {}
    for path, documents in sources.items():
        if Path(path).name in fit_names:
            fit[path], report[path] = documents[0::2], documents[1::2]
        else:
            report[path] = documents
    return report, fit


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return torch.device(name)


def methods_for(model_config: ModelConfig, cfg: EvalConfig) -> list[str]:
    """`none`, plus the RoPE-scaling methods for models with RoPE layers, or `logit_scale` for all-NoPE ones."""
    methods = ["none"]
    if any(model_config.rope_layers()):
        methods += list(cfg.rope_scaling.methods)
    elif cfg.logit_scale.enabled and any(factor > 1 for factor in cfg.factors):
        methods.append("logit_scale")
    return methods


def fitted_scale(
    loaded: LoadedModel, fit_sources: dict[str, list[np.ndarray]], cfg: EvalConfig
) -> logit_scale.FittedScale | None:
    """The stored logit scale of the checkpoint, or a new fit (then stored) if there is none or refit is asked;
    None when no held-out document of the fit's sources is long enough to fit one."""
    stored = logit_scale.read(loaded.scale_file)
    if stored is not None and not cfg.logit_scale.refit and stored.train_context == loaded.train_context:
        return stored
    context, scale = loaded.train_context, cfg.logit_scale
    lengths = [factor * context for factor in sorted({f for f in cfg.factors if f > 1})]
    started = time.perf_counter()
    fitted = logit_scale.fit(
        loaded.model,
        fit_sources,
        lengths,
        scale.documents,
        context,
        scale.low,
        scale.high,
        scale.tolerance,
        cfg.perplexity.batch_size,
    )
    if fitted is None:
        log.warning(
            "%s: no document of the logit-scale sources %s is longer than %d tokens; no logit scale fitted",
            loaded.name,
            list(fit_sources),
            max(lengths),
        )
        return None
    logit_scale.write(loaded.scale_file, fitted)
    log.info(
        "%s: fitted logit scale %s in %.1fs (ppl %s -> %s); stored in %s",
        loaded.name,
        logit_scale.describe(fitted),
        time.perf_counter() - started,
        [round(p, 3) for p in fitted.ppl_unscaled],
        [round(p, 3) for p in fitted.ppl],
        loaded.scale_file,
    )
    return fitted


def fit_row(fitted: logit_scale.FittedScale) -> Row:
    """The fitted c as a report row, with the documents and tokens behind it and any boundary hit."""
    return {
        "method": "logit_scale",
        "metric": FIT_METRIC,
        "value": fitted.coef,
        "n": sum(d["documents"] for d in fitted.documents),
        "tokens": sum(d["tokens"] for d in fitted.documents),
        "source": "+".join(Path(d["source"]).name for d in fitted.documents),
        "boundary": fitted.boundary or "",
    }


def configure(loaded: LoadedModel, method: str, factor: int, cfg: EvalConfig, coef: float) -> None:
    """Sets the model up for `method` at `factor` x the training context."""
    model, scaling = loaded.model, cfg.rope_scaling
    model.rope_scaling = None
    apply_logit_scale(model.config, coef if method == "logit_scale" else 0.0, loaded.train_context)
    if method not in ("none", "logit_scale"):
        model.rope_scaling = RopeScaling(
            method,
            loaded.train_context,
            float(factor),
            scaling.yarn_alpha,
            scaling.yarn_beta,
            scaling.yarn_temperature_coef,
            scaling.yarn_ramp,
        )


def scored_documents(loaded: LoadedModel, documents: list[np.ndarray], cfg: EvalConfig) -> dict[int, list[np.ndarray]]:
    """Per length, the documents perplexity scores there: the same ones at every length (long enough for the
    largest factor, cut to each length)."""
    lengths = [factor * loaded.train_context for factor in cfg.factors]
    found = same_documents(documents, lengths, cfg.perplexity.documents)
    count = len(found[max(lengths)])
    if count < cfg.perplexity.documents:
        log.warning(
            "%s: perplexity: only %d of the %d documents asked for (perplexity.documents) are longer than %d tokens, "
            "which factor %d needs; every length uses these %d",
            loaded.name,
            count,
            cfg.perplexity.documents,
            max(lengths),
            max(cfg.factors),
            count,
        )
    return found


def perplexity_rows(loaded: LoadedModel, documents: list[np.ndarray], cfg: EvalConfig) -> list[Row]:
    """Perplexity overall (with a 95% bootstrap interval over documents) and per position bucket of `documents`
    (each L + 1 tokens), with documents and tokens."""
    if not documents:
        return []
    bucket = cfg.perplexity.bucket or loaded.train_context
    result = perplexity(loaded.model, documents, bucket, cfg.perplexity.batch_size)
    low, high = bootstrap_ppl(result.document_nll, seed=cfg.seed)
    interval = {"ci_low": low, "ci_high": high, "interval": "bootstrap"}
    rows = [{"metric": "ppl", "value": result.ppl, **interval, "n": result.documents, "tokens": result.tokens}]
    rows += [
        {
            "metric": "ppl_bucket",
            "position": first,
            "value": value,
            "n": result.documents,
            "tokens": result.documents * min(bucket, result.length - first),
        }
        for first, value in result.buckets
    ]
    return rows


@dataclass
class Trial:
    # The standard task's needle depth; None for the other tasks, whose needles go to random depths.
    depth: float | None
    text: NeedleTask
    # int32: a trial cache holds every (task, length)'s prompts for the whole evaluation.
    prompt: np.ndarray
    # The answer's ids after the question, as a training look-up document has them (teacher forcing scores these).
    answer: list[int]
    # Names the prompt in trials.csv, so that "the same prompts for every arm" can be checked there.
    prompt_sha256: str
    # Tokens from the first of the farthest asked needle to the answer's last: the span the look-up reaches over,
    # within the trained context or beyond it (the report splits the standard task's success by it).
    needle_span: int


def niah_trials(
    tokenizer: Encoder, haystacks: list[np.ndarray], task: str, length: int, cfg: EvalConfig
) -> list[Trial]:
    """Every trial of `task` at `length` tokens, its haystack from the held-out prose `haystacks`; the same seed
    gives the same trials. The prompt and its answer together take `length` tokens: the answer is read at positions
    below `length`, so at 1x no position lies beyond the training context. Raises ValueError when a prompt cannot be
    built, or when it does not end with the question's ids as the answer's ids assume."""
    trials = []
    for index in range(cfg.niah.trials):
        rng = random.Random(f"{cfg.seed}/{task}/{length}/{index}")
        text = needle_task(rng, task, cfg.niah.needles, cfg.niah.value_digits)
        answer = niah.answer_ids(tokenizer.encode, text.question, text.answer_text)
        haystack = niah.haystack_for(haystacks, rng, length, tokenizer.decode)
        # The standard task's trials go round the depths; the others place their needles at random.
        depth = cfg.niah.depths[index % len(cfg.niah.depths)] if task == "standard" else None
        depths = [depth] if depth is not None else [rng.random() for _ in text.needles]
        prompt_length = length - len(answer)
        ids = niah.build_prompt(text, haystack, depths, prompt_length, tokenizer.encode)
        if not niah.ends_like_question(ids, text.question, tokenizer.encode, tokenizer.decode):
            raise ValueError("the prompt's last tokens are not the question's as it encodes alone")
        first = min(niah.needle_start(ids, text.needles[i], tokenizer.decode) for i in text.asked)
        prompt = np.asarray(ids, dtype=np.int32)
        sha256 = hashlib.sha256(prompt.tobytes()).hexdigest()[:16]
        trials.append(Trial(depth, text, prompt, answer, sha256, length - first))
    return trials


class SharedTrials:
    """The NIAH trials of each (task, length), built once per tokenizer and then scored by every model and method
    with that tokenizer: all arms answer the same prompts (and the haystacks are encoded once)."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        # (tokenizer sha256, task, length) -> trials; None where the prompts cannot be built (logged once).
        self.built: dict[tuple[str, str, int], list[Trial] | None] = {}

    def get(
        self, tokenizer: Encoder, tokenizer_sha256: str, haystacks: list[np.ndarray], task: str, length: int
    ) -> list[Trial] | None:
        key = (tokenizer_sha256, task, length)
        if key not in self.built:
            started = time.perf_counter()
            try:
                self.built[key] = niah_trials(tokenizer, haystacks, task, length, self.cfg)
            except ValueError as err:
                log.warning("NIAH %s at %d tokens skipped: %s", task, length, err)
                self.built[key] = None
            else:
                log.info(
                    "NIAH %s at %d tokens: %d trials built in %.1fs, shared by every model and method",
                    task,
                    length,
                    self.cfg.niah.trials,
                    time.perf_counter() - started,
                )
        return self.built[key]


def niah_scores(loaded: LoadedModel, trials: list[Trial], cfg: EvalConfig) -> list[float]:
    """Each trial's score, by greedy decoding or teacher forcing (niah.scoring), in batches of niah.batch_size."""
    if cfg.niah.scoring == "teacher_forced":
        prompts = [trial.prompt.tolist() for trial in trials]
        return niah.teacher_forced_scores(loaded.model, prompts, [t.answer for t in trials], cfg.niah.batch_size)
    decode = loaded.tokenizer.decode
    scores = []
    for start in range(0, len(trials), cfg.niah.batch_size):
        batch = trials[start : start + cfg.niah.batch_size]

        def finished(row: int, output: list[int], batch: list[Trial] = batch) -> bool:
            return niah.answered(decode(output), batch[row].text.answers)

        # A longer output cannot be an exact answer, and decoding without a KV cache is the cost of NIAH.
        budget = min(cfg.niah.max_new_tokens, max(len(trial.answer) for trial in batch) + ANSWER_SLACK)
        prompts = [trial.prompt.tolist() for trial in batch]
        outputs = niah.generate_greedy(loaded.model, prompts, budget, loaded.eos_id, finished)
        scores += [niah.score(decode(output), t.text.answers) for t, output in zip(batch, outputs, strict=True)]
    return scores


def rate(scores: list[float], seed: int) -> Row:
    """A success rate with its trials, the trials scored 1 and its 95% interval: Wilson's when every score is 0 or
    1, else a percentile bootstrap over trials of the mean (greedy per-value recall of several values)."""
    successes = sum(score == 1.0 for score in scores)
    binary = all(score in (0.0, 1.0) for score in scores)
    low, high = wilson(successes, len(scores)) if binary else bootstrap_mean(scores, seed=seed)
    return {
        "value": float(np.mean(scores)),
        "ci_low": low,
        "ci_high": high,
        "interval": "wilson" if binary else "bootstrap",
        "n": len(scores),
        "successes": successes,
    }


def niah_rows(
    loaded: LoadedModel,
    trials_for: Callable[[str, int], list[Trial] | None],
    length: int,
    cfg: EvalConfig,
) -> list[Row]:
    """Per task its success rate, for the standard task also per depth, and every trial's score (TRIAL_METRIC
    rows); `trials_for(task, length)` gives the shared trials."""
    rows = []
    for task in cfg.niah.tasks:
        trials = trials_for(task, length)
        if trials is None:
            continue
        scores = niah_scores(loaded, trials, cfg)
        common = {"metric": "niah", "task": task, "scoring": cfg.niah.scoring}
        rows.append({**common, **rate(scores, cfg.seed)})
        if task == "standard":
            for depth in dict.fromkeys(trial.depth for trial in trials):
                at_depth = [score for score, trial in zip(scores, trials, strict=True) if trial.depth == depth]
                rows.append({**common, "depth": depth, **rate(at_depth, cfg.seed)})
        for index, (trial, score) in enumerate(zip(trials, scores, strict=True)):
            trial_row = {"metric": TRIAL_METRIC, "trial": index, "depth": trial.depth, "value": score}
            rows.append({**common, **trial_row, "prompt_sha256": trial.prompt_sha256, "needle_span": trial.needle_span})
    return rows


def check_report_methods(name: str, methods: list[str], cfg: EvalConfig) -> None:
    """The report's gate and paired series that name model `name` use a method it is evaluated with (known only
    once it is loaded: RoPE layers or not, a logit scale fitted or not)."""
    gate = cfg.report.gate
    cells = [] if gate.model is None else [("report.gate", gate.model, gate.method)]
    for index, pair in enumerate(cfg.report.paired):
        cells += [(f"report.paired[{index}].{side}", *split_series(getattr(pair, side))) for side in ("a", "b")]
    for key, model, method in cells:
        if model == name and method not in methods:
            raise ConfigError(f"{key} names {model}/{method}, but {model} is evaluated with methods {methods}")


def unit_rows(
    loaded: LoadedModel,
    unit: Unit,
    documents: list[np.ndarray],
    trials_for: Callable[[str, int], list[Trial] | None],
    cfg: EvalConfig,
) -> list[Row]:
    """The rows of one unit: perplexity of `documents` (cut to the unit's length) and NIAH, the model already
    configured for the unit's method and length."""
    length = unit.factor * loaded.train_context
    found = []
    if cfg.perplexity.enabled:
        found += perplexity_rows(loaded, documents, cfg)
    if cfg.niah.enabled:
        found += niah_rows(loaded, trials_for, length, cfg)
    common = {"model": loaded.name, "method": unit.method, "context_factor": unit.factor, "context_len": length}
    return [{**common, **row} for row in found]


def evaluate_model(
    loaded: LoadedModel,
    documents: list[np.ndarray],
    trials_for: Callable[[str, int], list[Trial] | None],
    fit_sources: dict[str, list[np.ndarray]],
    cfg: EvalConfig,
    store: UnitStore,
    progress: Progress,
) -> list[Row]:
    """Rows for one loaded model: the fitted logit scale if it has one, then every method at every length (NIAH's
    trials from `trials_for(task, length)`), each unit loaded from `store` when it finished before with the same
    fingerprint, else computed and written there."""
    methods = methods_for(loaded.model.config, cfg)
    fitted = fitted_scale(loaded, fit_sources, cfg) if "logit_scale" in methods else None
    if fitted is None and "logit_scale" in methods:
        methods.remove("logit_scale")
        progress.drop([Unit(loaded.name, "logit_scale", factor) for factor in cfg.factors])
    check_report_methods(loaded.name, methods, cfg)
    coef = fitted.coef if fitted is not None else 0.0
    rows = [] if fitted is None else [{"model": loaded.name, "context_factor": None, **fit_row(fitted)}]
    units = [Unit(loaded.name, method, factor) for method in methods for factor in cfg.factors]
    fingerprints = {
        unit: fingerprint(cfg, loaded.identity, coef if unit.method == "logit_scale" else None) for unit in units
    }
    stored = {unit: store.read(unit) for unit in units}
    finished = {unit: found[1] for unit, found in stored.items() if found and found[0] == fingerprints[unit]}
    stale = sum(found is not None for unit, found in stored.items() if unit not in finished)
    if finished or stale:
        log.info(
            "%s: %d of %d units reused from %s%s",
            loaded.name,
            len(finished),
            len(units),
            store.folder,
            f"; {stale} there were computed with another config or checkpoint and are computed again" if stale else "",
        )
    scored = scored_documents(loaded, documents, cfg) if cfg.perplexity.enabled else {}
    for unit in units:
        if unit in finished:
            rows += finished[unit]
            progress.reused(unit)
            continue
        configure(loaded, unit.method, unit.factor, cfg, coef)
        started = time.perf_counter()
        found = unit_rows(loaded, unit, scored.get(unit.factor * loaded.train_context, []), trials_for, cfg)
        store.write(unit, fingerprints[unit], loaded.identity, found)
        rows += found
        seconds = time.perf_counter() - started
        summary = ", ".join(
            f"{row['metric']}{'/' + row['task'] if row.get('task') else ''}={row['value']:.4g}"
            for row in found
            if row["metric"] in ("ppl", "niah") and row.get("depth") is None
        )
        log.info(
            "%s %s %dx (%d tokens): %s [%.1fs]; %s",
            *unit,
            unit.factor * loaded.train_context,
            summary,
            seconds,
            progress.computed(unit, seconds),
        )
    return rows


def work_units(specs: dict[str, str], cfg: EvalConfig) -> list[Unit]:
    """Every unit the config asks for, each model's methods from its architecture, read without its weights."""
    return [
        Unit(name, method, factor)
        for name, spec in specs.items()
        for method in methods_for(architecture(spec), cfg)
        for factor in cfg.factors
    ]


def evaluate(cfg: EvalConfig) -> list[Row]:
    """Evaluates every model the config names; returns long-format rows: model, method, context_factor,
    context_len, metric (ppl, ppl_bucket, niah, logit_scale_c, and TRIAL_METRIC: one NIAH trial's score), value,
    ci_low and ci_high (95%; interval says how: Wilson, or a bootstrap over documents or trials), n (documents or
    trials), successes (NIAH trials scored 1), tokens (ppl and the fit), scoring (NIAH: greedy or teacher_forced),
    and where they apply position (first position of a ppl bucket), task and depth (NIAH; rows without depth are the
    task's mean), trial and prompt_sha256 (a trial's index and prompt, the same for every model and method with the
    same tokenizer) and needle_span (tokens from its farthest asked needle to its answer's end), source and boundary
    (the fit: its held-out sources and "low"/"high" for an optimum at an end of the search interval). Each model x
    method x factor unit is kept in OUT/partial/ as it finishes and reused by a later evaluation of the same config
    and checkpoints (see nopetrain/eval/partial.py)."""
    validate(cfg)
    device = device_for(cfg.device)
    specs = model_specs(cfg)
    progress = Progress(work_units(specs, cfg))
    store = UnitStore(cfg.out)
    shared = SharedTrials(cfg)
    rows = []
    for name, spec in specs.items():
        loaded = load_model(name, spec, cfg.train_context, device)
        tokenizer_sha256 = sha256_file(loaded.tokenizer_path)
        sources = heldout_documents(cfg.heldout, loaded.model.config.vocab_size, tokenizer_sha256)
        report, fit_sources = split_heldout(sources, cfg.logit_scale.sources if cfg.logit_scale.enabled else [])
        documents = [document for found in report.values() for document in found]
        haystacks = [d for path, found in report.items() if Path(path).name in cfg.niah.haystack for d in found]
        trials_for = functools.partial(shared.get, loaded.tokenizer, tokenizer_sha256, haystacks)
        rows += evaluate_model(loaded, documents, trials_for, fit_sources, cfg, store, progress)
    return rows
