"""The policy's own tokenizer: a small byte-level BPE in the Qwen2 format.

Why Qwen2's format: transformers 5 loads the tokenizer of every `model_type: qwen2` directory
as `Qwen2Tokenizer`, which rebuilds its pre-tokenizer (digits one by one, punctuation runs,
newlines) and byte-level decoder around the saved vocabulary and merges, whatever the
tokenizer.json says. So the vocabulary here is built for that pipeline: all 256 byte symbols
plus merges for the words of the prompts, and nothing else. Then a step line ``7+5=2`` plus
its newline is exactly 6 tokens (the VGS block size of one step), and training, vLLM and the
evaluation all see the same ids. The chat template is a minimal user/assistant one; the
assistant turn ends with `<|end|>`, the EOS.
"""

from __future__ import annotations

import os

from vgs.prompts import DEFAULT_USER_TEMPLATE

PAD, USER, ASSISTANT, EOS = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS = (PAD, USER, ASSISTANT, EOS)
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% else %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
# text whose words get their own tokens (everything else is one token per byte)
CORPUS = DEFAULT_USER_TEMPLATE.format(problem="7 +5 *3 -4 (mod 10)") + "\n\\boxed{6} +5 -4 *3"


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable symbol map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, the 256 byte symbols, then one merge chain per multi-byte piece of CORPUS
    (as Qwen2's pre-tokenizer cuts it)."""
    import regex

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    sym = _byte_symbols()
    vocab: dict[str, int] = {}
    for t in list(SPECIALS) + [sym[b] for b in range(256)]:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for piece in regex.findall(PRETOKENIZE_REGEX, CORPUS):
        s = "".join(sym[b] for b in piece.encode())
        cur = s[0]
        for ch in s[1:]:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = len(vocab)
            cur += ch
    return vocab, merges


def build_tokenizer(out_dir: str):
    """Write the tokenizer files into `out_dir` and return the tokenizer as loaded back from
    them (so callers use exactly what vLLM and `AutoTokenizer` will use)."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    vocab, merges = vocab_and_merges()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=EOS, pad_token=PAD,
                         extra_special_tokens=[USER, ASSISTANT],
                         chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=256)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
