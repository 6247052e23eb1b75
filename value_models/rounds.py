"""`vgs train-rounds`: Q# online aggregated training, R rounds in one command.

    round 1:  roll in with pi_ref                      -> data_1;  train on data_1          -> model_1
    round k:  roll in with pi_ref guided by model_{k-1} -> data_k;  train on data_1..data_k  -> model_k

Roll-outs are always unguided pi_ref, so every label still estimates pi_ref's success from
the prefix; only the prefixes move toward where the guided policy goes (Q# Algorithm 1).
With `--warm-start`, round k's training starts from model_{k-1} instead of `--init`.
`--drop` (e.g. all-wrong) is judged per problem over rounds 1..k together, by the trainer.

Layout: `OUT/round-K/collect/` (a `vgs collect` dir: manifest.json, data/), `OUT/round-K/train/`
(a training run dir: checkpoints/, logs, `final`), and `OUT/rounds.json` (a summary). Every
stage is resumable, so re-running the same command after a crash continues where it stopped.
Training runs in this process, or under `torchrun --nproc_per_node N` with
`--nproc-per-node N` (one node; for many nodes run `vgs collect` and torchrun per round, see
docs/training.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from vgs.errors import VGSError
from value_models.collect import CollectConfig, EngineFactory, RollInPolicy, collect
from value_models.train import TrainConfig, final_model


@dataclass
class RoundsConfig:
    out: str
    rounds: int
    collect: CollectConfig  # its `out`, `round`, `roll_in` and guidance are set per round
    train: TrainConfig  # its `data`, `init`, `out` are set per round
    warm_start: bool = False
    nproc_per_node: int = 1

    def validate(self) -> "RoundsConfig":
        if self.rounds < 1:
            raise VGSError(f"--rounds must be >= 1, got {self.rounds}")
        if self.nproc_per_node < 1:
            raise VGSError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if not self.collect.ref:
            raise VGSError("--ref (pi_ref) is required")
        return self


def round_dirs(out: str, k: int) -> tuple[str, str]:
    return os.path.join(out, f"round-{k}", "collect"), os.path.join(out, f"round-{k}", "train")


def run_rounds(cfg: RoundsConfig, engine_factory: EngineFactory | None = None) -> list[dict[str, Any]]:
    """Run (or resume) all rounds; returns one summary dict per round."""
    cfg.validate()
    os.makedirs(cfg.out, exist_ok=True)
    summary: list[dict[str, Any]] = []
    prev_model: str | None = None
    for k in range(1, cfg.rounds + 1):
        data_dir, train_dir = round_dirs(cfg.out, k)
        ccfg = dataclasses.replace(cfg.collect, out=data_dir, round=k, roll_in=[RollInPolicy(cfg.collect.ref)],
                                   guide_value_model=prev_model,
                                   drop=cfg.train.drop if cfg.train.drop != "auto" else cfg.collect.drop)
        print(f"[rounds] round {k}/{cfg.rounds}: collect ({'pi_ref' if prev_model is None else 'Q#-guided by ' + prev_model})",
              file=sys.stderr, flush=True)
        manifest = collect(ccfg, engine_factory)
        if not manifest.get("complete"):
            raise VGSError(f"round {k}: collection stopped before the end (--max-chunks?); re-run to continue")
        model = final_model(train_dir)
        if model is None:
            init = prev_model if (cfg.warm_start and prev_model) else cfg.train.init
            tcfg = dataclasses.replace(cfg.train, data=[round_dirs(cfg.out, i)[0] for i in range(1, k + 1)],
                                       init=init, out=train_dir, resume=True, stop_at_step=None)
            print(f"[rounds] round {k}/{cfg.rounds}: train on rounds 1..{k} from {init}", file=sys.stderr, flush=True)
            _train(tcfg, cfg.nproc_per_node)
            model = final_model(train_dir)
            if model is None:
                raise VGSError(f"round {k}: training ended without a final model in {train_dir}")
        summary.append({"round": k, "data": data_dir, "model": model, "rows": manifest["totals"]["rows"],
                        "labels": manifest["totals"]["labels"], "guided_by": prev_model, **_last_val(train_dir)})
        _write_summary(cfg.out, summary)
        prev_model = model
    for s in summary:
        print(f"[rounds] round {s['round']}: {s['rows']} rows, labels {s['labels']}, "
              f"val auc {s.get('auc', 'n/a')}, model {s['model']}", file=sys.stderr)
    return summary


def _train(tcfg: TrainConfig, nproc: int) -> None:
    """In this process for one worker, else `torchrun` on this node with the config as JSON,
    on data prepared here first (the ranks then only memory-map it)."""
    if nproc == 1:
        from value_models.train import train

        train(tcfg)
        return
    from value_models.data import recorded_drop
    from value_models.prepare import prepare

    os.makedirs(tcfg.out, exist_ok=True)
    prepared = os.path.join(tcfg.out, "prepared")
    drop = tcfg.drop if tcfg.drop != "auto" else (recorded_drop(tcfg.data) or "none")
    prepare(tcfg.data, prepared)
    tcfg = dataclasses.replace(tcfg, data=[prepared], drop=drop)
    path = os.path.join(tcfg.out, "rounds_train_config.json")
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(tcfg), f, indent=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "value_models.train", "--config-json", path]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise VGSError(f"training exited with status {rc} ({' '.join(cmd)}); re-run to resume")


def _last_val(train_dir: str) -> dict[str, Any]:
    path = os.path.join(train_dir, "val_log.csv")
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: float(rows[-1][k]) for k in ("val_loss", "acc", "auc", "ece") if rows[-1].get(k) not in (None, "")}


def _write_summary(out: str, summary: list[dict[str, Any]]) -> None:
    tmp = os.path.join(out, "rounds.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "rounds.json"))


# ----------------------------------------------------------------------------------------------
# command line


def register(sub: argparse._SubParsersAction) -> None:
    from value_models import collect as collect_mod
    from value_models import train as train_mod

    p = sub.add_parser("train-rounds", help="Q# online rounds: collect (guided roll-in) + train, R times",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run dir: round-K/{collect,train}/, rounds.json")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--init", default=None, help="initial checkpoint for training (default: --ref, a causal LM)")
    p.add_argument("--warm-start", action="store_true", help="round k trains from round k-1's model")
    p.add_argument("--nproc-per-node", type=int, default=1, help="train with torchrun on this many processes")
    collect_mod.add_arguments(p, rounds=True)
    train_mod.add_arguments(p, rounds=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from value_models import collect as collect_mod
    from value_models import train as train_mod

    if not args.ref:
        raise VGSError("--ref (pi_ref) is required")
    ccfg = collect_mod.config_from_args(args, out=os.path.join(args.out, "round-1", "collect"))
    tcfg = train_mod.config_from_args(args, data=["-"], init=args.init or args.ref, out=args.out)
    tcfg.validate()
    cfg = RoundsConfig(out=args.out, rounds=args.rounds, collect=ccfg, train=tcfg, warm_start=args.warm_start,
                       nproc_per_node=args.nproc_per_node)
    run_rounds(cfg)
    return 0
