"""`vgs serve` end to end: a real server on 127.0.0.1 over the session's real vLLM engines
(tiny models), driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.vllm

openai = pytest.importorskip("openai")

KEY = "sk-test"
SEARCHES = {
    "sample": {"method": "sample", "n": 2},
    "majority": {"method": "majority", "n": 3},
    "best_of_n": {"method": "best_of_n", "n": 3},
    "weighted_majority": {"method": "weighted_majority", "n": 3},
    "vgs": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 8, "trees": 2},
    "qsharp": {"method": "qsharp", "n": 2, "eta": 0.1, "top_k": 4},
    "cd": {"method": "cd", "n": 2, "eta": 0.5, "top_k": 4},
}


def _started(engines, name, **kw):
    """A server over the session's engines; yields (url, state), stops it afterwards."""
    from vgs.server import build_state, start_server

    admission = kw.pop("admission", None)
    state = build_state(engines, name, **kw)
    if admission is not None:
        state.admission = admission
    handle = start_server(state)
    try:
        yield f"http://127.0.0.1:{handle.port}", state
    finally:
        handle.stop()
        state.grader.close()


@pytest.fixture(scope="module")
def server(policy_engine, vllm_value_scorer, tiny_value):
    from vgs.search import Engines

    yield from _started(Engines(policy_engine, vllm_value_scorer, tiny_value), "tiny", api_key=KEY, max_budget=16,
                        max_sequences=64)


@pytest.fixture(scope="module")
def bare_server(policy_engine):
    """Same policy engine, no value model, and room for one small request at a time."""
    from vgs.runtime import Admission
    from vgs.search import Engines

    yield from _started(Engines(policy_engine), "bare", admission=Admission(2, max_queued=0))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_health_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny", prompt="1+1=", max_tokens=4, seed=0)
    text = httpx.get(url + "/metrics").text
    for name in ("vgs_requests_total", "vgs_generated_tokens_total", "vgs_value_tokens_total",
                 "vgs_search_latency_seconds_bucket", "vgs_sequences_in_flight", "vgs_queue_depth"):
        assert name in text
    assert 'vgs_requests_total{endpoint="completions",method="plain",status="200"}' in text


@pytest.mark.parametrize("method", list(SEARCHES))
def test_every_method_completions_and_chat(client, method):
    search = SEARCHES[method]
    seed = 10 + list(SEARCHES).index(method)  # distinct samples per method (the value memo would hide cost)
    res = client.completions.create(model="tiny", prompt="What is 1+1? Answer in \\boxed{}.", max_tokens=16,
                                    temperature=1.0, seed=seed, extra_body={"search": search})
    again = client.completions.create(model="tiny", prompt="What is 1+1? Answer in \\boxed{}.", max_tokens=16,
                                      temperature=1.0, seed=seed, extra_body={"search": search})
    assert res.object == "text_completion" and res.model == "tiny" and len(res.choices) == 1
    info = res.model_extra["vgs"]
    cands = info["candidates"]
    n = 4 if method == "vgs" else search["n"]
    assert info["method"] == method and len(cands) == n
    # usage counts every token the policy generated (VGS: also the blocks it pruned); value
    # tokens are reported separately
    assert res.usage.completion_tokens == info["compute"]["policy_tokens"]
    if method == "vgs":  # round 0 sampled 4 blocks per tree and kept 2: pruned tokens count too
        assert res.usage.completion_tokens > sum(c["num_tokens"] for c in cands)
    else:
        assert res.usage.completion_tokens == sum(c["num_tokens"] for c in cands)
    assert res.usage.model_extra["value_tokens"] == info["compute"]["value_tokens"]
    if method in ("best_of_n", "weighted_majority", "vgs"):
        assert all(0.0 <= c["value"] <= 1.0 for c in cands) and info["compute"]["value_tokens"] > 0
    if method in ("qsharp", "cd"):
        assert info["compute"]["value_tokens"] > 0
    chosen = cands[info["chosen"]]
    assert chosen["finish_reason"] == res.choices[0].finish_reason
    if method == "best_of_n":
        assert chosen["value"] == max(c["value"] for c in cands)
    if method == "vgs":
        assert info["rounds"] == 2  # 16 tokens in blocks of 8
    # same seed, same request: same selected completion
    assert again.choices[0].text == res.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+2?"}],
                                          max_completion_tokens=8, seed=1, extra_body={"search": search})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    # the R1 template opens <think>: the answer is split; together the parts are the whole
    # chosen text (8 tokens of it), without the EOS marker
    msg = chat.choices[0].message
    whole = (msg.model_extra["reasoning_content"] or "") + ("</think>" if msg.content is not None else "") + \
        (msg.content or "")
    assert whole and "<｜end▁of▁sentence｜>" not in whole
    assert chat.model_extra["vgs"]["candidates"][chat.model_extra["vgs"]["chosen"]]["num_tokens"] >= 1
    assert chat.model_extra["vgs"]["method"] == method


def test_plain_sampling_returns_n_choices(client):
    res = client.completions.create(model="tiny", prompt="Count:", max_tokens=12, n=3, seed=5, temperature=1.0)
    assert len(res.choices) == 3 and "vgs" not in (res.model_extra or {})
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert res.usage.completion_tokens <= 36 and res.usage.prompt_tokens > 0
    # (stop strings: tests/test_server_openai.py, on the demo pair, whose answers always hold one)


def test_streaming_vgs_progress_then_completion(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "3+3?"}], max_tokens=24, seed=2, stream=True,
        stream_options={"include_usage": True},
        extra_body={"search": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 8}})
    chunks = list(stream)
    progress = [c.model_extra["vgs"]["progress"] for c in chunks if c.model_extra.get("vgs", {}).get("progress")]
    assert [p["round"] for p in progress] == [0, 1, 2]
    assert all(p["beams_alive"] >= 1 and 0 <= p["best_value"] <= 1 for p in progress)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    final = [c for c in chunks if c.model_extra.get("vgs", {}).get("candidates")]
    assert len(final) == 1 and len(final[0].model_extra["vgs"]["candidates"]) == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # the streamed answer is the non-streamed one of the same seeded request (split the same way)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "3+3?"}], max_tokens=24, seed=2,
        extra_body={"search": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 8}}).choices[0].message
    assert reasoning == (whole.model_extra["reasoning_content"] or "") and content == (whole.content or "")
    assert reasoning or content
    plain = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=6, seed=1, stream=True))
    assert plain[-1].choices[0].finish_reason in ("stop", "length")


def test_plain_streaming_sends_token_deltas(client, server, policy_engine):
    """Plain sampling streams text as tokens are made: several content chunks per choice,
    which concatenate to the non-streamed text of the same seeded request (CPU: same tokens)."""
    kw = dict(model="tiny", prompt="Count:", max_tokens=24, n=2, seed=7, temperature=1.0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i and c.choices[0].text]
        assert len(pieces) > 1, pieces
        assert "".join(pieces) == full.choices[i].text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i
                    and c.choices[0].finish_reason]
        assert finishes == [full.choices[i].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    chat_kw = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=16, seed=3)
    msg = client.chat.completions.create(**chat_kw).choices[0].message
    whole = (msg.model_extra["reasoning_content"], msg.content)  # the R1 template: the answer is split
    chunks = [c.choices[0].delta for c in client.chat.completions.create(**chat_kw, stream=True) if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in chunks if d.model_extra.get("reasoning_content")]
    content = [d.content for d in chunks if d.content]
    assert len(reasoning) + len(content) > 1
    assert ("".join(reasoning) or None, "".join(content) or None) == whole
    # closing a plain stream mid-generation aborts the request and frees its sequences
    url, state = server
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "go", "max_tokens": 3000, "stream": True,
                                                             "temperature": 1.0},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and next(ln for ln in r.iter_lines() if ln.startswith("data:"))
    deadline = time.time() + 10
    while (policy_engine.num_running or state.admission.in_use) and time.time() < deadline:
        time.sleep(0.05)
    assert policy_engine.num_running == 0 and state.admission.in_use == 0


def test_qsharp_guidance_failure_is_a_per_request_error(tiny_policy, tiny_value):
    """A Q# request the worker cannot guide (its value-model KV does not fit the guidance
    budget: 5 pages of 64 tokens, a 600-token prompt) gets a 503 with an OpenAI-style body;
    the server keeps serving, and guides a request that fits."""
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.server import build_state, start_server

    page_bytes = 2 * 2 * 1 * 64 * 64 * 4  # layers x (k, v) x kv heads x page x head dim x fp32
    engine = PolicyEngine(EngineConfig(model=tiny_policy, kv_cache_gib=0.25, max_model_len=1024,
                                       guidance_kv_gib=5 * page_bytes / 2**30))
    state = build_state(Engines(engine, None, tiny_value), "tiny", max_budget=4)
    handle = start_server(state)
    url = f"http://127.0.0.1:{handle.port}/v1/completions"
    search = {"method": "qsharp", "n": 1, "eta": 0.5, "top_k": 4}
    try:
        r = httpx.post(url, json={"prompt": "word " * 600, "max_tokens": 8, "seed": 0, "search": search}, timeout=120)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "search_failed"
        assert "guidance KV budget exhausted" in err["message"] and "Traceback" not in r.text
        ok = httpx.post(url, json={"prompt": "1+1=", "max_tokens": 8, "seed": 0, "search": search}, timeout=120)
        assert ok.status_code == 200, ok.text
        assert ok.json()["vgs"]["compute"]["value_tokens"] > 0
        assert httpx.post(url, json={"prompt": "ok", "max_tokens": 3}, timeout=60).status_code == 200
    finally:
        handle.stop()
        state.grader.close()
        engine.close()


def test_auth(server):
    url, _ = server
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_burst_of_bad_requests_then_good_ones(server, bare_server, client):
    url, _ = server
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    long_prompt = list(range(1000, 1000 + 4100))
    cases = [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "vgs", "beams": 2}}, 400, "search.beams"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "beam"}}, 400, "search.method"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "majority", "beam_width": 2}}, 400,
         "search.beam_width"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "vgs", "budget": 5}}, 400, "search.budget"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "vgs", "budget": 64}}, 400, "search.budget"),
        ("/v1/completions", {"prompt": "x", "search": {"method": "qsharp", "eta": -1}}, 400, "search.eta"),
        ("/v1/completions", {"prompt": "x", "search": "vgs"}, 400, "search"),
        ("/v1/completions", {"prompt": "x", "n": 2, "search": {"method": "majority"}}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/v1/completions", {"prompt": long_prompt, "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 4095}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ("/v1/nope", {}, 404, None),
    ]
    for path, body, status, param in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url + path, headers=h, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        assert err["param"] == param, (body, err)
        assert "Traceback" not in r.text
    # a method that needs a value model, on a server without one
    bare_url, _ = bare_server
    r = httpx.post(bare_url + "/v1/completions", json={"prompt": "x", "search": {"method": "vgs", "budget": 2}})
    assert r.status_code == 400 and "needs a value model" in r.json()["error"]["message"]
    # ... and every server keeps serving
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=3, seed=0).choices[0].finish_reason
    assert httpx.post(bare_url + "/v1/completions", json={"prompt": "ok", "max_tokens": 3}).status_code == 200


def test_busy_server_answers_429_with_retry_after(bare_server, policy_engine):
    url, state = bare_server
    out = {}

    def long_one():
        out["r"] = httpx.post(url + "/v1/completions", json={"prompt": "go", "n": 2, "max_tokens": 3000,
                                                             "temperature": 1.0}, timeout=300)

    t = threading.Thread(target=long_one)
    t.start()
    deadline = time.time() + 30
    while state.admission.in_use < 2 and time.time() < deadline:
        time.sleep(0.01)
    r = httpx.post(url + "/v1/completions", json={"prompt": "go", "max_tokens": 2})
    t.join()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert out["r"].status_code == 200
    assert httpx.post(url + "/v1/completions", json={"prompt": "go", "max_tokens": 2}).status_code == 200


def test_disconnect_cancels_the_search(server, policy_engine, vllm_value_scorer):
    """After the client goes away, no vLLM request of its search is still running (policy or
    value engine) and its sequences are released."""
    url, state = server
    seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(policy_engine.num_running)
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    body = {"prompt": "go", "max_tokens": 3000, "temperature": 1.0,
            "search": {"method": "vgs", "budget": 8, "beam_width": 2, "block_size": 64, "trees": 2}}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=2.0)
        deadline = time.time() + 10
        while (policy_engine.num_running or state.admission.in_use) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert max(seen) >= 1  # the search was running when the client left
    assert policy_engine.num_running == 0 and state.admission.in_use == 0
    assert vllm_value_scorer.num_running == 0
    text = httpx.get(url + "/metrics").text
    assert 'status="499"' in text
    # streaming: closing the stream mid-search cancels too
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:  # round 0: 28 s at load 8
        for line in r.iter_lines():
            if line.startswith("data:") and "progress" in line:
                assert json.loads(line[5:])["vgs"]["progress"]["round"] == 0
                break
    deadline = time.time() + 10
    while (policy_engine.num_running or state.admission.in_use) and time.time() < deadline:
        time.sleep(0.05)
    assert policy_engine.num_running == 0 and state.admission.in_use == 0
    assert vllm_value_scorer.num_running == 0
