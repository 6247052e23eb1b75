"""`vgs eval --method vgs` end to end through real vLLM (policy + pooling value engine in one
process), and resume."""

from __future__ import annotations

import json

import pytest

import vgs.eval.runner as runner
from vgs.eval.runner import EvalConfig, run_eval
from vgs.config import SamplingConfig, SearchConfig
from vgs.search import Engines

pytestmark = pytest.mark.vllm


def test_vgs_eval_end_to_end(policy_engine, vllm_value_scorer, tiny_policy, tiny_value, data_dir, tmp_path,
                             monkeypatch):
    built = []

    def shared_engines(cfg):  # reuse the session's engines instead of starting new ones
        built.append(cfg)
        return Engines(policy=policy_engine, value=vllm_value_scorer, value_model=tiny_value)

    monkeypatch.setattr(runner, "build_engines", shared_engines)
    cfg = EvalConfig(benchmarks=["aime24", "hmmt_feb25"], policy=tiny_policy, value_model=tiny_value,
                     out=str(tmp_path / "vgs"), data_dir=data_dir, limit=3, batch_size=4,
                     search=SearchConfig(method="vgs", budget=4, beam_width=2, block_size=64, trees=2),
                     sampling=SamplingConfig(max_tokens=160, temperature=1.0, top_p=1.0, seed=3))
    summary = run_eval(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "vgs" / "samples.jsonl")]
    assert len(rows) == 6 and len(built) == 1
    for r in rows:
        assert r["method"] == "vgs" and len(r["samples"]) == 2 * 2  # B = 4/2 beams × 2 trees
        assert {s["tree"] for s in r["samples"]} == {0, 1}
        assert all(0.0 <= s["value"] <= 1.0 for s in r["samples"])
        assert all(s["num_tokens"] <= 160 for s in r["samples"])
        # the row's verdict is the weighted vote, recomputed here from the stored samples: sum
        # the values per answer class; the heaviest class (ties: the mean over tied classes) decides
        weight: dict = {}
        members: dict = {}
        for smp in r["samples"]:
            weight[smp["class"]] = weight.get(smp["class"], 0.0) + smp["value"]
            members.setdefault(smp["class"], []).append(bool(smp["correct"]))
        tied = [c for c, w in weight.items() if w >= max(weight.values()) - 1e-12]
        expected = sum(sum(members[c]) / len(members[c]) for c in tied) / len(tied)
        assert r["correct"] == pytest.approx(expected)
        # best-of-n: the correctness of the first highest-valued sample
        values = [smp["value"] for smp in r["samples"]]
        assert r["metrics"]["bon"] == float(r["samples"][values.index(max(values))]["correct"])
        # rounds of 64, 64, 32 tokens; the value model computed fewer tokens than it was given
        comp = r["compute"]
        scored = sum(le + r["prompt_tokens"] for t in r["trace"] for le in t["lengths"])
        assert 0 < comp["value_tokens"] < scored
        assert comp["value_flops"] > 0 and comp["policy_flops"] > 0
        # prefill counts what the policy actually computed: less than the requests' full
        # prompts (prompt + the beam so far: 64 tokens per earlier round), as the prefix cache
        # serves full 128-token blocks of earlier rounds
        sent = sum(t["active"] * (r["prompt_tokens"] + 64 * t["round"]) for t in r["trace"])
        assert 0 < comp["prefill_tokens"] < sent
        assert comp["policy_flops"] == 2.0 * comp["policy_params"] * (comp["policy_tokens"] + comp["prefill_tokens"])
        # the final weight of each beam is one of the values its tree's last round computed
        for smp in r["samples"]:
            assert any(smp["value"] == pytest.approx(v, abs=1e-6) for t in r["trace"] if t["tree"] == smp["tree"]
                       for v in t["values"])
    assert set(summary["benchmark"]) == {"aime24", "hmmt_feb25", "average"}

    # resume: nothing left to do, no engine built, same file
    before = (tmp_path / "vgs" / "samples.jsonl").read_bytes()
    run_eval(cfg)
    assert len(built) == 1 and (tmp_path / "vgs" / "samples.jsonl").read_bytes() == before
