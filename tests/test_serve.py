"""`slm serve` and `slm chat` with the official openai client against a live server on loopback."""

import json
import threading
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from slmkit.backends import TextTracker  # noqa: E402
from slmkit.serve import start_server  # noqa: E402

KEY = "test-key"
HI = [{"role": "user", "content": "Can you send me the report?"}]


@pytest.fixture(scope="module")
def server(tiny_models):
    s = start_server([tiny_models["llama"]], api_key=KEY, max_tokens=64, max_input_tokens=100)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def backend(server):
    return server.backends["llama"]


def post(url, body: bytes, key=KEY):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ascii_window(text: str, start: int = 3) -> str:
    """A 2-character piece of `text` (after `start`) made of printable ASCII: a stop string that
    cannot collide with a half-decoded UTF-8 character."""
    for i in range(start, len(text) - 1):
        if all(c.isascii() and c.isprintable() for c in text[i:i + 2]):
            return text[i:i + 2]
    pytest.skip("the tiny model wrote no ASCII to stop on")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["llama"]
    with urllib.request.urlopen(server.url + "/health") as r:  # no key: alive, nothing more
        assert json.loads(r.read()) == {"status": "ok", "auth": True}
    keyed = urllib.request.Request(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(keyed) as r:
        assert json.loads(r.read()) == {"status": "ok", "models": ["llama"], "auth": True}


def test_chat_non_streaming_matches_backend(client, backend):
    r = client.chat.completions.create(model="llama", messages=HI, max_tokens=12, temperature=0)
    [want] = backend.generate([HI], max_tokens=12)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(backend.prompt_ids(HI)) == want.prompt_tokens
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model="llama", messages=HI, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="llama", messages=HI, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_streaming_and_logprobs(client, backend):
    r = client.completions.create(model="llama", prompt="The patient should", max_tokens=10,
                                  temperature=0, logprobs=3)
    [want] = backend.generate(["The patient should"], max_tokens=10, logprobs=3)
    assert r.choices[0].text == want.text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    # greedy: the chosen token is the most likely one, and log-probs are normalised
    assert [t.top[0][0] for t in want.logprobs] == want.token_ids
    assert all(t.top[0][2] >= t.top[1][2] >= t.top[2][2] and t.logprob <= 0 for t in want.logprobs)
    streamed = client.completions.create(model="llama", prompt="The patient should", max_tokens=10,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_stop_sequences(client):
    free = client.completions.create(model="llama", prompt="Thanks for your message", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = ascii_window(free)
    cut = free[: free.index(stop)]
    r = client.completions.create(model="llama", prompt="Thanks for your message", max_tokens=30,
                                  temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    streamed = client.completions.create(model="llama", prompt="Thanks for your message",
                                         max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_text_tracker_holds_back_partial_stop():
    t = TextTracker(["END"])
    assert t.update("abcE") == ("abc", False)      # "E" may start "END"
    assert t.update("abcEN") == ("", False)
    assert t.update("abcENx") == ("ENx", False)    # it did not
    assert t.update("abcENxEND tail") == ("", True)
    assert t.text == "abcENx"
    t = TextTracker([])
    assert t.update("a\ufffd") == ("a", False)    # half a UTF-8 character waits
    assert t.update("ab") == ("b", False)


def test_seed_and_n(client):
    kw = dict(model="llama", messages=HI, max_tokens=12, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    r = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts[0] == a.choices[0].message.content  # sample j uses seed + j
    assert len(set(texts)) > 1


def test_concurrent_requests_are_batched_and_equal_to_single(server, client, backend):
    prompts = ["The quick brown fox", "Hi", "Grammar correction: he have three cat", "Thanks"]
    singles = [c.text for c in (backend.generate([p], max_tokens=6 + i)[0]
                                for i, p in enumerate(prompts))]
    before = sum(n * k for n, k in server.service.batchers["llama"].batch_sizes.items() if n > 1)
    got = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def ask(i):
        barrier.wait()
        got[i] = client.completions.create(model="llama", prompt=prompts[i], max_tokens=6 + i,
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == singles  # left padding and dropping finished rows change nothing
    after = sum(n * k for n, k in server.service.batchers["llama"].batch_sizes.items() if n > 1)
    assert after > before, "no request shared a batch"
    assert server.httpd.request_queue_size >= 64  # dozens of clients may connect at once


def test_errors_are_openai_shaped_and_server_keeps_serving(server, client):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.chat.completions.create(model="llama", messages=HI, max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"

    status, body = post(server.url + "/v1/chat/completions", b'{"model": "llama", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(server.url + "/v1/chat/completions", b"[1, 2]")
    assert status == 400

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI, max_tokens=4)
    assert e.value.body["param"] == "model" and "llama" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=HI, max_tokens=65)
    assert e.value.body["param"] == "max_tokens" and "--max-tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=HI, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="word " * 200, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    status, body = post(server.url + "/v1/nothing", b"{}")
    assert status == 404

    r = client.chat.completions.create(model="llama", messages=HI, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_kept_alive_connection_survives_errors(server):
    import http.client

    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    good = json.dumps({"model": "llama", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    for key, path, want in [("wrong", "/v1/completions", 401), (KEY, "/v1/nope", 404),
                            (KEY, "/v1/completions", 200)]:
        conn.request("POST", path, body=good, headers={"Authorization": f"Bearer {key}",
                                                       "Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == want, body
    assert body["usage"]["completion_tokens"] >= 1
    # a streaming client that hangs up early does not break the server
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                 body=json.dumps({"model": "llama", "prompt": "Hi", "max_tokens": 60, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()
    status, body = post(server.url + "/v1/completions", good.encode())
    assert status == 200


def test_timeout_gives_504(backend):
    with start_server([backend], timeout=1e-4) as s:  # reuses the loaded model
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="llama", messages=HI, max_tokens=32)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"


def test_two_models_selected_by_name(tiny_models):
    with start_server([tiny_models["llama"], tiny_models["qwen2"]], names=["teacher", "student"]) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        assert sorted(m.id for m in c.models.list().data) == ["student", "teacher"]
        for name in ("teacher", "student"):
            r = c.chat.completions.create(model=name, messages=HI, max_tokens=8, temperature=0)
            [want] = s.backends[name].generate([HI], max_tokens=8)
            assert r.model == name and r.choices[0].message.content == want.text


def test_cli_errors_exit_2(cli, tiny_llama):
    code, _, err = cli("serve", "no/such/model")
    assert code == 2 and "no/such/model" in err
    code, _, err = cli("serve", tiny_llama, "--name", "a", "--name", "b")
    assert code == 2 and "--name" in err


def test_cli_serve_subprocess(tiny_llama):
    import re
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", str(tiny_llama), "--port", "0",
                          "--name", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # progress bars first, then the line with the address
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
                break
        url = m.group(1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        r = c.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_gguf_model_served_by_llamacpp(tiny_llama, tmp_path):
    pytest.importorskip("llama_cpp")
    export = pytest.importorskip("slmkit.export")
    gguf = export.export_gguf(tiny_llama, tmp_path / "tiny.gguf", quant="f16")
    with start_server([gguf]) as s:
        assert s.model_names == ["tiny"]
        backend = s.backends["tiny"]
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="tiny", prompt="The patient should", max_tokens=12, temperature=0)
        [want] = backend.generate(["The patient should"], max_tokens=12)
        assert r.choices[0].text == want.text and r.usage.completion_tokens == want.completion_tokens
        streamed = c.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0,
                                             stream=True)
        full = c.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == full.choices[0].message.content
        stop = ascii_window(r.choices[0].text)
        cut = c.completions.create(model="tiny", prompt="The patient should", max_tokens=12,
                                   temperature=0, stop=stop)
        assert cut.choices[0].text == want.text[: want.text.index(stop)]


def test_chat_loop_keeps_and_resets_history(backend):
    import io

    from slmkit.chat import chat_loop

    lines = iter(["hello", "again", "/reset", "again", "/exit"])
    out = io.StringIO()
    assert chat_loop(backend, read=lambda _: next(lines), out=out, max_tokens=8, temperature=0) == 0
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    first = backend.generate([[u("hello")]], max_tokens=8)[0].text
    second = backend.generate([[u("hello"), {"role": "assistant", "content": first}, u("again")]],
                              max_tokens=8)[0].text
    fresh = backend.generate([[u("again")]], max_tokens=8)[0].text
    assert out.getvalue() == (f"model> {first}\nmodel> {second}\n(conversation forgotten)\n"
                              f"model> {fresh}\n")


def test_chat_loop_writes_to_stdout_as_it_is_when_called(backend, monkeypatch):
    """The default output is sys.stdout at the call (a redirect after import is followed)."""
    import io

    from slmkit.chat import chat_loop

    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    lines = iter(["hello", "/exit"])
    assert chat_loop(backend, read=lambda _: next(lines), max_tokens=4, temperature=0) == 0
    first = backend.generate([[{"role": "user", "content": "hello"}]], max_tokens=4)[0].text
    assert out.getvalue() == f"model> {first}\n"


# --------------------------------------------------------------------------- bad input, bad clients

def test_bad_seed_is_400_and_the_batch_around_it_is_served(server):
    url = server.url + "/v1/completions"
    bodies = [{"model": "llama", "prompt": "Hi", "max_tokens": 3, "seed": 10**23},
              {"model": "llama", "prompt": "Hi", "max_tokens": 3, "seed": -1},
              {"model": "llama", "prompt": "Hi", "max_tokens": 3, "seed": 2**63 - 1, "n": 2}]
    bodies += [{"model": "llama", "prompt": p, "max_tokens": 3, "seed": 5} for p in ("Hi", "Thanks")]
    got = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def ask(i):
        barrier.wait()
        got[i] = post(url, json.dumps(bodies[i]).encode())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, body in got[:3]:
        assert status == 400 and body["error"]["param"] == "seed", body
        assert "2**63 - 1" in body["error"]["message"]
    assert [status for status, _ in got[3:]] == [200, 200]


def test_a_row_that_fails_in_the_backend_fails_alone(backend):
    from slmkit.backends import Backend, Request
    from slmkit.serve import APIError, Batcher

    class Picky(Backend):  # decodes like `backend`, but one prompt breaks any batch it is in
        name, context_length, batched = "picky", backend.context_length, True

        def __init__(self):
            self.sizes = []

        def run(self, reqs):
            self.sizes.append(len(reqs))
            for r in reqs:
                if r.on_text:
                    r.on_text("x")  # streamed text is out: that request cannot be decoded again
            if any(r.prompt == "boom" for r in reqs):
                raise ValueError("prompt: boom cannot be decoded")
            return backend.run(reqs)

    picky = Picky()
    batcher = Batcher(picky, max_batch=8, window_s=0.5)
    try:
        reqs = [Request(p, max_tokens=3) for p in ("Hi", "boom", "Thanks")]
        reqs.append(Request("Hi", max_tokens=3, on_text=lambda _: None))
        futs = [batcher.submit(r) for r in reqs]
        assert futs[0].result(60).completion_tokens >= 1 and futs[2].result(60).completion_tokens >= 1
        for i in (1, 3):
            with pytest.raises(APIError) as e:
                futs[i].result(60)
            assert e.value.status == 400 and "boom" in e.value.message
        assert picky.sizes[0] == 4 and sorted(picky.sizes[1:]) == [1, 1, 1]
    finally:
        batcher.close()


def test_silent_connections_time_out_and_connections_are_bounded(backend):
    import socket
    import time

    with start_server([backend], read_timeout=1.5, max_connections=2) as s:
        address = s.httpd.server_address[:2]
        idle = socket.create_connection(address, timeout=30)
        half = socket.create_connection(address, timeout=30)
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mod")
        time.sleep(0.3)  # both are being served now, one thread each
        with socket.create_connection(address, timeout=30) as third:
            busy = third.recv(4096)
        assert busy.startswith(b"HTTP/1.1 503") and b'"busy"' in busy
        start = time.monotonic()
        assert idle.recv(1) == b"" and half.recv(4096) == b""  # closed by the server
        assert time.monotonic() - start < 10
        idle.close()
        half.close()
        good = json.dumps({"model": "llama", "prompt": "Hi", "max_tokens": 2}).encode()
        for _ in range(50):  # the slots come back as the handler threads end
            status, _ = post(s.url + "/v1/completions", good)
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200


def test_clients_that_hang_up_leave_no_traceback(backend, capfd):
    import socket
    import struct
    import time

    with start_server([backend]) as s:
        address = s.httpd.server_address[:2]
        for partial in (b"GET /hea", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"):
            c = socket.create_connection(address, timeout=30)
            c.sendall(partial)
            time.sleep(0.2)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # a reset, not a polite close
        time.sleep(0.5)
        with urllib.request.urlopen(s.url + "/health") as r:
            assert r.status == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionReset" not in err, err
