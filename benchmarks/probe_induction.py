"""Can the tiny model learn content-based look-up in the steps the drope_tiny experiment gives it? (issue 12)

    python benchmarks/probe_induction.py --task copy --steps 2000 [--vocab 4096] [--values 0] [--batch 16] [--out F]

Trains configs/model/tiny.yaml's architecture (all layers RoPE) with AdamW at the experiment's peak LR (3e-3,
constant) on synthetic batches of the experiment's shape (16 x 128 tokens of a 4,096-token vocabulary; --batch
changes the 16, --vocab makes the vocabulary smaller, --values draws retrieve's values from that many ids, as digits
are), in a plain PyTorch loop, and every --every steps scores 64 fresh sequences:

- fixed_copy: 64 random tokens, then the same 64 again. Position alone finds the source (always 64 back); the
  control that copying itself is learnable.
- copy: random tokens with a span of 20-56 of them repeated later, both at random offsets. Only content finds the
  source (an induction head: attend to the token after the earlier occurrence of the current one), as in a look-up
  document where the needle sits at a random depth.
- retrieve: random tokens with a marker and a value token at a random place, and the marker again later; the value
  must follow it. The single-token form of "Answer:" after "value: N".

The score is next-token accuracy where the answer is in the context: the copy's tokens after its first, or the
value after the second marker.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from nopetrain.config import ModelConfig
from nopetrain.model import Transformer

LENGTH = 128
FIRST_TOKEN, MARKER = 100, 7  # ids below FIRST_TOKEN never occur at random; MARKER stands for "value:"/"Answer:"


def sequences(
    task: str, count: int, vocab: int, gen: torch.Generator, values: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (count, LENGTH + 1), mask of the targets (count, LENGTH) whose answer is in the context)."""
    tokens = torch.randint(FIRST_TOKEN, vocab, (count, LENGTH + 1), generator=gen)
    answer = torch.zeros(count, LENGTH + 1, dtype=torch.bool)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    for row in range(count):
        if task == "fixed_copy":
            half = LENGTH // 2
            tokens[row, half : 2 * half] = tokens[row, :half]
            answer[row, half + 1 : 2 * half] = True
        elif task == "copy":
            span = draw(20, 57)
            source = draw(0, LENGTH + 1 - 2 * span)
            target = draw(source + span, LENGTH + 2 - span)
            tokens[row, target : target + span] = tokens[row, source : source + span]
            answer[row, target + 1 : target + span] = True
        elif task == "retrieve":
            source = draw(0, LENGTH - 4)
            target = draw(source + 2, LENGTH)
            tokens[row, [source, target]] = MARKER
            if values:
                tokens[row, source + 1] = FIRST_TOKEN + draw(0, values)
            tokens[row, target + 1] = tokens[row, source + 1]
            answer[row, target + 1] = True
        else:
            raise ValueError(f"--task={task!r}: choose fixed_copy, copy or retrieve")
    return tokens, answer[:, 1:]


class ReferenceBlock(nn.Module):
    """A GPT-2 block (LayerNorm, biased projections, GELU MLP), written apart from nopetrain.model."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, dim)
        x = x + self.out(attended)
        return x + self.mlp(x)


class ReferenceGPT(nn.Module):
    """The control for a bug in nopetrain.model: 2 GPT-2 blocks of width 128, 4 heads, learned absolute positions,
    untied head, PyTorch's default initialisation."""

    def __init__(self, vocab: int, dim: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.positions = nn.Embedding(vocab, dim), nn.Embedding(LENGTH, dim)
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="copy", choices=["fixed_copy", "copy", "retrieve"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (the experiment's: 16)")
    parser.add_argument("--vocab", type=int, default=4096, help="ids FIRST_TOKEN..vocab-1 occur at random")
    parser.add_argument("--values", type=int, default=0, help="retrieve: values from this many ids (0: any)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "reference"], help="reference: ReferenceGPT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write each score as a JSON line here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "reference":
        model = ReferenceGPT(args.vocab)
    else:
        model = Transformer(ModelConfig(vocab_size=args.vocab, no_rope_layer_interval=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train_gen, score_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    scored = sequences(args.task, 64, args.vocab, score_gen, args.values)
    start = time.monotonic()
    for step in range(1, args.steps + 1):
        tokens, _ = sequences(args.task, args.batch, args.vocab, train_gen, args.values)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            with torch.no_grad():
                tokens, answer = scored
                right = model(tokens[:, :-1]).argmax(-1) == tokens[:, 1:]
            row = {
                "task": args.task,
                "vocab": args.vocab,
                "model": args.model,
                "batch": args.batch,
                "step": step,
                "loss": round(loss.item(), 4),
                "in_context_accuracy": round(right[answer].float().mean().item(), 4),
                "answers_scored": int(answer.sum()),
                "seconds": round(time.monotonic() - start, 1),
            }
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
