"""Streamed text deltas (`vgs.server.textstream`): fed one token at a time, they concatenate
to the non-streamed text, cut at the first stop string, and never split a character."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("stops", [[], ["stop"], ["ld 你"], ["zzz", "ö"]])
def test_deltas_concatenate_to_the_cut_text(tokenizer_dir, stops):
    from vgs.prompts import decode, load_tokenizer
    from vgs.server.textstream import TextStream

    tok = load_tokenizer(tokenizer_dir)
    ids = tok("héllo wörld 你好 stop here and more", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok, stops)
    pieces = [ts.feed([t], i == len(ids) - 1) for i, t in enumerate(ids)]
    full = decode(tok, ids)
    cut = min((full.find(s) for s in stops if s in full), default=-1)
    assert "".join(pieces) == (full[:cut] if cut >= 0 else full)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1


def test_random_ids_stream_exactly(tokenizer_dir):
    """Arbitrary ids (byte tokens that split characters, invalid sequences) over many tokens:
    the incremental decode still concatenates to the full decode."""
    import random

    from vgs.prompts import decode, load_tokenizer
    from vgs.server.textstream import TextStream

    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(0)
    for stops in ([], ["e t"]):
        ids = [rng.randrange(0, 151000) for _ in range(300)] + tok("a line t e tail", add_special_tokens=False)["input_ids"]
        ts = TextStream(tok, stops)
        out = "".join(ts.feed(ids[i:i + 2], i + 2 >= len(ids)) for i in range(0, len(ids), 2))
        full = decode(tok, ids)
        cut = min((full.find(s) for s in stops if s in full), default=-1)
        assert out == (full[:cut] if cut >= 0 else full)
