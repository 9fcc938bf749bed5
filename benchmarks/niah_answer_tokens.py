"""Per-token accuracy of NIAH answers at 1x: how far a model is from retrieving, where exact match only says 0.

    python benchmarks/niah_answer_tokens.py EXPERIMENT_OUT ARM [ARM ...] [--heldout DIR] [--trials 300]

For each arm's final checkpoint (EXPERIMENT_OUT/arms/ARM), the evaluation's own standard-task trials at the training
context (prompt and answer within it, the same prompts as `python -m nopetrain.eval` builds), teacher-forced: the
share of trials whose answer token i is the model's argmax, per position i. A seven-digit answer at chance scores
about 0.1 per digit.
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import OmegaConf

from nopetrain.data.shards import read_documents
from nopetrain.eval.config import EvalConfig, NiahConfig
from nopetrain.eval.evaluate import niah_trials
from nopetrain.eval.models import load_model


def answer_token_accuracy(run_dir: str, heldout: str, trials: int) -> list[float]:
    loaded = load_model("arm", run_dir, None, torch.device("cpu"))
    documents, _ = read_documents(heldout, loaded.model.config.vocab_size)
    cfg = EvalConfig(niah=NiahConfig(trials=trials, tasks=["standard"]))
    built = niah_trials(loaded.tokenizer, documents, "standard", loaded.train_context, cfg)
    right = [0] * len(built[0].answer)
    with torch.no_grad():
        for trial in built:
            ids = torch.tensor([trial.prompt.tolist() + trial.answer[:-1]])
            predicted = loaded.model(ids, last=len(trial.answer)).argmax(-1)[0].tolist()
            for position, (guess, answer) in enumerate(zip(predicted, trial.answer, strict=True)):
                right[position] += guess == answer
    return [count / len(built) for count in right]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the experiment's out folder")
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--heldout", default=None, help="held-out prose (default: the arm's data.root/heldout/web)")
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arm in args.arms:
        run_dir = f"{args.out}/arms/{arm}"
        heldout = args.heldout or f"{OmegaConf.load(f'{run_dir}/config.yaml').data.root}/heldout/web"
        accuracy = answer_token_accuracy(run_dir, heldout, args.trials)
        print(json.dumps({"arm": arm, "trials": args.trials, "per_answer_token": [round(a, 3) for a in accuracy]}))


if __name__ == "__main__":
    main()
