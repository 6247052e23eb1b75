"""The demo world as the toolkit's integration test: the shipped policy/value pair loads
through the real engines, and value-guided selection beats random selection on held-out
problems (the smaller setting of `make demo`)."""

from __future__ import annotations

import random

import pytest

from benchmarks.demo_world import POLICY_DIR, VALUE_DIR, task


def test_splits_are_fixed_and_disjoint():
    train = task.make_split("train", 500, seed=3)
    held = task.make_split("heldout", 200, seed=3)
    assert train == task.make_split("train", 500, seed=3)
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert all(task.split_of(p.problem) == "heldout" for p in held)
    for p in held[:50]:
        assert str(task.parse(p.problem).answer()) == p.answer


def test_error_model_has_systematic_and_random_errors():
    """Line 1's result is carried to line 2 as its look-alike more often than not (one fixed
    wrong value, so majority voting cannot fix it); other steps go wrong rarely and at random."""
    chain = task.parse(task.make_split("train", 1, seed=0)[0].problem)
    first = task.apply(chain.steps[0][0], chain.start, chain.steps[0][1])
    rng = random.Random(0)
    samples = [task.solution(chain, rng).split("\n") for _ in range(400)]
    misread = sum(s[1].startswith(str(task.MISREAD[first])) for s in samples) / 400
    assert 0.5 < misread < 0.7
    right = task.solution(chain).split("\n")
    assert 0.9 < sum(s[0] == right[0] for s in samples) / 400 < 1.0  # random errors only
    assert task.first_wrong_step(chain.text, task.solution(chain)) is None
    right[1] = str(task.MISREAD[first]) + right[1][1:]
    assert task.first_wrong_step(chain.text, "\n".join(right)) == 1
    assert sorted(task.MISREAD) == sorted(task.MISREAD.values()) == list(range(10))
    assert all(task.MISREAD[d] != d for d in range(10))


def test_tokenizer_round_trip_and_step_blocks():
    from transformers import AutoTokenizer

    from benchmarks.demo_world.__main__ import BLOCK
    from vgs.grading import extract_answer
    from vgs.prompts import decode, prompt_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(str(POLICY_DIR))
    p = task.make_split("heldout", 1, seed=0)[0]
    ids = prompt_ids(tok, p.problem)
    assert decode(tok, ids) == render_prompt(tok, p.problem)
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    sol = task.solution(task.parse(p.problem))
    sol_ids = tok(sol, add_special_tokens=False)["input_ids"]
    assert len(tok(sol.split("\n")[0] + "\n", add_special_tokens=False)["input_ids"]) == BLOCK
    assert extract_answer(decode(tok, ids + sol_ids + [tok.eos_token_id])) == p.answer


def test_deepen_starts_as_the_same_model_and_checker_traces_are_correct(tmp_path):
    """`policy.deepen` (a deeper value-model init) computes exactly what its source does until
    trained; `errors=False` trains on the correct solutions (the checker LM of docs/demo_world.md)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from benchmarks.demo_world.policy import _example, deepen

    deepen(str(POLICY_DIR), str(tmp_path / "deep"), 2)
    src = Qwen2ForCausalLM.from_pretrained(str(POLICY_DIR))
    deep = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "deep"))
    assert deep.config.num_hidden_layers == src.config.num_hidden_layers + 2
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "deep"))
    chain = task.parse(task.make_split("train", 1, seed=0)[0].problem)
    ids, plen = _example(tok, chain, random.Random(0), errors=False)
    with torch.no_grad():
        assert torch.equal(src(torch.tensor([ids])).logits, deep(torch.tensor([ids])).logits)
    assert tok.decode(ids[plen:-1]) == task.solution(chain)


def _row(pid: str, samples: list[tuple[str, bool, float, int]]) -> dict:
    """A graded row as `grade_row` writes it: (answer, correct, value, tree) per sample."""
    classes = {a: i for i, a in enumerate(dict.fromkeys(a for a, _, _, _ in samples))}
    return {"problem_id": pid, "samples": [{"answer": a, "correct": c, "value": v, "tree": t, "class": classes[a]}
                                           for a, c, v, t in samples]}


def test_tree_pooling_and_subsets_on_known_rows():
    """Budgets below N come from subsets of the stored runs; each number here is worked out by hand."""
    from benchmarks.demo_world import analysis

    # 4 trees x 2 beams; trees 0 and 1 lean to the wrong "3", trees 2 and 3 end on the right "5"
    row = _row("p", [("3", False, 0.9, 0), ("3", False, 0.8, 0), ("3", False, 0.7, 1), ("5", True, 0.1, 1),
                     ("5", True, 0.7, 2), ("5", True, 0.7, 2), ("5", True, 0.5, 3), ("5", True, 0.5, 3)])
    assert analysis.first_trees(row, 1) == 0.0  # tree 0 alone: "3"
    assert analysis.first_trees(row, 2) == 0.0  # "3" 2.4 vs "5" 0.1
    assert analysis.first_trees(row, 4) == 1.0  # "3" 2.4 vs "5" 2.5
    assert analysis.tree_subsets(row, 1) == 0.5  # trees 2 and 3 right, 0 and 1 wrong
    # pairs: {0,1} wrong; {0,2} 1.7 vs 1.4 wrong; {0,3} 1.7 vs 1.0 wrong; {1,2}, {1,3}, {2,3} right
    assert analysis.tree_subsets(row, 2) == 0.5
    assert analysis.tree_subsets(row, 4) == 1.0
    samples = _row("q", [("1", True, 0.2, 0), ("2", False, 0.9, 0), ("2", False, 0.1, 0), ("1", True, 0.3, 0)])
    assert analysis.sample_subsets(samples, 4, "maj") == 0.5  # a 2-2 tie: expected accuracy 1/2
    assert analysis.sample_subsets(samples, 4, "wmaj") == 0.0  # 1.0 vs 0.5
    assert analysis.sample_subsets(samples, 4, "bon") == 0.0
    assert 0.0 < analysis.sample_subsets(samples, 2, "maj") < 1.0
    m, h = analysis.paired([1, 1, 0, 1], [0, 1, 0, 0])
    assert m == 50.0 and abs(h - 100 * 1.96 * (1 / 3) ** 0.5 / 2) < 1e-9
    assert analysis.budgets(16) == [2, 4, 8, 16]


def test_cli_bad_arguments_exit_2(capsys):
    from benchmarks.demo_world.__main__ import main

    for argv, msg in ((["--n", "6"], "--n must be a power of two"), (["--seeds", "0"], "--seeds must be >= 1"),
                      (["--blocks", "6,x"], "--blocks must be comma-separated"), (["--blocks", "6,6"], "distinct"),
                      (["--value-model", "/nonexistent"], "demo value model missing")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("demo_world: error: ") and msg in err and err.count("\n") == 1, err


def test_problem_sets_are_disjoint_across_seeds():
    from benchmarks.demo_world.__main__ import problem_sets

    sets = problem_sets("heldout", [10, 11, 12], 300)
    texts = [p.problem for s in sets.values() for p in s]
    assert len(texts) == len(set(texts)) == 900
    assert sets[10] == task.make_split("heldout", 300, seed=10)
    assert all(task.split_of(t) == "heldout" for t in texts)


@pytest.fixture(scope="module")
def demo_engines():
    """The shipped pair behind the real engines: vLLM policy, transformers value scorer (no
    second vLLM engine: the value model is tiny)."""
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.value import make_value_scorer

    policy = PolicyEngine(EngineConfig(model=str(POLICY_DIR), kv_cache_gib=0.25, max_model_len=256))
    try:
        yield Engines(policy=policy, value=make_value_scorer(str(VALUE_DIR), backend="hf"), value_model=str(VALUE_DIR))
    finally:
        policy.close()


def _accuracy(engines, search, problems, metric: str) -> float:
    from benchmarks.demo_world.__main__ import MAX_TOKENS
    from vgs.eval.runner import WorkItem, grade_results
    from vgs.config import SamplingConfig
    from vgs.grading import Grader
    from vgs.prompts import prompt_ids
    from vgs.search import derive_seed, run_search

    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=0)
    tok = engines.policy.tokenizer
    items = [WorkItem(p, 0, derive_seed(0, p.id)) for p in problems]
    results = run_search([prompt_ids(tok, p.problem) for p in problems], [it.seed for it in items], engines,
                         search.validate(), sampling)
    with Grader() as grader:
        rows = grade_results(items, results, tok, grader, search.method, save_text=False)
    return sum(r["metrics"][metric] for r in rows) / len(rows)


@pytest.mark.vllm
def test_shipped_policy_solves_part_of_the_held_out_split(demo_engines):
    """The shipped policy loads in vLLM with its own tokenizer and writes graded solutions:
    right part of the time (the world is built so that search has something to fix)."""
    from vgs.config import SearchConfig

    problems = task.make_split("heldout", 40, seed=1)
    pass1 = _accuracy(demo_engines, SearchConfig(method="majority", n=4), problems, "pass1")
    assert 0.2 < pass1 < 0.9, pass1


@pytest.mark.vllm
def test_value_guided_selection_beats_random_selection(demo_engines):
    """VGS with the shipped value model choosing the beams vs the same search choosing them at
    random (same seeds, same budget 16, 60 held-out problems of seed 1, which the report does not
    use; the previous pair measured 65.0% vs 56.7%, the rebuilt one passes too). The pair of the
    earlier world design (value AUC 0.59) did not pass this."""
    from benchmarks.demo_world.__main__ import vgs_config

    problems = task.make_split("heldout", 60, seed=1)
    acc = {}
    for sel in ("global", "random"):
        search = vgs_config(16)
        search.selection = sel
        acc[sel] = _accuracy(demo_engines, search, problems, "wmaj")
    assert acc["global"] >= acc["random"] + 0.05, acc
