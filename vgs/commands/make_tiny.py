"""`vgs make-tiny`: build a random tiny policy or value model with a real tokenizer."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="build a tiny random Qwen2 policy or value model for tests")
    p.add_argument("--kind", choices=("policy", "value"), required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (its config.json gives the vocab size)")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 64 (head size 64)")
    p.add_argument("--num-labels", type=int, default=3, choices=(1, 3), help="value head classes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vgs.tiny import make_tiny

    out = make_tiny(args.kind, args.tokenizer, args.out, layers=args.layers, hidden=args.hidden,
                    seed=args.seed, num_labels=args.num_labels)
    print(out)
    return 0
