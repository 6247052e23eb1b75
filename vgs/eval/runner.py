"""`vgs eval`: run a search method over benchmarks, grade, and write resumable results.

Output directory:
- `config.json`   what produced the results; a re-run with a different config is refused.
- `samples.jsonl` one line per (benchmark, problem, repetition), appended (and fsynced) as
  each problem finishes. A re-run skips every line already there, so a killed run loses at
  most the problems in flight and never duplicates a line.

All problems run on the one async search core (`vgs.search.search`), concurrently on the
engine loop, bounded by `vgs.runtime.Admission` (live sequences) and `--batch-size` (problems
in flight); the server runs the same code per request.
Only the resume keys are kept in memory; summaries stream the rows back without their texts.
With `--num-shards K --shard-index I` a run does one disjoint slice of the items (`shard_of`);
`vgs report` merges the shard directories.
- `summary.csv`   per benchmark and average: the method's accuracy, pass@1, maj@n, wmaj@n,
  bon@n, pass@n with 95% CIs, mean generated tokens, FLOPs; also printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from vgs.eval.datasets import BENCHMARKS, Problem, load_benchmark
from vgs.config import SELECTIONS, EngineConfig, SamplingConfig, SearchConfig
from vgs.errors import VGSError
from vgs.prompts import DEFAULT_USER_TEMPLATE

from vgs.search.methods import METHOD_REGISTRY, get_method, search_config_from_dict


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
    num_shards: int = 1  # this run does the items of shard `shard_index` (see `shard_of`)
    shard_index: int = 0

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
        if self.num_shards < 1:
            raise VGSError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise VGSError(f"--shard-index must be in [0, {self.num_shards}), got {self.shard_index}")
        check_models(self)
        check_out_dir(self.out)
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


# ----------------------------------------------------------------------------- checks before engines

def _local_config(path: str) -> dict[str, Any] | None:
    """config.json of a local model directory (None for a Hub id: its loader checks it)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise VGSError(f"cannot read {cfg_path}: {exc}") from None


def check_models(cfg: EvalConfig) -> None:
    """Paths exist and each model is the kind its flag asks for, before any engine starts
    (a value model passed as --policy would otherwise crash inside vLLM, and a policy passed
    as --value-model would be refused only after the policy engine had loaded)."""
    from vgs.modeling import ARCHITECTURE
    from vgs.engine import check_model_path

    check_model_path(cfg.policy)
    policy = _local_config(cfg.policy)
    if policy is not None:
        archs = policy.get("architectures") or []
        if ARCHITECTURE in archs:
            raise VGSError(f"--policy {cfg.policy!r} is a value model ({ARCHITECTURE}); pass a causal LM as "
                           "--policy and the value model as --value-model")
        if archs and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in archs):
            raise VGSError(f"--policy {cfg.policy!r} is not a causal language model (architectures {archs})")
    if cfg.tokenizer:
        check_model_path(cfg.tokenizer)
    m = get_method(cfg.search.method)
    if cfg.value_model and (m.needs_scorer or m.needs_guidance_model):
        check_model_path(cfg.value_model)
        value = _local_config(cfg.value_model)
        if value is not None:
            from vgs.value import check_value_config

            check_value_config(value, cfg.value_model)


def check_out_dir(out: str) -> None:
    """--out can be created and written (one line instead of a traceback at the first write)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise VGSError(f"--out {out!r} cannot be created: {exc.strerror or exc}") from None
    if not os.path.isdir(out):
        raise VGSError(f"--out {out!r} is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise VGSError(f"--out {out!r} is not writable")


def shard_of(benchmark: str, index: int, repetition: int, num_shards: int) -> int:
    """The shard of the item (problem `index` of `benchmark`, `repetition`): round-robin over
    problems and repetitions, rotated per benchmark. Deterministic, disjoint and balanced,
    and unchanged by --limit, --repetitions or the benchmark list, so a shard directory can be
    resumed or extended without an item moving to another shard."""
    from vgs.search import derive_seed

    return (index + repetition + derive_seed("shard", benchmark)) % num_shards


# ----------------------------------------------------------------------------- results file

class ResultsFile:
    """Append-only JSONL of finished work items, tolerant of a torn last line.

    Only the resume keys live in memory (a row holds up to megabytes of text at large
    budgets); rows are streamed back from disk by `iter_rows` when a summary is made."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "samples.jsonl")
        self._done: set[tuple[str, str, int]] = set()
        if os.path.exists(self.path):
            self._drop_torn_tail()
            for row in self.iter_rows(light=True):
                self._done.add(self.key(row["benchmark"], row["problem_id"], row["repetition"]))

    def _drop_torn_tail(self) -> None:
        """Cut a last line left incomplete by a kill mid-write (reads only the file's tail)."""
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            pos = size
            while pos > 0:
                step = min(1 << 16, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = pos - step + nl + 1
                    break
                pos -= step
            else:
                keep = 0
            if keep != size:
                f.truncate(keep)

    @staticmethod
    def key(benchmark: str, problem_id: str, repetition: int) -> tuple[str, str, int]:
        return (benchmark, str(problem_id), int(repetition))

    def done(self) -> set[tuple[str, str, int]]:
        return set(self._done)

    def iter_rows(self, light: bool = False) -> Iterator[dict]:
        """Rows in file order; `light` drops generated texts and traces (what summaries,
        curves and resume never read)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if light:
                    row.pop("trace", None)
                    for smp in row.get("samples", ()):
                        smp.pop("text", None)
                yield row

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self._done.add(self.key(r["benchmark"], r["problem_id"], r["repetition"]))


def check_config(out_dir: str, cfg: EvalConfig) -> None:
    """Write config.json on the first run; refuse a re-run whose results would differ, or
    that would do another shard's items in this directory."""
    path = os.path.join(out_dir, "config.json")
    fp = cfg.fingerprint()
    shard = {"num_shards": cfg.num_shards, "shard_index": cfg.shard_index}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        old = saved.get("fingerprint")
        old_shard = saved.get("shard", {"num_shards": 1, "shard_index": 0})
        if old_shard != shard:
            raise VGSError(f"{out_dir} holds shard {old_shard['shard_index']} of {old_shard['num_shards']}, not "
                           f"shard {cfg.shard_index} of {cfg.num_shards}; give each shard its own --out")
        if old != json.loads(json.dumps(fp)):
            diffs = [k for k in sorted(set(old or {}) | set(fp)) if (old or {}).get(k) != json.loads(json.dumps(fp)).get(k)]
            raise VGSError(f"{out_dir} holds results of a different configuration (differs in: {', '.join(diffs)}); "
                           "use another --out or the same settings")
        return
    tmp = path + ".tmp"
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fp, "shard": shard, "benchmarks": cfg.benchmarks, "argv": sys.argv}, f,
                      indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        raise VGSError(f"cannot write {path}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- evaluation

@dataclass
class WorkItem:
    problem: Problem
    repetition: int
    seed: int


def build_engines(cfg: EvalConfig):
    """Policy engine first, then the value scorer (`vgs.runtime.build_engines`)."""
    from vgs.runtime import build_engines as build

    policy_kw = dict(cfg.policy_engine)
    if cfg.search.method in ("qsharp", "cd") and policy_kw.get("guidance_kv_gib") is None:
        from vgs.engine import on_cpu
        from vgs.guidance.budget import default_budget_gib

        # counted against the policy's memory split on a GPU (vgs.engine.guidance_budget)
        policy_kw["guidance_kv_gib"] = default_budget_gib("cpu" if on_cpu() else "cuda")
    return build(EngineConfig(model=cfg.policy, tokenizer=cfg.tokenizer, seed=cfg.sampling.seed, **policy_kw),
                 cfg.value_model, needs_scorer=get_method(cfg.search.method).needs_scorer,
                 value_backend=cfg.value_backend, value_engine=cfg.value_engine)


# `run_eval` gets its engines from the module's `build_engines`. Engines the real builder started
# are run_eval's to close; a substituted builder (tests lend the session's running engines)
# keeps them open for their owner.
_OWN_BUILDER = build_engines


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
                     bar: Any, failed: list[str]) -> None:
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
        if res.error is not None:  # not a result (e.g. guidance memory): left out, retried by a re-run
            failed.append(res.error)
            bar.write(f"[vgs eval] {item.problem.benchmark} problem {item.problem.id} repetition "
                      f"{item.repetition} failed: {res.error}", file=sys.stderr)
            bar.update(1)
            return
        row = await asyncio.to_thread(grade_row, item, res, tok, grader, cfg.search.method, cfg.save_text)
        row["prompt_tokens"] = len(prompt)
        results_file.append([row])
        bar.update(1)

    await gather_or_cancel(*(one(it) for it in todo))


def run_eval(cfg: EvalConfig) -> "Any":
    """Run (or resume) an evaluation; returns the summary DataFrame."""
    from tqdm import tqdm

    from vgs.eval.report import budget_curve, format_table, plot_accuracy_vs_budget, sort_rows, summarize
    from vgs.search import derive_seed

    cfg.validate()
    problems = {b: load_benchmark(b, cfg.data_dir, cfg.limit) for b in cfg.benchmarks}
    check_config(cfg.out, cfg)
    results_file = ResultsFile(cfg.out)
    done = results_file.done()
    mine = [(p, r) for r in range(cfg.repetitions) for b in cfg.benchmarks for idx, p in enumerate(problems[b])
            if shard_of(b, idx, r, cfg.num_shards) == cfg.shard_index]
    todo = [WorkItem(p, r, derive_seed(cfg.sampling.seed, p.benchmark, p.id, r))
            for p, r in mine if ResultsFile.key(p.benchmark, p.id, r) not in done]
    total = len(mine)
    failed: list[str] = []
    if cfg.num_shards > 1:
        print(f"[vgs eval] shard {cfg.shard_index} of {cfg.num_shards}: {total} items", file=sys.stderr)
    if todo:
        print(f"[vgs eval] {len(todo)} of {total} problem×repetition items to run "
              f"({total - len(todo)} already in {results_file.path})", file=sys.stderr)
        owned = build_engines is _OWN_BUILDER
        engines = build_engines(cfg)
        from vgs.aio import run_sync
        from vgs.grading import Grader
        from vgs.runtime import close_engines

        try:
            with Grader() as grader, tqdm(total=total, initial=total - len(todo), desc="problems", unit="prob") as bar:
                run_sync(_run_items(cfg, todo, engines, grader, results_file, bar, failed))
        finally:  # shut down here, not in interpreter teardown (EngineDeadError noise, leaked memory)
            if owned:
                close_engines(engines)
    else:
        print(f"[vgs eval] all {total} items already in {results_file.path}; nothing to generate", file=sys.stderr)

    if failed:
        print(f"[vgs eval] {len(failed)} item(s) failed and are not in the results (re-run the same command to "
              f"retry them): {failed[0]}", file=sys.stderr)
    wanted = {ResultsFile.key(p.benchmark, p.id, r) for p, r in mine}
    rows = sort_rows([r for r in results_file.iter_rows(light=True)
                      if ResultsFile.key(r["benchmark"], r["problem_id"], r["repetition"]) in wanted], cfg.benchmarks)
    if not rows:
        print("[vgs eval] no results yet for these items", file=sys.stderr)
        return None
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
    g.add_argument("--guidance-kv-gib", type=float, default=None,
                   help="qsharp/cd: value-model KV budget inside the policy worker (GPU default 8, CPU 0.5; "
                        "taken out of the policy's --gpu-memory-utilization share)")
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
    p.add_argument("--budget", type=int, default=None, help="[16] VGS: blocks sampled per round per tree (N); budget x trees is "
                        "comparable to --n (equal total generations; the defaults match)")
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
                                                    "back to the copy shipped in vgs/data/benchmarks)")
    p.add_argument("--limit", type=int, default=None, help="first K problems of each benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="problems in flight at most (each is saved as it finishes)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="live sequences in flight at most, over all problems (default: what the policy KV cache "
                        "holds at full length)")
    p.add_argument("--prompt-template", default=DEFAULT_USER_TEMPLATE)
    p.add_argument("--no-save-text", dest="save_text", action="store_false", help="store token counts, not texts")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the (problem, repetition) items into K disjoint shards (one per machine / job)")
    p.add_argument("--shard-index", type=int, default=0,
                   help="which shard this run does (0..K-1); merge the shard --out dirs with `vgs report`")
    p.add_argument("--verbose", action="store_true", help="show vLLM's INFO/WARNING logs (default: errors only)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="vLLM data-parallel replicas of the policy engine within this node (across machines "
                        "use --num-shards)")
    add_engine_args(p)
    p.set_defaults(func=run_cli)


def engine_kwargs(args: argparse.Namespace, value: bool) -> dict[str, Any]:
    kv = args.value_kv_cache_gib if value else args.kv_cache_gib
    util = args.value_gpu_memory_utilization if value else args.gpu_memory_utilization
    kw: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len,
                          "tensor_parallel_size": args.tensor_parallel_size, "enforce_eager": args.enforce_eager}
    dp = getattr(args, "data_parallel_size", 1)
    if not value and dp != 1:
        kw["data_parallel_size"] = dp
    if not value and getattr(args, "guidance_kv_gib", None) is not None:
        kw["guidance_kv_gib"] = args.guidance_kv_gib
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
                      policy_engine=engine_kwargs(args, value=False), value_engine=engine_kwargs(args, value=True),
                      num_shards=args.num_shards, shard_index=args.shard_index)


def quiet_logs(verbose: bool) -> None:
    """Engine logs at ERROR unless --verbose: vLLM prints ~50 INFO/WARNING lines around the
    progress bar otherwise. Set in the environment before vLLM is imported, so the engine
    processes (spawned, reading VLLM_LOGGING_LEVEL at import) inherit it; an explicit
    VLLM_LOGGING_LEVEL from the user wins."""
    import logging

    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    level = getattr(logging, os.environ["VLLM_LOGGING_LEVEL"].upper(), logging.ERROR)
    logging.getLogger("vllm").setLevel(level)  # in case vLLM was imported already


def run_cli(args: argparse.Namespace) -> int:
    quiet_logs(args.verbose)
    run_eval(config_from_args(args))
    return 0
