"""Serve one or more models over an OpenAI-compatible HTTP API, with a web playground at `/`.

    slm serve default                              # http://127.0.0.1:8000, playground at /
    slm serve teacher/ student.gguf --port 8080    # two models, picked by the `model` field
    slm serve student/ --name tiny --api-key s3cret --host 0.0.0.0
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions and /v1/completions (streaming by server-sent events with
`"stream": true`, else one JSON answer; temperature, top_p, max_tokens, stop, seed, n, logprobs),
GET /v1/models, GET /health, GET / (the playground). /v1/completions with vLLM's `prompt_logprobs`
(k <= 20, `prompt` a string or token ids, max_tokens 0 or 1) scores the prompt instead: the top-k
log-probs at every position, as `slm distill --teacher openai:NAME@URL` asks a teacher for them
(PyTorch backend). A model is named by its file or folder stem
(`default` for the embedded model) unless --name is given, one --name per model.

Backends: llama.cpp for .gguf files, PyTorch for Hugging Face folders and `default`. Concurrent
requests to a PyTorch model are batched statically: a worker takes the first waiting request,
gathers whatever else arrives within --batch-window-ms (up to --max-batch), and decodes them as
one left-padded batch; rows leave the batch as they finish, and requests that come later wait
for the next batch. llama.cpp decodes one request at a time.

Limits: prompt length (--max-input-tokens), max_tokens (--max-tokens), wall time per request
including the wait in the queue (--timeout), body size (--max-body-bytes, 1 MiB), silence on a
connection (--read-timeout: idle or half-sent ones are closed), open connections
(--max-connections, one thread each; more get 503). A bad request gets a 4xx with an OpenAI-style body {"error":
{"message", "type", "param", "code"}}, checked before it joins a batch; a request that still
fails inside a batch fails alone, and the server keeps serving. It binds 127.0.0.1 unless --host
says otherwise; --api-key (or $SLM_API_KEY) makes every /v1 route require `Authorization: Bearer
KEY`, and /health then lists the models only to callers with the key.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jinja2.exceptions import TemplateError

from slmkit.backends import (MAX_LOGPROBS, Backend, Completion, Request, load_backend, model_name,
                             now)
from slmkit.cli import add_config_arguments, config_from_args, option
from slmkit.errors import UsageError
from slmkit.models import DTYPES


@dataclass
class ServeConfig:
    """`slm serve`: what to serve, where, and the limits on each request and connection; CLI
    flags are these names with dashes."""

    models: list = option(help="Hugging Face folder, .gguf file or `default`; several may be given "
                          "(from Python also loaded Backends)", flags=("models",), nargs="+",
                          metavar="MODEL")
    names: list[str] | None = option(None, "served name of each MODEL, in order (default: file or "
                                     "folder stem)", flags=("--name",), action="append",
                                     metavar="NAME")
    host: str = option("127.0.0.1", "address to bind (default: loopback only)")
    port: int = option(8000, "port to listen on (0: any free one)")
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on /v1 routes "
                                 "(default: $SLM_API_KEY)")
    device: str | None = option(None, "PyTorch device (default: cuda when present)")
    dtype: str = option("float32", "PyTorch dtype", choices=DTYPES)
    threads: int | None = option(None, "CPU threads for llama.cpp and PyTorch (default: theirs)")
    verbose: bool = option(False, "log every request to stderr")
    max_input_tokens: int = option(4096, "longest prompt accepted, in tokens (the model's context "
                                   "may be shorter still)")
    max_tokens: int = option(1024, "largest max_tokens a request may ask for")
    default_max_tokens: int = option(256, "max_tokens when a request gives none")
    timeout: float = option(120.0, "seconds per request, queueing included")
    max_batch: int = option(16, "most concurrent requests decoded together (PyTorch models)")
    batch_window_ms: float = option(5.0, "wait this long for more requests before starting a batch")
    max_body_bytes: int = option(1 << 20, "largest request body, in bytes")
    read_timeout: float = option(30.0, "close a connection silent this many seconds (idle, or a "
                                 "request half sent)")
    max_connections: int = option(256, "open connections served at once, one thread each; more "
                                  "get 503")

    def __post_init__(self):
        if not self.models:
            raise UsageError("give at least one MODEL to serve")
        if self.names and len(self.names) != len(self.models):
            raise UsageError(f"--name given {len(self.names)} times for {len(self.models)} models; "
                             "give one --name per model, in the same order")
        if not 0 <= self.port < 65536:
            raise UsageError(f"--port {self.port}: give a port between 0 and 65535")
        for key in ("max_input_tokens", "max_tokens", "default_max_tokens", "max_batch",
                    "max_body_bytes", "max_connections"):
            if int(getattr(self, key)) < 1:
                raise UsageError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be at least 1")
        if self.timeout <= 0 or self.batch_window_ms < 0 or self.read_timeout <= 0:
            raise UsageError("--timeout and --read-timeout must be > 0 and --batch-window-ms >= 0")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


class APIError(Exception):
    """An error the client caused (or a timeout), sent as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --------------------------------------------------------------------------- batching

class Batcher:
    """One worker thread per model: takes waiting requests, batches them, runs the backend."""

    def __init__(self, backend: Backend, max_batch: int, window_s: float):
        self.backend, self.max_batch, self.window_s = backend, max_batch, window_s
        self.queue: queue.Queue = queue.Queue()
        self.batch_sizes: Counter = Counter()  # size -> how many batches had it
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{backend.name}", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> Future:
        fut: Future = Future()
        self.queue.put((req, fut))
        return fut

    def close(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            batch = [item]
            end = now() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, end - now()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            # requests that gave up while waiting are not decoded at all
            live = []
            for req, fut in batch:
                if req.cancel.is_set():
                    fut.set_exception(APIError(499, "the client went away", code="cancelled"))
                elif req.deadline is not None and now() > req.deadline:
                    fut.set_exception(timeout_error())
                else:
                    live.append((req, fut))
            if not live:
                continue
            self.batch_sizes[len(live)] += 1
            self._run(live)

    def _run(self, live: list) -> None:
        sent = set()  # requests whose streamed text already went out: they cannot run again
        for req, _ in live:
            if req.on_text is not None:
                req.on_text = _noting(req.on_text, sent, id(req))
        try:
            results = self.backend.run([req for req, _ in live])
        except Exception as e:  # a bad request that slipped through (or a bug)
            if len(live) == 1:
                return live[0][1].set_exception(_as_api_error(e))
            # decode each alone, so that only the request at fault fails
            for req, fut in live:
                if id(req) in sent:
                    fut.set_exception(_as_api_error(e))
                else:
                    self._run([(req, fut)])
            return
        for (_, fut), c in zip(live, results):
            fut.set_result(c)


def _noting(on_text, sent: set, key: int):
    def call(piece: str) -> None:
        sent.add(key)
        on_text(piece)
    return call


def _as_api_error(e: Exception) -> Exception:
    """Backends raise ValueError for requests they cannot decode: the client's 400, not a 500."""
    return APIError(400, str(e)) if isinstance(e, ValueError) else e


def timeout_error() -> APIError:
    return APIError(504, "the request took longer than the server's --timeout", code="timeout",
                    type_="timeout_error")


# --------------------------------------------------------------------------- request parsing

def _get(body: dict, key: str, types, default=None, check=None, why: str = ""):
    """A field of the request body, type-checked; `check` is a predicate on the value."""
    if key not in body or body[key] is None:
        return default
    value = body[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"`{key}` must be {why or types}", param=key, code="invalid_type")
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise APIError(400, f"`{key}` must be {why or types}, got {json.dumps(value)[:80]}",
                       param=key, code="invalid_value")
    return value


def _content(msg: dict, i: int) -> str:
    """A message's content as text; the list form keeps its text parts."""
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type") != "text" for p in c):
            raise APIError(400, f"messages[{i}].content: only text parts are supported",
                           param=f"messages[{i}].content")
        return "".join(str(p.get("text", "")) for p in c)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "`messages` must be a non-empty list of {role, content} objects",
                       param="messages", code="invalid_value" if "messages" in body else "missing")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a `role` of system, user or assistant",
                           param=f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    raise APIError(400, "`prompt` must be a string or a non-empty list of strings (token ids "
                   "are not supported)", param="prompt", code="missing" if p is None else "invalid_value")


def parse_params(body: dict, limits: ServeConfig) -> dict:
    """Sampling parameters shared by both endpoints -> Request keyword arguments."""
    num = (int, float)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"`{key}` must be an integer >= 1", param=key, code="invalid_value")
    elif max_tokens > limits.max_tokens:
        raise APIError(400, f"`{key}` is {max_tokens}; this server allows at most "
                       f"{limits.max_tokens} (--max-tokens)", param=key, code="invalid_value")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "`stop` must be a string or a list of at most 4 strings", param="stop",
                       code="invalid_value")
    return dict(
        max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", num, 1.0, why="a number")),
        top_p=float(_get(body, "top_p", num, 1.0, why="a number")),
        stop=stop or [],
        seed=_get(body, "seed", int, None, why="an integer"),
    )


# --------------------------------------------------------------------------- the server

class Service:
    """What the request handlers share: the models, their batchers, the limits, the key."""

    def __init__(self, backends: dict[str, Backend], limits: ServeConfig, api_key: str | None):
        self.backends, self.limits, self.api_key = backends, limits, api_key
        self.batchers = {}
        for name, b in backends.items():
            size = limits.max_batch if b.batched else 1
            self.batchers[name] = Batcher(b, size, limits.batch_window_ms / 1000)
        self.created = int(time.time())

    def backend(self, body: dict) -> tuple[str, Backend]:
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "`model` is required: one of " + ", ".join(self.backends),
                           param="model", code="missing")
        if name not in self.backends:
            raise APIError(404, f"model `{name}` is not served here; served: "
                           + ", ".join(self.backends), param="model", code="model_not_found")
        return name, self.backends[name]

    def make_requests(self, backend: Backend, prompts: list, params: dict, n: int,
                      logprobs: int) -> list[Request]:
        lim, reqs = self.limits, []
        deadline = now() + lim.timeout
        for i, prompt in enumerate(prompts):
            param = "messages" if isinstance(prompt, list) else "prompt"
            try:
                n_in = len(backend.prompt_ids(prompt))
            except (ValueError, UsageError) as e:
                raise APIError(400, str(e), param=param)
            except TemplateError as e:  # the model's chat template failed (or broke the sandbox)
                raise APIError(400, f"the chat template of model `{backend.name}` failed: "
                               f"{type(e).__name__}: {e}", param=param, code="chat_template_error")
            if n_in > lim.max_input_tokens or n_in >= backend.context_length:
                most = min(lim.max_input_tokens, backend.context_length - 1)
                raise APIError(400, f"the prompt has {n_in} tokens; this model accepts at most {most}",
                               param=param, code="context_length_exceeded")
            # generation stops at the end of the context rather than failing
            room = backend.context_length - n_in
            for j in range(n):
                seed = params["seed"]
                try:  # Request checks the sampling ranges (backends.check_sampling)
                    reqs.append(Request(prompt, **(params | dict(
                        max_tokens=min(params["max_tokens"], room),
                        seed=None if seed is None else seed + j)), logprobs=logprobs, deadline=deadline))
                except ValueError as e:  # the message starts with the field's name
                    raise APIError(400, str(e), param=str(e).split()[0], code="invalid_value")
        return reqs


# the client hung up, or stayed silent past --read-timeout: nothing to answer, nothing to log
GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    service: Service  # set on the subclass made per server
    quiet = True
    timeout = ServeConfig.read_timeout  # per socket read and write; the subclass sets --read-timeout

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("slm serve: %s - %s\n" % (self.address_string(), fmt % args))

    # ---- plumbing

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, e: APIError) -> None:
        self._json(e.status, e.body())

    def _authorized(self) -> bool:
        key = self.service.api_key
        got = self.headers.get("Authorization", "")
        return key is None or (got.startswith("Bearer ")
                               and hmac.compare_digest(got[7:].strip().encode(), key.encode()))

    def _auth(self) -> None:
        if not self._authorized():
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with "
                           "the key given to `slm serve --api-key`", code="invalid_api_key")

    def _read(self) -> bytes:
        """The raw body, read before anything can fail so a kept-alive connection stays in step."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # we cannot know where the next request starts
            raise APIError(411, "a JSON body with a Content-Length header is required")
        if int(length) > self.service.limits.max_body_bytes:
            self.close_connection = True  # the unread body would poison the connection
            raise APIError(413, f"the body is larger than {self.service.limits.max_body_bytes} bytes",
                           code="too_large")
        return self.rfile.read(int(length))

    @staticmethod
    def _json_body(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _guard(self, fn) -> None:
        try:
            fn()
        except APIError as e:
            self._error(e)
        except GONE:
            self.close_connection = True
        except Exception as e:  # our bug: say so, keep serving
            print(f"slm serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            self._error(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                 type_="server_error", code="internal_error"))

    # ---- routes

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        path = self.path.split("?")[0]
        svc = self.service
        if path in ("/", "/index.html"):
            from importlib.resources import files

            self._send(200, files("slmkit").joinpath("playground.html").read_bytes(),
                       "text/html; charset=utf-8")
        elif path == "/health":
            health = {"status": "ok", "auth": svc.api_key is not None}
            if self._authorized():  # what is served is for key holders only
                health["models"] = list(svc.backends)
            self._json(200, health)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            self._auth()
            data = [{"id": name, "object": "model", "created": svc.created, "owned_by": "slmkit",
                     "context_length": b.context_length} for name, b in svc.backends.items()]
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": data})
            want = path[len("/v1/models/"):]
            match = [d for d in data if d["id"] == want]
            if not match:
                raise APIError(404, f"model `{want}` is not served here", code="model_not_found")
            self._json(200, match[0])
        else:
            raise APIError(404, f"no route GET {path}", code="not_found")

    def _post(self):
        raw = self._read()
        path = self.path.split("?")[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(404, f"no route POST {path}", code="not_found")
        self._auth()
        body = self._json_body(raw)
        chat = path == "/v1/chat/completions"
        name, backend = self.service.backend(body)
        if not chat and body.get("prompt_logprobs") is not None:
            return self._score_prompt(name, backend, body)
        prompts = [parse_messages(body)] if chat else parse_prompts(body)
        params = parse_params(body, self.service.limits)
        stream = _get(body, "stream", bool, False, None, "true or false")
        n = _get(body, "n", int, 1, lambda v: 1 <= v <= 8, "an integer in [1, 8]")
        if chat:
            logprobs = 0
            if _get(body, "logprobs", bool, False, None, "true or false"):
                logprobs = _get(body, "top_logprobs", int, 1, lambda v: 0 <= v <= MAX_LOGPROBS,
                                f"an integer in [0, {MAX_LOGPROBS}]") or 1
        else:
            logprobs = _get(body, "logprobs", int, 0, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
            if body.get("echo"):
                raise APIError(400, "`echo` is not supported", param="echo")
        if stream and (n > 1 or len(prompts) > 1 or logprobs):
            raise APIError(400, "streaming supports one prompt, n=1 and no logprobs", param="stream")
        reqs = self.service.make_requests(backend, prompts, params, n, logprobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            opts = body.get("stream_options") or {}
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return self._stream(name, reqs[0], rid, chat, usage)
        futs = [self.service.batchers[name].submit(r) for r in reqs]
        try:
            done = [f.result(timeout=self.service.limits.timeout + 5) for f in futs]
        except TimeoutError:
            for r in reqs:
                r.cancel.set()
            raise timeout_error()
        if any(c.finish_reason == "timeout" for c in done):
            raise timeout_error()
        self._json(200, response(rid, name, done, chat, logprobs, n))

    def _score_prompt(self, name: str, backend: Backend, body: dict) -> None:
        """vLLM's `prompt_logprobs` on /v1/completions: the model's top-k log-probs at every
        position of one prompt (token ids or a string), for a student distilling from this
        server. Scoring only: `max_tokens` must be 0 or 1, and no completion text is made."""
        k = _get(body, "prompt_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                 f"an integer in [0, {MAX_LOGPROBS}]")
        _get(body, "max_tokens", int, 1, lambda v: v in (0, 1), "0 or 1 with prompt_logprobs")
        p = body.get("prompt")
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
        elif isinstance(p, str) and p:
            ids = backend.prompt_ids(p)
        else:
            raise APIError(400, "with prompt_logprobs, `prompt` is one string or one list of token "
                           "ids", param="prompt")
        if len(ids) > self.service.limits.max_input_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; at most "
                           f"{self.service.limits.max_input_tokens} here", param="prompt")
        try:
            scored = backend.score_prompt(ids, k)
        except NotImplementedError as e:
            raise APIError(400, str(e), param="prompt_logprobs") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        lps = [None if d is None else {str(i): {"logprob": v, "rank": r, "decoded_token": text}
                                       for i, (v, r, text) in d.items()} for d in scored]
        self._json(200, {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                         "created": int(time.time()), "model": name,
                         "choices": [{"index": 0, "text": "", "logprobs": None,
                                      "finish_reason": "length", "prompt_logprobs": lps}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": 0,
                                   "total_tokens": len(ids)}})

    def _stream(self, name: str, req: Request, rid: str, chat: bool, usage: bool) -> None:
        pieces: queue.Queue = queue.Queue()
        req.on_text = pieces.put
        fut = self.service.batchers[name].submit(req)
        fut.add_done_callback(lambda _: pieces.put(None))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no length: the stream ends when we close
        self.end_headers()
        self.close_connection = True
        created = int(time.time())

        def chunk(delta_or_text, finish=None):
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}

        def send(obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            if chat:
                send(chunk({"role": "assistant", "content": ""}))
            ended = False
            while not ended:
                # when the client reads slower than we decode, send what piled up in one event
                got = [pieces.get()]
                while not pieces.empty():
                    got.append(pieces.get_nowait())
                ended = None in got  # the end marker comes last
                text = "".join(p for p in got if p is not None)
                if text:
                    send(chunk({"content": text} if chat else text))
            try:
                c = fut.result()
            except APIError as e:
                return send(e.body())
            except Exception as e:
                return send(APIError(500, f"internal error: {e}", type_="server_error").body())
            if c.finish_reason == "timeout":
                return send(timeout_error().body())
            send(chunk({} if chat else "", finish=c.finish_reason))
            if usage:
                send({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": name, "choices": [], "usage": usage_of([c])})
            send("[DONE]")
        except GONE:
            req.cancel.set()  # the client hung up: stop decoding for it


def usage_of(done: list[Completion], n: int = 1) -> dict:
    # the n samples of one prompt share it: count each prompt once, as OpenAI does
    prompt = sum(c.prompt_tokens for c in done[::n])
    completion = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def response(rid: str, name: str, done: list[Completion], chat: bool, logprobs: int, n: int) -> dict:
    choices = []
    for i, c in enumerate(done):
        lp = None
        if logprobs and c.logprobs is not None:
            if chat:
                lp = {"content": [{"token": t.token, "logprob": t.logprob,
                                   "bytes": list(t.token.encode()),
                                   "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                                    for _, s, v in t.top]} for t in c.logprobs]}
            else:
                offs, pos = [], 0
                for t in c.logprobs:
                    offs.append(pos)
                    pos += len(t.token)
                lp = {"tokens": [t.token for t in c.logprobs],
                      "token_logprobs": [t.logprob for t in c.logprobs],
                      "top_logprobs": [{s: v for _, s, v in t.top} for t in c.logprobs],
                      "text_offset": offs}
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": i, "text": c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": choices,
            "usage": usage_of(done, n)}


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when dozens of clients arrive at
    # once (their connect then times out); the kernel caps this at net.core.somaxconn
    request_queue_size = 1024
    _busy = json.dumps(APIError(503, "too many open connections (--max-connections); retry later",
                                code="busy", type_="server_error").body()).encode()
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_busy), _busy))

    def __init__(self, address, handler, max_connections: int):
        # one thread per open connection: a bound keeps idle or slow clients from using up
        # the machine's threads
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)  # the accept loop must not wait on this client
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], GONE):  # a client hanging up is no error of ours
            super().handle_error(request, client_address)


class Server:
    """A running server: `.url`, `.model_names`, `.backends`, `.close()`."""

    def __init__(self, httpd: HTTPServer, service: Service):
        self.httpd, self.service = httpd, service
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.model_names = list(service.backends)
        self.backends = service.backends
        self.thread = threading.Thread(target=httpd.serve_forever, name="slm-serve", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for b in self.service.batchers.values():
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_server(models: list, port: int = 0, **options) -> Server:
    """Load the models and serve them from a background thread: `serve` with the fields of
    ServeConfig as keywords, except that port 0 (a free port; read it from `.url`) is the default."""
    return serve(ServeConfig(models=list(models), port=port, **options))


def serve(cfg: ServeConfig) -> Server:
    """Load `cfg.models` and serve them from a background thread."""
    backends: dict[str, Backend] = {}
    for i, m in enumerate(cfg.models):
        name = cfg.names[i] if cfg.names else (m.name if isinstance(m, Backend) else model_name(m))
        if name in backends:
            raise UsageError(f"two models would be served as `{name}`; tell them apart with "
                             "--name (one per model)")
        backends[name] = m if isinstance(m, Backend) else load_backend(
            m, name=name, device=cfg.device, dtype=cfg.dtype, n_threads=cfg.threads)
    service = Service(backends, cfg, cfg.api_key)
    handler = type("BoundHandler", (Handler,), {"service": service, "quiet": not cfg.verbose,
                                                "timeout": cfg.read_timeout})
    try:
        httpd = HTTPServer((cfg.host, cfg.port), handler, cfg.max_connections)
    except OSError as e:
        raise UsageError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another "
                         "--port") from None
    return Server(httpd, service)


# --------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    add_config_arguments(p, ServeConfig)


def run(args) -> int:
    cfg = config_from_args(ServeConfig, args)
    cfg.api_key = cfg.api_key or os.environ.get("SLM_API_KEY")
    server = serve(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"slm serve: warning: listening on {cfg.host} without --api-key; anyone who can "
              "reach this port can use the models", file=sys.stderr)
    print(f"slm serve: {', '.join(server.model_names)} at {server.url}/v1 "
          f"(playground: {server.url}/); Ctrl-C stops", file=sys.stderr)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
