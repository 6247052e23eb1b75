"""`vgs eval`: run a search method over benchmarks, grade, and write resumable results.

Output directory:
- `config.json`   what produced the results; a re-run with a different config is refused.
- `samples.jsonl` one line per (benchmark, problem, repetition), appended (and fsynced) as
  each problem finishes. A re-run skips every line already there, so a killed run loses at
  most the problems in flight and never duplicates a line.

All problems run on the one async search core (`vgs.search.search`), concurrently on the
engine loop, bounded by `vgs.runtime.Admission` (live sequences) and `--batch-size` (problems
in flight); the server runs the same code per request.
- `summary.csv`   per benchmark and average: the method's accuracy, pass@1, maj@n, wmaj@n,
  bon@n, pass@n with 95% CIs, mean generated tokens, FLOPs; also printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.datasets import BENCHMARKS, Problem, load_benchmark
from vgs.config import SELECTIONS, EngineConfig, search_config_from_dict, SamplingConfig, SearchConfig
from vgs.errors import VGSError
from vgs.prompts import DEFAULT_USER_TEMPLATE

from vgs.search.methods import METHOD_REGISTRY, get_method


@dataclass
class EvalConfig:
    benchmarks: list[str]
    policy: str
    out: str
    search: SearchConfig
    sampling: SamplingConfig
    value_model: str | None = None
    tokenizer: str | None = None
    value_backend: str = "vllm"
    repetitions: int = 1
    data_dir: str | None = None
    limit: int | None = None
    prompt_template: str = DEFAULT_USER_TEMPLATE
    batch_size: int = 64
    max_sequences: int | None = None
    save_text: bool = True
    policy_engine: dict[str, Any] = field(default_factory=dict)
    value_engine: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "EvalConfig":
        if not self.benchmarks:
            raise VGSError("give at least one --benchmark")
        for b in self.benchmarks:
            if b not in BENCHMARKS:
                raise VGSError(f"unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)}")
        self.search.validate()
        self.sampling.validate()
        if self.repetitions < 1:
            raise VGSError(f"--repetitions must be >= 1, got {self.repetitions}")
        if self.batch_size < 1:
            raise VGSError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise VGSError(f"--max-sequences must be >= 1, got {self.max_sequences}")
        if self.limit is not None and self.limit < 1:
            raise VGSError(f"--limit must be >= 1, got {self.limit}")
        m = get_method(self.search.method)
        if (m.needs_scorer or m.needs_guidance_model) and not self.value_model:
            raise VGSError(f"--method {self.search.method} needs --value-model")
        if self.value_backend not in ("vllm", "hf"):
            raise VGSError(f"--value-backend must be vllm or hf, got {self.value_backend!r}")
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise VGSError(f"--data-dir {self.data_dir!r} is not a directory")
        from vgs.engine import check_model_path

        check_model_path(self.policy)
        if self.value_model:
            check_model_path(self.value_model)
        return self

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes results. Benchmarks, limits, repetitions, batching and
        memory knobs may change between runs sharing an output dir; these may not."""
        full = asdict(self.search)
        applies = get_method(self.search.method).options
        search = {k: v for k, v in full.items() if k == "method" or k in applies}
        if self.search.method == "vgs":
            search["n"] = full["n"]  # kept: fingerprints written before the registry had it
        return {"policy": self.policy, "value_model": self.value_model, "tokenizer": self.tokenizer,
                "search": search, "sampling": {k: v for k, v in asdict(self.sampling).items() if k != "stop" or v},
                "prompt_template": self.prompt_template}


# ----------------------------------------------------------------------------- results file

class ResultsFile:
    """Append-only JSONL of finished work items, tolerant of a torn last line."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "samples.jsonl")
        self.rows: list[dict] = []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            keep = data[: data.rfind(b"\n") + 1]  # drop a line torn by a kill mid-write
            if len(keep) != len(data):
                with open(self.path, "wb") as f:
                    f.write(keep)
            self.rows = [json.loads(line) for line in keep.decode().splitlines() if line.strip()]

    @staticmethod
    def key(benchmark: str, problem_id: str, repetition: int) -> tuple[str, str, int]:
        return (benchmark, str(problem_id), int(repetition))

    def done(self) -> set[tuple[str, str, int]]:
        return {self.key(r["benchmark"], r["problem_id"], r["repetition"]) for r in self.rows}

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)


def check_config(out_dir: str, cfg: EvalConfig) -> None:
    """Write config.json on the first run; refuse a re-run whose results would differ."""
    path = os.path.join(out_dir, "config.json")
    fp = cfg.fingerprint()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("fingerprint")
        if old != json.loads(json.dumps(fp)):
            diffs = [k for k in sorted(set(old or {}) | set(fp)) if (old or {}).get(k) != json.loads(json.dumps(fp)).get(k)]
            raise VGSError(f"{out_dir} holds results of a different configuration (differs in: {', '.join(diffs)}); "
                           "use another --out or the same settings")
        return
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fp, "argv": sys.argv}, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class WorkItem:
    problem: Problem
    repetition: int
    seed: int


def build_engines(cfg: EvalConfig):
    """Policy engine first, then the value scorer (`vgs.runtime.build_engines`)."""
    from vgs.runtime import build_engines as build

    return build(EngineConfig(model=cfg.policy, tokenizer=cfg.tokenizer, seed=cfg.sampling.seed, **cfg.policy_engine),
                 cfg.value_model, needs_scorer=get_method(cfg.search.method).needs_scorer,
                 value_backend=cfg.value_backend, value_engine=cfg.value_engine)


def grade_row(item: WorkItem, res, tokenizer, grader, method: str, save_text: bool) -> dict:
    """Finalize (label-free: decode, extract, vote, choose) and grade against the gold answer;
    one JSON row for the work item."""
    from vgs.grading import vote
    from vgs.search.finalize import finalize

    finalize(res, tokenizer, grader, method)
    answers = [c.answer for c in res.candidates]
    correct = grader.correct(item.problem.answer, answers)
    for c, ok in zip(res.candidates, correct):
        c.correct = bool(ok)
    values = [c.value for c in res.candidates]
    weights = values if all(v is not None for v in values) else None
    classes = res.votes.classes
    v = vote(answers, weights=weights, correct=correct, classes=classes)
    metrics = {"pass1": v.pass_at_1, "maj": v.maj, "wmaj": v.wmaj, "bon": v.bon, "pass_n": v.pass_at_n,
               "maj_ties": v.maj_ties, "wmaj_ties": v.wmaj_ties, "num_classes": v.num_classes}
    choice = get_method(method).vote
    metrics["accuracy"] = metrics[choice]
    answer = {"pass1": answers[0] if answers else None, "maj": v.maj_answer, "wmaj": v.wmaj_answer,
              "bon": v.bon_answer}[choice]
    samples = []
    for c, cls in zip(res.candidates, classes):
        s = {"num_tokens": c.num_tokens, "finish_reason": c.finish_reason, "answer": c.answer,
             "correct": c.correct, "class": cls, "value": c.value, "tree": c.tree}
        if c.info:
            s["info"] = c.info
        if save_text:
            s["text"] = c.text
        samples.append(s)
    return {
        "benchmark": item.problem.benchmark, "problem_id": item.problem.id, "repetition": item.repetition,
        "seed": item.seed, "gold": item.problem.answer, "method": method, "answer": answer,
        "correct": metrics["accuracy"], "metrics": metrics,
        "mean_tokens": sum(c.num_tokens for c in res.candidates) / max(1, len(res.candidates)),
        "compute": res.compute.to_dict(), "samples": samples,
        **({"trace": res.trace} if res.trace else {}),
    }


def grade_results(items: list[WorkItem], results, tokenizer, grader, method: str, save_text: bool) -> list[dict]:
    """`grade_row` for each (item, result) pair."""
    return [grade_row(it, res, tokenizer, grader, method, save_text) for it, res in zip(items, results)]


async def _run_items(cfg: EvalConfig, todo: list[WorkItem], engines, grader, results_file: "ResultsFile",
                     bar: Any) -> None:
    """Every item's search in flight at once on the engine loop, bounded by live sequences
    (`Admission`) and problems (`--batch-size`); each row is appended as its problem finishes."""
    import asyncio

    from vgs.aio import gather_or_cancel
    from vgs.prompts import prompt_ids
    from vgs.runtime import Admission, default_max_sequences
    from vgs.search import SearchEvents, search

    tok = engines.policy.tokenizer
    method = get_method(cfg.search.method)
    limit = cfg.max_sequences or default_max_sequences(engines.policy, cfg.sampling.max_tokens)
    admission = Admission(limit, max_queued=1 << 62)
    problems = asyncio.Semaphore(cfg.batch_size)

    class Progress(SearchEvents):
        def round(self, tree, round, active, best_value):  # noqa: A002
            bar.set_postfix(in_flight=admission.in_use, round=round)

    async def one(item: WorkItem) -> None:
        prompt = prompt_ids(tok, item.problem.problem, cfg.prompt_template)
        async with problems, admission.slot(method.sequences(cfg.search)):
            res = await search(prompt, item.seed, engines, cfg.search, cfg.sampling, Progress())
        row = await asyncio.to_thread(grade_row, item, res, tok, grader, cfg.search.method, cfg.save_text)
        row["prompt_tokens"] = len(prompt)
        results_file.append([row])
        bar.update(1)

    await gather_or_cancel(*(one(it) for it in todo))


def run_eval(cfg: EvalConfig) -> "Any":
    """Run (or resume) an evaluation; returns the summary DataFrame."""
    from tqdm import tqdm

    from benchmarks.report import budget_curve, format_table, plot_accuracy_vs_budget, summarize
    from vgs.search import derive_seed

    cfg.validate()
    problems = {b: load_benchmark(b, cfg.data_dir, cfg.limit) for b in cfg.benchmarks}
    check_config(cfg.out, cfg)
    results_file = ResultsFile(cfg.out)
    done = results_file.done()
    todo = [WorkItem(p, r, derive_seed(cfg.sampling.seed, p.benchmark, p.id, r))
            for r in range(cfg.repetitions) for b in cfg.benchmarks for p in problems[b]
            if ResultsFile.key(p.benchmark, p.id, r) not in done]
    total = sum(len(ps) for ps in problems.values()) * cfg.repetitions
    if todo:
        print(f"[vgs eval] {len(todo)} of {total} problem×repetition items to run "
              f"({total - len(todo)} already in {results_file.path})", file=sys.stderr)
        engines = build_engines(cfg)
        from vgs.aio import run_sync
        from vgs.grading import Grader

        with Grader() as grader, tqdm(total=total, initial=total - len(todo), desc="problems", unit="prob") as bar:
            run_sync(_run_items(cfg, todo, engines, grader, results_file, bar))
    else:
        print(f"[vgs eval] all {total} items already in {results_file.path}; nothing to generate", file=sys.stderr)

    wanted = {(p.benchmark, p.id) for ps in problems.values() for p in ps}
    rows = [r for r in results_file.rows if (r["benchmark"], str(r["problem_id"])) in wanted
            and r["repetition"] < cfg.repetitions]
    summary = summarize(rows)
    summary.insert(1, "method", cfg.search.method)
    tmp = os.path.join(cfg.out, "summary.csv.tmp")
    summary.to_csv(tmp, index=False)
    os.replace(tmp, os.path.join(cfg.out, "summary.csv"))
    print(format_table(summary, cfg.search.method))
    plot_path = os.path.join(cfg.out, "accuracy_vs_budget.png")
    if plot_accuracy_vs_budget({cfg.search.method: (budget_curve(rows, cfg.search), cfg.search)}, plot_path):
        print(f"[vgs eval] plot: {plot_path}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------- CLI

def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engines")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="policy engine's share of GPU memory (the value engine gets --value-gpu-memory-utilization)")
    g.add_argument("--value-gpu-memory-utilization", type=float, default=None)
    g.add_argument("--kv-cache-gib", type=float, default=None, help="policy KV cache size (CPU default 2 GiB)")
    g.add_argument("--value-kv-cache-gib", type=float, default=None, help="value-model KV cache size")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--enforce-eager", action="store_true", default=None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a search method on math benchmarks (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", action="append", required=True, help=f"one of {', '.join(BENCHMARKS)}; repeatable")
    p.add_argument("--policy", required=True, help="policy model (local dir or Hub id)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the policy's)")
    p.add_argument("--method", default="majority", help=f"one of {', '.join(METHOD_REGISTRY)}")
    p.add_argument("--value-model", default=None)
    p.add_argument("--value-backend", default="vllm", help="vllm (prefix-cached pooling) or hf (transformers)")
    p.add_argument("--n", type=int, default=None, help="[16] samples per problem (sampling methods, qsharp, cd)")
    p.add_argument("--budget", type=int, default=None, help="[8] VGS: blocks sampled per round per tree (N)")
    p.add_argument("--beam-width", type=int, default=None, help="[2] VGS: w, children per beam")
    p.add_argument("--block-size", type=int, default=None, help="[4096] VGS: tokens per block")
    p.add_argument("--trees", type=int, default=None, help="[1] VGS: independent DVTS trees per problem")
    p.add_argument("--selection", default=None, help=f"[global] VGS: one of {', '.join(SELECTIONS)}")
    p.add_argument("--eta", type=float, default=None, help="[0.1] qsharp/cd: KL weight η")
    p.add_argument("--top-k", type=int, default=None, help="[20] qsharp/cd: candidates scored per token")
    p.add_argument("--report-kl", action="store_true", default=None, help="qsharp/cd: record per-sample KL(guided || ref)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--out", required=True, help="output directory (re-run with the same --out to resume)")
    p.add_argument("--data-dir", default=None, help="read benchmarks from DIR/<name>.jsonl instead of the Hub "
                                                    "(default: $VGS_DATA_DIR; without either, the Hub, falling "
                                                    "back to the copy shipped in benchmarks/data)")
    p.add_argument("--limit", type=int, default=None, help="first K problems of each benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="problems in flight at most (each is saved as it finishes)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="live sequences in flight at most, over all problems (default: what the policy KV cache "
                        "holds at full length)")
    p.add_argument("--prompt-template", default=DEFAULT_USER_TEMPLATE)
    p.add_argument("--no-save-text", dest="save_text", action="store_false", help="store token counts, not texts")
    add_engine_args(p)
    p.set_defaults(func=run_cli)


def engine_kwargs(args: argparse.Namespace, value: bool) -> dict[str, Any]:
    kv = args.value_kv_cache_gib if value else args.kv_cache_gib
    util = args.value_gpu_memory_utilization if value else args.gpu_memory_utilization
    kw: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len,
                          "tensor_parallel_size": args.tensor_parallel_size, "enforce_eager": args.enforce_eager}
    if kv is not None:
        kw["kv_cache_gib"] = kv
    if util is not None:
        kw["gpu_memory_utilization"] = util
    return kw


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    given = {k: getattr(args, k) for k in ("n", "budget", "beam_width", "block_size", "trees", "selection", "eta",
                                           "top_k", "report_kl") if getattr(args, k) is not None}
    try:  # the same parser as the server's `search` object: options that do not apply are errors
        search = search_config_from_dict({"method": args.method, **given})
    except VGSError as exc:
        flag = f"--{exc.param.replace('_', '-')}" if exc.param and exc.param != "method" else None
        raise VGSError(f"{flag}: {exc}" if flag else str(exc)) from None
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    return EvalConfig(benchmarks=args.benchmark, policy=args.policy, out=args.out, search=search, sampling=sampling,
                      value_model=args.value_model, tokenizer=args.tokenizer, value_backend=args.value_backend,
                      repetitions=args.repetitions, data_dir=args.data_dir, limit=args.limit,
                      prompt_template=args.prompt_template, batch_size=args.batch_size,
                      max_sequences=args.max_sequences, save_text=args.save_text,
                      policy_engine=engine_kwargs(args, value=False), value_engine=engine_kwargs(args, value=True))


def run_cli(args: argparse.Namespace) -> int:
    run_eval(config_from_args(args))
    return 0
