"""One table of the speed goals from the JSON results the speed scripts wrote with `--out DIR`.

    python -m benchmarks.summary [DIR]        # default: bench-results

Each row: script, the goal metric (its final line), the median ratio, the spread of the
per-alternation ratios, the number of alternations, the goal, and the load average when
the script started (the numbers are ratios of arms alternated in one process; on a loaded
machine absolute times mean little). `make bench` prints it last.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ORDER = ("value_scoring", "search_overhead", "qsharp_overhead", "server_load")


def load(folder: Path) -> list[dict]:
    found = {p.stem: p for p in folder.glob("*.json")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    out = []
    for name in names:
        with open(found[name]) as f:
            out.append(json.load(f))
    return out


def goal_met(value: float, goal: str) -> str:
    """'yes' / 'no' for a goal written `<= X` or `>= X ...`; '?' for anything else."""
    m = re.match(r"\s*(<=|>=)\s*([0-9.]+)", goal or "")
    if not m:
        return "?"
    ok = value <= float(m.group(2)) if m.group(1) == "<=" else value >= float(m.group(2))
    return "yes" if ok else "no"


def rows(results: list[dict]) -> list[dict]:
    table = []
    for r in results:
        reps = len({rec.get("rep") for rec in r.get("records", [])})
        lo, hi = r.get("ratio_min"), r.get("ratio_max")
        table.append({"script": r["script"], "metric": r["metric"], "median": f"{r['value']:.3f}",
                      "spread": f"{lo:.3f} .. {hi:.3f}" if lo is not None else "-", "alternations": reps,
                      "goal": r.get("goal", ""), "met": goal_met(r["value"], r.get("goal", "")), "load_1m": (r.get("machine") or {}).get("load_avg_1m")})
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "bench-results")
    results = load(folder) if folder.is_dir() else []
    if not results:
        print(f"no results in {folder}/ (run the speed scripts with --out {folder})", file=sys.stderr)
        return 1
    import pandas as pd

    machine = results[0].get("machine") or {}
    print(f"machine: {machine.get('cpu')}, {machine.get('usable_cores')} cores, torch threads "
          f"{machine.get('torch_threads')}, vLLM worker {machine.get('vllm_worker_threads')}")
    print(pd.DataFrame(rows(results)).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
