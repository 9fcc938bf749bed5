"""One evaluation: every model x method x length, as long-format rows (see `evaluate`)."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nopetrain.config import ConfigError
from nopetrain.data.streaming import read_documents
from nopetrain.data_pipelines.encoders import sha256_file
from nopetrain.eval import logit_scale, niah
from nopetrain.eval.config import EvalConfig, validate
from nopetrain.eval.models import LoadedModel, apply_logit_scale, load_model
from nopetrain.eval.perplexity import perplexity, same_documents
from nopetrain.eval.report import FIT_METRIC
from nopetrain.eval.rope_scaling import RopeScaling

log = logging.getLogger("nopetrain.eval")

Row = dict[str, Any]
# Tokens NIAH decoding may write beyond the length of the expected answer (a leading space, a separator).
ANSWER_SLACK = 2
# A NIAH trial: the standard task's needle depth (None for the other tasks), the task's text, the prompt.
Trial = tuple[float | None, niah.NeedleTask, list[int]]


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


def model_specs(cfg: EvalConfig) -> dict[str, str]:
    if cfg.models:
        return dict(cfg.models)
    spec = cfg.checkpoint.rstrip("/")
    return {spec.removeprefix("hf:").rsplit("/", 1)[-1]: spec}


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return torch.device(name)


def methods_for(loaded: LoadedModel, cfg: EvalConfig) -> list[str]:
    """`none`, plus the RoPE-scaling methods for models with RoPE layers, or `logit_scale` for all-NoPE ones."""
    methods = ["none"]
    if loaded.any_rope:
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
    """Perplexity overall and per position bucket of `documents` (each L + 1 tokens), with documents and tokens."""
    if not documents:
        return []
    bucket = cfg.perplexity.bucket or loaded.train_context
    result = perplexity(loaded.model, documents, bucket, cfg.perplexity.batch_size)
    rows = [{"metric": "ppl", "value": result.ppl, "n": result.documents, "tokens": result.tokens}]
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


def niah_trials(
    loaded: LoadedModel, haystacks: list[np.ndarray], task: str, length: int, cfg: EvalConfig
) -> list[Trial]:
    """(depth for the standard task, task text, prompt) of every trial, its haystack from the held-out prose
    `haystacks`; the same seed gives the same trials. Raises ValueError when the prompt cannot be built."""
    trials = []
    for trial in range(cfg.niah.trials):
        rng = random.Random(f"{cfg.seed}/{task}/{length}/{trial}")
        text = niah.needle_task(rng, task, cfg.niah.needles)
        haystack = niah.haystack_for(haystacks, rng, length, loaded.tokenizer.decode)
        # The standard task's trials go round the depths; the others place their needles at random.
        depth = cfg.niah.depths[trial % len(cfg.niah.depths)] if task == "standard" else None
        depths = [depth] if depth is not None else [rng.random() for _ in text.needles]
        trials.append((depth, text, niah.build_prompt(text, haystack, depths, length, loaded.tokenizer.encode)))
    return trials


def niah_scores(
    loaded: LoadedModel, trials: list[tuple[float | None, niah.NeedleTask, list[int]]], cfg: EvalConfig
) -> list[float]:
    """Each trial's score from greedy decoding, in batches of niah.batch_size."""
    decode = loaded.tokenizer.decode
    scores = []
    for start in range(0, len(trials), cfg.niah.batch_size):
        texts = [text for _, text, _ in trials[start : start + cfg.niah.batch_size]]
        prompts = [prompt for _, _, prompt in trials[start : start + cfg.niah.batch_size]]

        def finished(row: int, output: list[int], texts: list[niah.NeedleTask] = texts) -> bool:
            return niah.answered(decode(output), len(texts[row].answers))

        # A longer output cannot be an exact answer, and decoding without a KV cache is the cost of NIAH.
        needed = max(len(tokens) for tokens in loaded.tokenizer.encode([f" {text.answer_text}" for text in texts]))
        budget = min(cfg.niah.max_new_tokens, needed + ANSWER_SLACK)
        outputs = niah.generate_greedy(loaded.model, prompts, budget, loaded.eos_id, finished)
        scores += [niah.score(decode(output), text.answers) for text, output in zip(texts, outputs, strict=True)]
    return scores


def niah_rows(loaded: LoadedModel, haystacks: list[np.ndarray], length: int, cfg: EvalConfig) -> list[Row]:
    """Per task its success rate; for the standard task also per depth."""
    rows = []
    for task in cfg.niah.tasks:
        try:
            trials = niah_trials(loaded, haystacks, task, length, cfg)
        except ValueError as err:
            log.warning("%s: NIAH %s at %d tokens skipped: %s", loaded.name, task, length, err)
            continue
        scores = niah_scores(loaded, trials, cfg)
        rows.append({"metric": "niah", "task": task, "value": float(np.mean(scores)), "n": len(scores)})
        if task == "standard":
            for depth in dict.fromkeys(d for d, _, _ in trials):
                at_depth = [score for score, (d, _, _) in zip(scores, trials, strict=True) if d == depth]
                row = {"metric": "niah", "task": task, "depth": depth, "value": float(np.mean(at_depth))}
                rows.append({**row, "n": len(at_depth)})
    return rows


def evaluate_model(
    loaded: LoadedModel,
    documents: list[np.ndarray],
    haystacks: list[np.ndarray],
    fit_sources: dict[str, list[np.ndarray]],
    cfg: EvalConfig,
) -> list[Row]:
    """Rows for one loaded model: the fitted logit scale if it has one, then every method at every length (NIAH's
    haystacks cut from `haystacks`)."""
    methods = methods_for(loaded, cfg)
    fitted = fitted_scale(loaded, fit_sources, cfg) if "logit_scale" in methods else None
    if fitted is None and "logit_scale" in methods:
        methods.remove("logit_scale")
    coef = fitted.coef if fitted is not None else 0.0
    rows = [] if fitted is None else [{"model": loaded.name, "context_factor": None, **fit_row(fitted)}]
    scored = scored_documents(loaded, documents, cfg) if cfg.perplexity.enabled else {}
    for method in methods:
        for factor in cfg.factors:
            length = factor * loaded.train_context
            configure(loaded, method, factor, cfg, coef)
            started = time.perf_counter()
            found = []
            if cfg.perplexity.enabled:
                found += perplexity_rows(loaded, scored[length], cfg)
            if cfg.niah.enabled:
                found += niah_rows(loaded, haystacks, length, cfg)
            common = {"model": loaded.name, "method": method, "context_factor": factor, "context_len": length}
            rows += [{**common, **row} for row in found]
            summary = ", ".join(
                f"{row['metric']}{'/' + row['task'] if row.get('task') else ''}={row['value']:.4g}"
                for row in found
                if row["metric"] != "ppl_bucket" and row.get("depth") is None
            )
            log.info(
                "%s %s %dx (%d tokens): %s [%.1fs]",
                loaded.name,
                method,
                factor,
                length,
                summary,
                time.perf_counter() - started,
            )
    return rows


def evaluate(cfg: EvalConfig) -> list[Row]:
    """Evaluates every model the config names; returns long-format rows: model, method, context_factor,
    context_len, metric (ppl, ppl_bucket, niah, logit_scale_c), value, n (documents or trials), tokens (ppl and the
    fit), and where they apply position (first position of a ppl bucket), task and depth (NIAH; rows without depth
    are the task's mean), source and boundary (the fit: its held-out sources and "low"/"high" for an optimum at an
    end of the search interval)."""
    validate(cfg)
    device = device_for(cfg.device)
    rows = []
    for name, spec in model_specs(cfg).items():
        loaded = load_model(name, spec, cfg.train_context, device)
        sources = heldout_documents(cfg.heldout, loaded.model.config.vocab_size, sha256_file(loaded.tokenizer_path))
        report, fit_sources = split_heldout(sources, cfg.logit_scale.sources if cfg.logit_scale.enabled else [])
        documents = [document for found in report.values() for document in found]
        haystacks = [d for path, found in report.items() if Path(path).name in cfg.niah.haystack for d in found]
        rows += evaluate_model(loaded, documents, haystacks, fit_sources, cfg)
    return rows
