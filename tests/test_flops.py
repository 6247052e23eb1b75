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
