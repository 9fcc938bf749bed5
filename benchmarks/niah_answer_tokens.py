"""How far a model is from retrieving at 1x, where exact match only says 0: per-token accuracy and answer NLL.

    python benchmarks/niah_answer_tokens.py EXPERIMENT_OUT ARM [ARM ...] [--step N] [--heldout DIR] [--trials 300]

For each arm's checkpoint (EXPERIMENT_OUT/arms/ARM, its last one or step N), the evaluation's own standard-task
trials at the training context (prompt and answer within it, the same prompts as `python -m nopetrain.eval` builds,
values of the length the arm's look-ups have), teacher-forced: exact match with its Wilson interval, the share of
trials whose answer token i is the model's argmax, per position i (a digit at chance scores about 0.1), and the mean
NLL of the answer's digits, against a control: the same prompt with the needle's value replaced by other digits. A
model that retrieves puts a far lower NLL on the answer when the needle holds it; one that does not cannot tell.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nopetrain.checkpoint import checkpoint_root, tag_for
from nopetrain.data.shards import read_documents
from nopetrain.eval.config import EvalConfig, NiahConfig
from nopetrain.eval.evaluate import Trial, niah_trials
from nopetrain.eval.models import load_model
from nopetrain.eval.stats import wilson


def needle_swapped(trial: Trial, digit_ids: list[int], rng: random.Random) -> list[int]:
    """The trial's prompt with the needle's value (the last copy of the answer's digit ids) replaced by other digits."""
    prompt, value = trial.prompt.tolist(), [i for i in trial.answer if i in digit_ids]
    for start in range(len(prompt) - len(value), -1, -1):
        if prompt[start : start + len(value)] == value:
            prompt[start : start + len(value)] = [rng.choice([d for d in digit_ids if d != i]) for i in value]
            return prompt
    raise ValueError("the needle's value is not in the prompt as the answer tokenizes it")


def answer_scores(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> tuple[list[bool], torch.Tensor]:
    """Per answer token: whether it is the argmax, and its NLL (teacher-forced after `prompt`)."""
    ids = torch.tensor([prompt + answer[:-1]])
    logits = model(ids, last=len(answer))[0].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="none")
    return [guess == right for guess, right in zip(logits.argmax(-1).tolist(), answer, strict=True)], nll


def score_arm(run_dir: str, heldout: str, trials: int, value_digits: int) -> dict[str, object]:
    loaded = load_model("arm", run_dir, None, torch.device("cpu"))
    documents, _ = read_documents(heldout, loaded.model.config.vocab_size)
    cfg = EvalConfig(niah=NiahConfig(trials=trials, tasks=["standard"], value_digits=value_digits))
    built = niah_trials(loaded.tokenizer, documents, "standard", loaded.train_context, cfg)
    digit_ids = [loaded.tokenizer.encode([str(d)])[0][-1] for d in range(10)]
    rng = random.Random(0)
    right, exact, nll, control = [0] * len(built[0].answer), 0, 0.0, 0.0
    with torch.no_grad():
        for trial in built:
            hits, losses = answer_scores(loaded.model, trial.prompt.tolist(), trial.answer)
            _, swapped = answer_scores(loaded.model, needle_swapped(trial, digit_ids, rng), trial.answer)
            digits = torch.tensor([i in digit_ids for i in trial.answer])
            right = [count + hit for count, hit in zip(right, hits, strict=True)]
            exact += all(hits)
            nll += losses[digits].mean().item()
            control += swapped[digits].mean().item()
    low, high = wilson(exact, len(built))
    return {
        "exact": exact / len(built),
        "exact_ci95": [round(low, 3), round(high, 3)],
        "trials": len(built),
        "per_answer_token": [round(count / len(built), 3) for count in right],
        "digit_nll": round(nll / len(built), 3),
        "digit_nll_needle_swapped": round(control / len(built), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the experiment's out folder")
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--step", type=int, default=None, help="score this checkpoint step (default: the last)")
    parser.add_argument("--heldout", default=None, help="held-out prose (default: the arm's data.root/heldout/web)")
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arm in args.arms:
        run_dir = f"{args.out}/arms/{arm}"
        root = Path(OmegaConf.load(f"{run_dir}/config.yaml").data.root)
        value_digits = json.loads((root / "corpus.json").read_text()).get("lookup", {}).get("value_digits", 7)
        spec = run_dir if args.step is None else str(checkpoint_root(run_dir) / tag_for(args.step))
        scores = score_arm(spec, args.heldout or str(root / "heldout" / "web"), args.trials, value_digits)
        print(json.dumps({"arm": arm, "step": args.step or "last", **scores}), flush=True)


if __name__ == "__main__":
    main()
