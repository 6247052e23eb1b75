"""Build the demo pair from scratch: `python -m benchmarks.demo_world.build [--force]`.

1. policy: `policy.train_policy` (plain PyTorch SFT on error-model traces of train problems);
2. data: `vgs collect` (the real CLI, through vLLM) rolls in/out the policy on a fixed set of
   train problems; labels come from the project's grader;
3. value model: `python -m value_models.train` (the project's trainer, single process)
   initialised from the policy;
4. the finished models are copied into `benchmarks/demo_world/models/{policy,value}` (the
   value model without its optimizer state) with `models/BUILD.json` (settings, validation
   metrics, seconds per stage).

Every stage leaves its result in `--work` (default `.cache/demo_world/build`) and is skipped
when that result exists, so a killed build continues where it stopped (`vgs collect` and the
trainer resume by themselves). Everything is seeded. Never reads the held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from benchmarks.demo_world import MODELS_DIR, POLICY_DIR, VALUE_DIR, task
from benchmarks.demo_world.policy import PolicyConfig, train_policy
from vgs.assets import REPO

COLLECT_SEED = 1  # the collection's problems: a train split of their own seed


@dataclass
class BuildConfig:
    work: str = os.path.abspath(os.path.join(".cache", "demo_world", "build"))  # under the current directory
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    collect_problems: int = 2000  # was 1000: the value model overfit 7,500 rows (docs/demo_world.md)
    samples_per_problem: int = 4
    roll_outs: int = 2
    max_tokens: int = 48
    temperature: float = 1.0
    value_steps: int = 1500  # 500 -> 1000 -> 1500: the plateau ends late (docs/demo_world.md, "The value model")
    value_batch_size: int = 64
    value_lr: float = 1e-3
    value_head_init: str = "fan_in"  # the trainer's default N(0, 0.02) head is ~20x too small at hidden 128
    # weight decay ends the ln 2 plateau sooner and higher (0: AUC 0.78, 0.1: 0.86 on the same
    # data and seed; docs/demo_world.md, "The value model")
    value_weight_decay: float = 0.1
    value_threads: int = 1  # the trainer's torch threads (results depend on it: summation order)
    seed: int = 0


def _run(cmd: list[str], threads: int = 0) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the trainer's torch threads; vLLM sets its workers' own. On an idle 2-core machine two
    # threads train 1.8x faster than one (0.35 vs 0.63 s/step); on a machine shared with other
    # jobs one thread was faster, hence the flag
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rc = subprocess.call(cmd, env=env, cwd=str(REPO))
    if rc != 0:
        sys.exit(f"demo_world build: step failed (exit {rc}): {' '.join(cmd)}")


def collect_command(cfg: BuildConfig, policy: str, problems: str, out: str) -> list[str]:
    return [sys.executable, "-m", "vgs.cli", "collect", "--problems", problems, "--ref", policy, "--out", out,
            "--samples-per-problem", str(cfg.samples_per_problem), "--roll-outs", str(cfg.roll_outs),
            "--switch", "sqrt", "--max-tokens", str(cfg.max_tokens), "--temperature", str(cfg.temperature),
            "--top-p", "1.0", "--seed", str(cfg.seed), "--chunk-size", "200",
            "--kv-cache-gib", "0.25", "--max-model-len", "256"]


def train_command(cfg: BuildConfig, policy: str, data: str, out: str) -> list[str]:
    return [sys.executable, "-m", "value_models.train", "--data", data, "--init", policy, "--out", out,
            "--batch-size", str(cfg.value_batch_size), "--micro-batch-size", str(cfg.value_batch_size),
            "--steps", str(cfg.value_steps), "--lr", str(cfg.value_lr), "--max-length", "128",
            "--dropout", "0", "--head-init", cfg.value_head_init, "--weight-decay", str(cfg.value_weight_decay), "--grad-clip", "1.0", "--warmup-steps", "30",
            "--val-fraction", "0.05", "--eval-every", "100", "--log-every", "10", "--seed", str(cfg.seed)]


def build(cfg: BuildConfig, force: bool = False) -> dict:
    t_all = time.time()
    if force:
        shutil.rmtree(cfg.work, ignore_errors=True)
    os.makedirs(cfg.work, exist_ok=True)
    seconds: dict[str, float] = {}
    policy = os.path.join(cfg.work, "policy")
    t = time.time()
    if not os.path.exists(os.path.join(policy, "model.safetensors")):
        print(f"[build] 1/3 policy SFT ({cfg.policy.steps} steps x {cfg.policy.batch_size})", flush=True)
        train_policy(policy, cfg.policy)
    seconds["policy"] = round(time.time() - t, 1)

    problems = os.path.join(cfg.work, "collect_problems.jsonl")
    with open(problems + ".tmp", "w") as f:
        for p in task.make_split("train", cfg.collect_problems, COLLECT_SEED):
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    os.replace(problems + ".tmp", problems)
    data = os.path.join(cfg.work, "collect")
    t = time.time()
    print("[build] 2/3 vgs collect (roll-ins / roll-outs through vLLM, grader labels)", flush=True)
    _run(collect_command(cfg, policy, problems, data))
    seconds["collect"] = round(time.time() - t, 1)

    run = os.path.join(cfg.work, "value")
    t = time.time()
    if not os.path.exists(os.path.join(run, "final")):
        print("[build] 3/3 value model: value_models.train", flush=True)
        _run(train_command(cfg, policy, data, run) + (["--resume"] if os.path.isdir(run) else []), cfg.value_threads)
    seconds["value"] = round(time.time() - t, 1)

    # ship: models/policy, models/value (no optimizer state), BUILD.json
    final = os.path.realpath(os.path.join(run, "final"))
    tmp = str(MODELS_DIR) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(policy, os.path.join(tmp, "policy"))
    shutil.copytree(final, os.path.join(tmp, "value"), ignore=shutil.ignore_patterns("trainer_state.pt"))
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    val = _last_row(os.path.join(run, "val_log.csv"))
    info = {"command": "python -m benchmarks.demo_world.build --force", "config": asdict(cfg) | {"work": None},
            "collect_totals": manifest.get("totals"), "value_validation": val,
            "value_validation_history": validation_history(os.path.join(run, "val_log.csv")),
            "seconds": seconds, "total_seconds": round(time.time() - t_all, 1)}
    with open(os.path.join(tmp, "BUILD.json"), "w") as f:
        json.dump(info, f, indent=2)
    for name in ("policy", "value", "BUILD.json"):
        dst = MODELS_DIR / name
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
    MODELS_DIR.mkdir(exist_ok=True)
    for name in ("policy", "value", "BUILD.json"):
        os.replace(os.path.join(tmp, name), MODELS_DIR / name)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[build] done in {info['total_seconds']:.0f} s: {POLICY_DIR}, {VALUE_DIR}", flush=True)
    print(f"[build] collect labels wrong/correct/unfinished = {manifest['totals']['labels']}; value val: {val}", flush=True)
    return info


def validation_history(path: str) -> dict[str, list[float]]:
    """AUC by validation step (the plateau and when it ends are what docs/demo_world.md discusses)."""
    import csv

    if not os.path.exists(path):
        return {"step": [], "auc": []}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {"step": [int(r["step"]) for r in rows], "auc": [round(float(r["auc"]), 3) for r in rows]}


def _last_row(path: str) -> dict:
    import csv

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_world.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="delete --work first (a build from scratch)")
    p.add_argument("--work", default=BuildConfig.work, help="work directory (resumable)")
    p.add_argument("--policy-steps", type=int, default=PolicyConfig.steps)
    p.add_argument("--collect-problems", type=int, default=BuildConfig.collect_problems)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the policy SFT (0: torch's default, all cores: how the shipped policy "
                        "was trained; results depend on the thread count through summation order)")
    p.add_argument("--value-threads", type=int, default=BuildConfig.value_threads,
                   help="torch threads for the value trainer (the shipped value model: 1; on 2 cores one thread "
                        "trains as fast as two)")
    args = p.parse_args(argv)
    cfg = BuildConfig(work=args.work, policy=PolicyConfig(steps=args.policy_steps, threads=args.threads),
                      collect_problems=args.collect_problems, value_threads=args.value_threads)
    build(cfg, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
