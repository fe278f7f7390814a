"""Which optimizer trains which parameters: the job's recipes, the same for shardopt and for --compare-torch.

Most algorithms take every parameter. Two take only some, as a torch.optim user would write the job,
and a partner, AdamW, takes the rest:

- muon: Newton-Schulz orthogonalises matrices, so Muon takes the 2-D weights of the transformer
  blocks; the embeddings and the output head (matrices too, but of tokens, not hidden features),
  norms and biases go to AdamW: the standard Muon recipe.
- sparseadam: SparseAdam takes sparse gradients only: the token embedding, built with
  ``nn.Embedding(sparse=True)`` for it; the rest goes to AdamW.

LBFGS takes every parameter; what is special about it is the closure (train.py's loop).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpt import GPT
from torch import nn

PARTNER = "adamw"


def hidden_matrices(model: GPT) -> list[nn.Parameter]:
    return [p for p in model.blocks.parameters() if p.ndim == 2]


def token_embedding(model: GPT) -> list[nn.Parameter]:
    return [model.tokens.weight]


# The algorithms that take only some parameters, and which: PARTNER takes the rest.
PARTNERED: dict[str, Callable[[GPT], list[nn.Parameter]]] = {
    "muon": hidden_matrices,
    "sparseadam": token_embedding,
}


@dataclass(frozen=True)
class Part:
    """One optimizer of the recipe: a torch.optim algorithm by name, its parameters and keywords, and
    the flags those came from (what an error about them names)."""

    algorithm: str
    params: list[nn.Parameter]
    keywords: dict[str, Any]
    flags: str


def sparse_tokens(args: argparse.Namespace) -> bool:
    """Whether the model's token embedding has sparse gradients (for SparseAdam)."""
    return args.optimizer.lower() == "sparseadam"


def algorithms(args: argparse.Namespace) -> list[str]:
    """The names of the recipe's optimizers, in the order :func:`parts` builds them."""
    return [args.optimizer, PARTNER] if args.optimizer.lower() in PARTNERED else [args.optimizer]


def parts(model: GPT, args: argparse.Namespace) -> list[Part]:
    """--optimizer with --opt-arg and --lr on its parameters; where it takes only some, AdamW with
    torch's defaults and --aux-lr on the rest."""
    flags = " ".join([f"--optimizer {args.optimizer}"] + [f"--opt-arg {key}={value!r}" for key, value in args.opt_arg])
    main = dict(args.opt_arg, lr=args.lr)
    choose = PARTNERED.get(args.optimizer.lower())
    if choose is None:
        return [Part(args.optimizer, list(model.parameters()), main, flags)]
    chosen = choose(model)
    taken = {id(p) for p in chosen}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [
        Part(args.optimizer, chosen, main, flags),
        Part(PARTNER, rest, {"lr": args.aux_lr}, f"--aux-lr {args.aux_lr} (for {PARTNER})"),
    ]
