"""The analytic FLOP counts behind the value-scoring benchmark's `flop_bound`."""

from benchmarks.flops import ModelShape, Work, reprefill_work, reuse_work

SHAPE = ModelShape(layers=2, hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=512, labels=3)


def test_per_token_and_pair_match_hand_count():
    # q/k/v: 128x(128+64+64), o: 128x128, mlp: 3x128x512; x2 FLOPs per MAC, x2 layers
    assert SHAPE.per_token == 2 * 2 * (128 * 256 + 128 * 128 + 3 * 128 * 512)
    assert SHAPE.per_pair == 2 * 2 * 2 * 2 * 64
    assert SHAPE.per_head_call == 2 * 128 * 131


def test_reprefill_counts_every_position_causally():
    w = reprefill_work([[1, 2, 3], [1, 2, 3, 4]])
    assert w == Work(tokens=7, pairs=6 + 10, head_calls=7)


def test_reuse_counts_each_distinct_prefix_once():
    # shared prompt [1, 2]; siblings [1,2,3] and [1,2,4]; extension [1,2,3,5]; a repeat is free
    w = reuse_work([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5], [1, 2, 4]])
    assert w.tokens == 2 + 1 + 1 + 1
    assert w.pairs == (1 + 2) + 3 + 3 + 4
    assert w.head_calls == 3


def test_reuse_never_exceeds_reprefill():
    seqs = [[7] * 10 + [i] * 5 for i in range(4)]
    assert SHAPE.flops(reuse_work(seqs)) < SHAPE.flops(reprefill_work(seqs))
    assert 0 < SHAPE.attention_share(reuse_work(seqs)) < 1


def test_from_config_reads_published_keys():
    cfg = {"hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
           "num_hidden_layers": 28, "intermediate_size": 8960, "num_labels": 3}
    s = ModelShape.from_config(cfg)
    assert (s.head_dim, s.kv_heads, s.labels) == (128, 2, 3)


# ---------------------------------------------------------------------------------------
# The shared timing helpers of the speed scripts (benchmarks/common.py, benchmarks/summary.py)
# ---------------------------------------------------------------------------------------

def _runs():
    from benchmarks.common import Runs

    runs = Runs()
    for rep, (a, b) in enumerate([(2.0, 1.0), (9.0, 1.5), (3.0, 1.2)]):  # one slow outlier for arm a
        runs.add("a", rep, ms=a)
        runs.add("b", rep, ms=b)
    return runs


def test_ratio_is_of_medians_and_spread_is_per_alternation():
    runs = _runs()
    assert runs.median("a", "ms") == 3.0 and runs.median("b", "ms") == 1.2
    assert runs.ratio("a", "b", "ms") == 3.0 / 1.2  # the outlier does not move the median
    lo, hi = runs.ratio_spread("a", "b", "ms")
    assert (lo, hi) == (2.0, 6.0)
    table = runs.spread("ms")
    assert list(table["median_ms"]) == [3.0, 1.2] and list(table["max_ms"]) == [9.0, 1.5]


def test_alternate_runs_arms_in_turn():
    from benchmarks.common import alternate

    order = []
    runs = alternate({"x": lambda rep: order.append(("x", rep)) or {"v": rep},
                      "y": lambda rep: order.append(("y", rep)) or {"v": 10 + rep}}, 2)
    assert order == [("x", 0), ("y", 0), ("x", 1), ("y", 1)]
    assert runs.values("y", "v") == [10.0, 11.0]


def test_alternate_warm_up_runs_every_arm_first_and_is_not_recorded():
    from benchmarks.common import alternate

    order = []
    runs = alternate({"x": lambda rep: order.append(("x", rep)) or {"v": 100 if rep < 0 else rep},
                      "y": lambda rep: order.append(("y", rep)) or {"v": 100 if rep < 0 else 10 + rep}}, 2, warmup=1)
    assert order == [("x", -1), ("y", -1), ("x", 0), ("y", 0), ("x", 1), ("y", 1)]
    assert runs.values("x", "v") == [0.0, 1.0] and runs.median("y", "v") == 10.5  # the slow warm-up is not counted


def test_result_json_feeds_the_summary(tmp_path, capsys):
    from benchmarks import summary
    from benchmarks.common import machine_info, write_result

    runs = _runs()
    write_result(str(tmp_path), "search_overhead", "vgs_over_sampling_per_token", runs.ratio("a", "b", "ms"),
                 goal="<= 1.15", spread=runs.ratio_spread("a", "b", "ms"), runs=runs, machine=machine_info())
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "vgs_over_sampling_per_token: 2.500"  # the final line is the median ratio
    assert summary.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "search_overhead" in table and "2.500" in table and "2.000 .. 6.000" in table and "<= 1.15" in table
    assert table.splitlines()[-1].split()[-2] == "no"  # 2.5 misses <= 1.15
    assert summary.main([str(tmp_path / "missing")]) == 1
