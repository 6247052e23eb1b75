"""`vgs serve` speaks OpenAI as vLLM's server does: a real server over real vLLM engines with
the demo-world pair (a policy that answers right about half the time, EOS `<|end|>`; its
value model), driven with the official `openai` client and raw HTTP. One server (and one
engine pair) per module; the robustness tests build extra server states over the same
engines."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from benchmarks.demo_world import POLICY_DIR, VALUE_DIR

pytestmark = pytest.mark.vllm

openai = pytest.importorskip("openai")

MAX_TOKENS = 100  # a demo answer is ~30 tokens and ends with <|end|>; the context is 256
METHODS = {
    "plain": None,
    "sample": {"method": "sample", "n": 2},
    "majority": {"method": "majority", "n": 3},
    "best_of_n": {"method": "best_of_n", "n": 3},
    "weighted_majority": {"method": "weighted_majority", "n": 3},
    "vgs": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 8},
    "qsharp": {"method": "qsharp", "n": 2, "eta": 0.1, "top_k": 4},
    "cd": {"method": "cd", "n": 2, "eta": 0.5, "top_k": 4},
}


@pytest.fixture(scope="module")
def engines():
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.value import VllmValueScorer

    policy = PolicyEngine(EngineConfig(model=str(POLICY_DIR), kv_cache_gib=0.25, max_model_len=256))
    value = None
    try:
        value = VllmValueScorer(EngineConfig(model=str(VALUE_DIR), kv_cache_gib=0.25, max_model_len=256))
        yield Engines(policy, value, str(VALUE_DIR))
    finally:
        if value is not None:
            value.close()
        policy.close()


@contextlib.contextmanager
def served(engines, **kw):
    """A server over `engines` for one test: (state, handle); stopped afterwards."""
    from vgs.server import build_state, start_server

    state = build_state(engines, "demo", max_budget=16, max_sequences=64, **kw)
    handle = start_server(state)
    try:
        yield state, handle
    finally:
        handle.stop()
        state.grader.close()


@pytest.fixture(scope="module")
def server(engines):
    with served(engines) as (state, handle):
        yield f"http://127.0.0.1:{handle.port}", state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok():
    from vgs.prompts import load_tokenizer

    return load_tokenizer(str(POLICY_DIR))


@pytest.fixture(scope="module")
def problems():
    from benchmarks.demo_world.task import make_split

    return make_split("heldout", 3, 0)


def _user(problem) -> str:
    from vgs.prompts import DEFAULT_USER_TEMPLATE

    return DEFAULT_USER_TEMPLATE.format(problem=problem.problem)


def _prompt(tok, problem) -> str:
    from vgs.prompts import render_prompt

    return render_prompt(tok, problem.problem)


def _sse(url: str, body: dict) -> list[dict]:
    """The data events of a streamed request, parsed strictly (NaN is not JSON)."""
    def no_constants(c):
        raise ValueError(f"not JSON: {c}")

    out = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                out.append(json.loads(line[5:], parse_constant=no_constants))
    return out


# ---------------------------------------------------------------------------- text

@pytest.mark.parametrize("method", list(METHODS))
def test_no_special_tokens_in_any_text(server, tok, problems, method):
    """Every method, both endpoints, streamed or not: the text has no special token, although
    the samples end on `<|end|>` (some finish "stop") and `skip_special_tokens: false` shows it."""
    url, _ = server
    extra = {} if METHODS[method] is None else {"search": METHODS[method]}
    specials = tok.all_special_tokens
    assert "<|end|>" in specials
    finishes = []
    for i, p in enumerate(problems[:2]):
        comp = {"prompt": _prompt(tok, p), "max_tokens": MAX_TOKENS, "seed": i, **extra}
        chat = {"messages": [{"role": "user", "content": _user(p)}], "max_tokens": MAX_TOKENS, "seed": i, **extra}
        r = httpx.post(url + "/v1/completions", json=comp, timeout=120).json()
        c = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()
        texts = [r["choices"][0]["text"], c["choices"][0]["message"]["content"]]
        assert "reasoning_content" not in c["choices"][0]["message"]  # this template opens no <think>
        finishes += [r["choices"][0]["finish_reason"], c["choices"][0]["finish_reason"]]
        s_comp = _sse(url + "/v1/completions", {**comp, "stream": True})
        s_chat = _sse(url + "/v1/chat/completions", {**chat, "stream": True})
        texts.append("".join(e["choices"][0]["text"] for e in s_comp if e.get("choices")))
        texts.append("".join(e["choices"][0]["delta"].get("content") or "" for e in s_chat if e.get("choices")))
        assert texts[2] == texts[0] and texts[3] == texts[1]  # streamed = non-streamed (same seed)
        for t in texts:
            assert t and not any(s in t for s in specials), t
        if method not in ("plain", "sample"):  # extraction still reads the answer
            assert r["vgs"]["answer"] is not None and r["vgs"]["answer"] in texts[0]
        kept = httpx.post(url + "/v1/completions", json={**comp, "skip_special_tokens": False}, timeout=120).json()
        if kept["choices"][0]["finish_reason"] == "stop":
            assert kept["choices"][0]["text"].endswith("<|end|>")
            assert kept["choices"][0]["text"][:-len("<|end|>")] == texts[0]
    assert "stop" in finishes  # the EOS was generated, so its absence from the text means something


def _thinking_tiny(tokenizer_dir: str, out: str) -> str:
    """A tiny model on the shipped DeepSeek-R1 tokenizer (`vgs.tiny.make_tiny`) that answers
    ` a</think> a</think> a...`: hidden unit 0 carries the last token's sign (its embedding is
    +-40 there, so it dominates the norm), the final norm keeps only that unit, and only `</think>`
    and ` a` read it: after ` a` (and the prompt's last token) comes `</think>`, after it ` a`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vgs.tiny import make_tiny

    make_tiny("policy", tokenizer_dir, out, layers=2, hidden=128, seed=0, max_positions=4096)
    tok = AutoTokenizer.from_pretrained(out)
    think, word = tok.convert_tokens_to_ids("</think>"), tok(" a", add_special_tokens=False)["input_ids"][0]
    last = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"][-1]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight.detach().clone()
        embed = model.get_input_embeddings().weight.detach().clone()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        head[:, 0] = 0.0
        head[think, 0], head[word, 0] = 40.0, -40.0
        embed[:, 0] = 0.0
        embed[word, 0], embed[think, 0], embed[last, 0] = 40.0, -40.0, -40.0
    model.config.tie_word_embeddings = False
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(embed, freeze=False))
    model.set_output_embeddings(torch.nn.Linear(embed.shape[1], head.shape[0], bias=False))
    model.get_output_embeddings().weight.data.copy_(head)
    model.save_pretrained(out)
    return out


def test_reasoning_split_on_an_r1_template(tokenizer_dir, tmp_path):
    """An R1-style template (it opens `<think>`): the reasoning split is on by default; chat
    answers split at `</think>` into reasoning_content / content as vLLM's deepseek_r1 parser
    does, and the streamed deltas concatenate to the same two fields."""
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.server import build_state, start_server
    from vgs.server.reasoning import split

    engine = PolicyEngine(EngineConfig(model=_thinking_tiny(tokenizer_dir, str(tmp_path / "r1")),
                                       kv_cache_gib=0.25, max_model_len=1024))
    state = build_state(Engines(engine), "r1")
    handle = start_server(state)
    url = f"http://127.0.0.1:{handle.port}/v1"
    try:
        assert state.reasoning  # auto: on for this template
        both = 0
        for seed in range(4):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "seed": seed,
                    "temperature": 1.0}
            msg = httpx.post(url + "/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
            ids = httpx.post(url[:-3] + "/tokenize", json={"messages": body["messages"]}).json()["tokens"]
            raw = httpx.post(url + "/completions", json={"prompt": ids, "max_tokens": 16, "seed": seed,
                                                         "temperature": 1.0},
                             timeout=120).json()["choices"][0]["text"]  # same ids, same seed: the whole text
            assert (msg["reasoning_content"], msg["content"]) == split(raw)
            assert msg["reasoning"] == msg["reasoning_content"]
            both += bool(msg["reasoning_content"] and msg["content"] and "</think>" in raw)
            events = _sse(url + "/chat/completions", {**body, "stream": True})
            deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == (msg["reasoning_content"] or "")
            assert "".join(d.get("content") or "" for d in deltas) == (msg["content"] or "")
            hidden = httpx.post(url + "/chat/completions", json={**body, "include_reasoning": False},
                                timeout=120).json()["choices"][0]["message"]
            assert hidden["content"] == msg["content"] and "reasoning_content" not in hidden
        assert both  # some answers had reasoning and an answer, so the split was exercised
        off = build_state(Engines(engine), "r1", reasoning_parser="none")
        assert not off.reasoning
    finally:
        handle.stop()
        state.grader.close()
        engine.close()


def test_stop_string_ends_the_text(server, tok, problems):
    """Every demo answer writes `=` on its first line, so a stop at `=` always fires: the text
    is the unstopped text cut before it, finish_reason "stop", streamed or not."""
    url, _ = server
    for i, p in enumerate(problems):
        body = {"prompt": _prompt(tok, p), "max_tokens": MAX_TOKENS, "seed": i, "temperature": 1.0}
        base = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert "=" in base, base
        stopped = httpx.post(url + "/v1/completions", json={**body, "stop": ["="]}, timeout=60).json()["choices"][0]
        assert stopped["text"] == base[:base.index("=")] and stopped["finish_reason"] == "stop"
        events = _sse(url + "/v1/completions", {**body, "stop": ["="], "stream": True})
        assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == stopped["text"]


# ---------------------------------------------------------------------------- batch

def test_batch_completions_strings_ids_n_and_search(server, client, tok, problems):
    url, state = server
    texts = [_prompt(tok, p) for p in problems[:2]]
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    kw = dict(model="demo", max_tokens=MAX_TOKENS, n=2, seed=3, temperature=1.0)
    batch = client.completions.create(prompt=texts, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt x n + sample, as vLLM
    singles = [client.completions.create(prompt=t, **kw) for t in texts]
    for p in range(2):
        for j in range(2):
            assert batch.choices[p * 2 + j].text == singles[p].choices[j].text
    assert batch.usage.prompt_tokens == sum(len(i) for i in ids)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]
    one_ids = client.completions.create(prompt=ids[1], **kw)
    assert [c.text for c in one_ids.choices] == [c.text for c in singles[1].choices]
    # a search: one selected completion per prompt, each its own search, run concurrently
    search = {"method": "best_of_n", "n": 3}
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(state.admission.in_use)
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        res = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": MAX_TOKENS, "seed": 4,
                                                        "search": search}, timeout=120).json()
    finally:
        stop.set()
        t.join()
    assert [c["index"] for c in res["choices"]] == [0, 1] and len(res["vgs"]) == 2
    assert max(peak) == 6  # both prompts admitted at once, each as its 3 sequences
    for p in range(2):
        one = httpx.post(url + "/v1/completions", json={"prompt": texts[p], "max_tokens": MAX_TOKENS, "seed": 4,
                                                        "search": search}, timeout=120).json()
        assert res["choices"][p]["text"] == one["choices"][0]["text"]
        assert res["vgs"][p]["answer"] == one["vgs"]["answer"]
        assert [c["value"] for c in res["vgs"][p]["candidates"]] == [c["value"] for c in one["vgs"]["candidates"]]
    for bad in ([], [[]], [1, "a"], [[1], "a"], 5):
        r = httpx.post(url + "/v1/completions", json={"prompt": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (bad, r.text)


# ---------------------------------------------------------------------------- logprobs

@pytest.fixture(scope="module")
def hf_policy():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(POLICY_DIR), dtype=torch.float32).eval()
    return model


def _forward_logprobs(model, ids):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_and_logprobs_equal_the_policy_forward(server, tok, problems, hf_policy):
    """What loglikelihood evaluation sends (`echo`, `logprobs: 1`, `max_tokens` 1 or 0): every
    prompt token's logprob is the policy's own (transformers forward on the same weights)."""
    from benchmarks.demo_world.task import parse, solution

    url, _ = server
    p = problems[0]
    ids = tok(_prompt(tok, p) + solution(parse(p.problem)), add_special_tokens=False)["input_ids"]
    ref = _forward_logprobs(hf_policy, ids)
    r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                  "temperature": 0}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))] + [float(ref[-1].max())]
    got = lp["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (got, want)
    for i in range(1, len(ids)):  # the chosen token plus the best one
        top = lp["top_logprobs"][i]
        assert 1 <= len(top) <= 2 and abs(max(top.values()) - float(ref[i - 1].max())) < 1e-3
    assert r["choices"][0]["text"].startswith(tok.decode(ids))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    zero = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0,
                                                     "temperature": 0}, timeout=60).json()["choices"][0]
    assert zero["text"] == tok.decode(ids) and len(zero["logprobs"]["tokens"]) == len(ids)
    assert zero["logprobs"]["token_logprobs"][1:] == lp["token_logprobs"][1:len(ids)]
    # generated tokens (greedy): the logprobs of what the policy itself picks, completions and chat
    prompt = tok(_prompt(tok, p), add_special_tokens=False)["input_ids"]
    gen = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "logprobs": 3,
                                                    "temperature": 0, "skip_special_tokens": False},
                     timeout=60).json()["choices"][0]
    out = tok(gen["text"], add_special_tokens=False)["input_ids"]
    ref = _forward_logprobs(hf_policy, prompt + out)
    want = [float(ref[len(prompt) + k - 1, t]) for k, t in enumerate(out)]
    assert max(abs(a - b) for a, b in zip(gen["logprobs"]["token_logprobs"], want)) < 1e-3
    assert all(len(t) <= 4 for t in gen["logprobs"]["top_logprobs"])
    chat = httpx.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": _user(p)}], "max_tokens": 12, "logprobs": True, "top_logprobs": 2,
        "temperature": 0}, timeout=60).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(want, abs=1e-3)
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)
    assert all(bytes(c["bytes"]).decode() == c["token"] for c in content)
    # a search has no policy logprobs of its selected text: a 400 that says so
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "logprobs": 1, "search": {"method": "majority",
                                                                                           "n": 2}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "plain sampling" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- tokenize, fields, defaults

def test_tokenize_detokenize_round_trip(server, tok, problems):
    url, state = server
    text = _prompt(tok, problems[0])
    r = httpx.post(url + "/tokenize", json={"model": "demo", "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok(text)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    back = httpx.post(url + "/detokenize", json={"model": "demo", "tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": _user(problems[0])}]}).json()
    assert chat["tokens"] == r["tokens"]  # the chat template renders the same prompt
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": None, "top_k": -1, "min_p": 0,
           "repetition_penalty": 1, "user": "u", "service_tier": "auto", "store": False, "metadata": {},
           "stop_token_ids": [], "ignore_eos": False, "include_stop_str_in_output": False}
NEUTRAL_CHAT = {**NEUTRAL, "tools": [], "tool_choice": "none", "parallel_tool_calls": None, "functions": None,
                "response_format": {"type": "text"}, "modalities": ["text"], "logprobs": False,
                "reasoning_effort": None}


def test_neutral_values_accepted_others_named(server):
    url, _ = server
    ok = httpx.post(url + "/v1/completions", json={"prompt": "1 +2", "max_tokens": 4, "best_of": 1, "suffix": None,
                                                   "echo": False, "logprobs": None, **NEUTRAL}, timeout=60)
    assert ok.status_code == 200, ok.text
    msg = {"role": "user", "content": "1 +2", "tool_calls": [], "name": None}
    ok = httpx.post(url + "/v1/chat/completions", json={"messages": [msg], "max_tokens": 4, **NEUTRAL_CHAT},
                    timeout=60)
    assert ok.status_code == 200, ok.text
    cases = [
        ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not support"),
        ("/v1/completions", {"prompt": "x", "ignore_eos": True}, "ignore_eos", "not support"),
        ("/v1/completions", {"prompt": "x", "best_of": 4}, "best_of", "search"),
        ("/v1/completions", {"prompt": "x", "top_k": 5}, "top_k", "not support"),
        ("/v1/chat/completions", {"messages": [msg], "tools": [{"type": "function"}]}, "tools", "tool calls"),
        ("/v1/chat/completions", {"messages": [msg], "tool_choice": "required"}, "tool_choice", "tool calls"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[1].type", "images are not supported"),
        ("/v1/chat/completions", {"messages": [[msg], [msg]]}, "messages", "batch of conversations"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
         "tool messages"),
        ("/v1/chat/completions", {"messages": [msg], "response_format": {"type": "json_object"}},
         "response_format", "not support"),
        ("/v1/completions", {"prompt": "x", "bogus": 0}, "bogus", "unknown"),
    ]
    for path, body, param, words in cases:
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
        assert "Input should be" not in err["message"]


def test_vllm_defaults(server, client, tok, problems):
    """max_tokens: 16 for completions, the rest of the context for chat; temperature / top_p
    from generation_config.json (the demo policy's sets neither: vLLM's 1.0 / 1.0)."""
    from vgs.server.jobs import Defaults

    url, state = server
    cfg = json.loads((POLICY_DIR / "generation_config.json").read_text())
    assert (state.defaults.temperature, state.defaults.top_p) == (cfg.get("temperature", 1.0), cfg.get("top_p", 1.0))
    assert Defaults.of(state.engines.policy) == state.defaults
    r = client.completions.create(model="demo", prompt=_prompt(tok, problems[0]), seed=0)
    assert r.usage.completion_tokens <= 16 and (r.choices[0].finish_reason == "stop" or r.usage.completion_tokens == 16)
    c = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": _user(problems[0])}], seed=0)
    assert c.usage.completion_tokens > 16 and c.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- robustness

def test_report_kl_in_the_vgs_field(server):
    url, _ = server
    body = {"prompt": "1 +2", "max_tokens": 16, "seed": 0,
            "search": {"method": "qsharp", "n": 2, "eta": 0.5, "top_k": 4, "report_kl": True}}
    info = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["vgs"]
    assert all(isinstance(c["kl"], float) and c["kl"] >= 0 and "kl_t1" in c for c in info["candidates"])
    body["search"]["report_kl"] = False
    info = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["vgs"]
    assert all("kl" not in c for c in info["candidates"])


def test_nan_values_give_valid_json(engines, tmp_path):
    """A value model that outputs NaN (a broken model: the server's fault): a 500 with an
    OpenAI-style body, and a stream whose every event is valid JSON (NaN progress values are
    null), ending in an error event."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vgs.search import Engines
    from vgs.value import HFValueScorer

    nan_dir = tmp_path / "nan_value"
    shutil.copytree(VALUE_DIR, nan_dir)
    weights = load_file(nan_dir / "model.safetensors")
    head = [k for k in weights if "score" in k or "head" in k]
    assert head, list(weights)
    for k in head:
        weights[k] = torch.full_like(weights[k], float("nan"))
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    scorer = HFValueScorer(str(nan_dir), device="cpu", max_model_len=256)
    try:
        with served(Engines(engines.policy, scorer)) as (state, handle):
            url = f"http://127.0.0.1:{handle.port}/v1/completions"
            for method in ("best_of_n", "weighted_majority", "vgs"):
                search = METHODS[method]
                body = {"prompt": "1 +2", "max_tokens": 24, "seed": 0, "search": search}
                r = httpx.post(url, json=body, timeout=120)
                assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
                events = _sse(url, {**body, "stream": True})
                assert events[-1]["error"]["type"] == "internal_error"
                progress = [e["vgs"]["progress"] for e in events if "progress" in e.get("vgs", {})]
                assert all(p["best_value"] is None for p in progress) and (progress or method != "vgs")
    finally:
        scorer.close()


def test_body_limits(engines):
    with served(engines, max_body_bytes=4096) as (state, handle):
        url = f"http://127.0.0.1:{handle.port}/v1/completions"
        r = httpx.post(url, json={"prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        deep = b'{"prompt": "x", "search": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        state.max_body_bytes = 1 << 20
        for body in (deep, b'{"prompt": ' + b"[" * 100 + b"]" * 100 + b"}"):
            r = httpx.post(url, content=body)
            assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
        assert httpx.post(url, json={"prompt": "1 +2", "max_tokens": 2}).status_code == 200


class _FailingScorer:
    """The real scorer, failing as a broken engine would (control flow of server faults)."""

    def __init__(self, real, exc):
        self.real, self.exc = real, exc
        self.max_model_len = real.max_model_len

    async def ascore(self, sequences):
        raise self.exc


def test_server_faults_are_5xx(engines):
    from vgs.errors import VGSError
    from vgs.search import Engines

    for exc in (RuntimeError("boom"), VGSError("the value engine is closed")):
        with served(Engines(engines.policy, _FailingScorer(engines.value, exc))) as (state, handle):
            url = f"http://127.0.0.1:{handle.port}/v1/completions"
            r = httpx.post(url, json={"prompt": "1 +2", "max_tokens": 8, "search": {"method": "best_of_n", "n": 2}},
                           timeout=60)
            assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
            events = _sse(url, {"prompt": "1 +2", "max_tokens": 8, "stream": True,
                                "search": {"method": "best_of_n", "n": 2}})
            assert events[-1]["error"]["type"] == "internal_error"
            text = httpx.get(f"http://127.0.0.1:{handle.port}/metrics").text
            assert 'method="best_of_n",status="500"' in text  # the stream counted as what it was


def test_disconnect_while_queued_frees_its_place(engines):
    from vgs.aio import run_sync

    with served(engines) as (state, handle):
        url = f"http://127.0.0.1:{handle.port}/v1/completions"
        held = run_sync(state.admission.acquire(state.admission.capacity))  # the server is full
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json={"prompt": "1 +2", "max_tokens": 8, "n": 2}, timeout=1.0)
            deadline = time.time() + 5
            while state.admission.queued and time.time() < deadline:
                time.sleep(0.05)
            assert state.admission.queued == 0  # it left the queue although nothing was released
            assert 'status="499"' in httpx.get(f"http://127.0.0.1:{handle.port}/metrics").text
        finally:
            state.admission.release(held)


def test_timeout_covers_finalization(engines):
    from vgs.grading import Grader

    class SlowGrader(Grader):
        def classes(self, answers):
            time.sleep(3)
            return super().classes(answers)

    with served(engines, grader=SlowGrader()) as (state, handle):
        state.request_timeout = 1.0
        url = f"http://127.0.0.1:{handle.port}/v1/completions"
        t0 = time.monotonic()
        r = httpx.post(url, json={"prompt": "1 +2", "max_tokens": 8, "search": {"method": "majority", "n": 2}},
                       timeout=60)
        assert r.status_code == 504 and time.monotonic() - t0 < 2.9, r.text


def test_plain_cancel_never_leaves_a_request_running(engines):
    """Cancelling n=1 generation at any moment aborts it inside the engine, also while vLLM is
    still adding the request (`AsyncLLM.generate` aborts only once `add_request` returned).
    The window is made wide by delaying the hand-off to the engine core process."""
    import asyncio

    from vgs.aio import run_sync
    from vgs.config import SamplingConfig
    from vgs.engine import GenRequest

    policy = engines.policy
    core = policy.llm.engine_core
    real_add = core.add_request_async

    async def slow_add(request):  # sent to the engine core, then slow to return (a busy socket)
        await real_add(request)
        await asyncio.sleep(0.3)

    async def cancel_after(delay: float) -> None:
        task = asyncio.ensure_future(policy.agenerate(GenRequest([5, 6, 7], 200, n=1, seed=0),
                                                      SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=200)))
        await asyncio.sleep(delay)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def settled() -> int:
        # the abort is awaited before the cancelled call returns, so nothing may be left even
        # briefly (a leaked request would finish on its own within a second on this tiny model)
        return policy.num_running

    for delay in (0, 0.001, 0.005, 0.02):
        run_sync(cancel_after(delay))
        assert settled() == 0, f"request still running after a cancel {delay} s in"
    core.add_request_async = slow_add
    try:
        run_sync(cancel_after(0.1))  # lands while add_request is still awaiting
        assert settled() == 0, "a cancel during add_request left the request running"
    finally:
        del core.add_request_async


def test_parsing_runs_off_the_engine_loop(engines, tok):
    """Tokenizing and chat templates run in a worker thread, not on the loop driving vLLM."""
    from vgs.aio import engine_loop

    seen = []

    class Recording:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __len__(self):
            return len(self.real)

        def __call__(self, *a, **k):
            seen.append(threading.get_ident())
            return self.real(*a, **k)

        def apply_chat_template(self, *a, **k):
            seen.append(threading.get_ident())
            return self.real.apply_chat_template(*a, **k)

    with served(engines) as (state, handle):
        state.tokenizer = Recording(tok)
        url = f"http://127.0.0.1:{handle.port}/v1"
        loop_thread = []
        engine_loop().call_soon_threadsafe(lambda: loop_thread.append(threading.get_ident()))
        assert httpx.post(url + "/completions", json={"prompt": "1 +2", "max_tokens": 2}).status_code == 200
        assert httpx.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "1 +2"}],
                                                           "max_tokens": 2}).status_code == 200
        assert len(seen) >= 2 and loop_thread and loop_thread[0] not in seen


def test_health_checks_every_engine(engines):
    from types import SimpleNamespace

    from vgs.search import Engines
    from vgs.server.app import dead_engine

    assert dead_engine(engines) is None
    dead = SimpleNamespace(llm=SimpleNamespace(errored=True), max_model_len=256)
    assert dead_engine(Engines(engines.policy, dead)) == "value"
    with served(engines) as (state, handle):
        state.engines = Engines(engines.policy, dead)  # the value engine died
        r = httpx.get(f"http://127.0.0.1:{handle.port}/health")
        assert r.status_code == 503 and "value" in r.json()["error"]["message"]
        deadline = time.time() + 5  # the watchdog stops the server
        while not handle.server.should_exit and time.time() < deadline:
            time.sleep(0.05)
        assert handle.server.should_exit and state.dead == "value"


def test_streams_metrics_keepalive_and_block_floor(engines):
    with served(engines) as (state, handle):
        base = f"http://127.0.0.1:{handle.port}"
        state.keepalive_s = 0.01
        lines = []
        body = {"prompt": "1 +2", "max_tokens": 48, "seed": 0, "stream": True,
                "search": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 8}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            lines = list(r.iter_lines())
        assert ": keep-alive" in lines and "data: [DONE]" in lines
        with httpx.stream("POST", base + "/v1/completions", json={"prompt": "1 +2", "max_tokens": 200, "stream": True,
                                                                  "temperature": 1.0}, timeout=60) as r:
            next(ln for ln in r.iter_lines() if ln.startswith("data:"))  # closed mid-stream
        time.sleep(0.5)
        text = httpx.get(base + "/metrics").text
        assert 'endpoint="completions",method="vgs",status="200"' in text
        assert 'endpoint="completions",method="plain",status="499"' in text
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "search": {"method": "vgs", "block_size": 1,
                                                                                 "budget": 2, "beam_width": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "search.block_size"
