"""Any OpenAI-compatible endpoint as a teacher: vLLM, Ollama, llama.cpp server, `slm serve`,
hosted APIs. MODEL is `openai:NAME@URL`; the key comes from SLM_API_KEY or OPENAI_API_KEY.

    backend = OpenAIBackend.from_spec("openai:default@http://127.0.0.1:8000/v1", concurrency=8)
    [c] = backend.generate([[{"role": "user", "content": "Say hi."}]], max_tokens=16, logprobs=5)
    c.text, c.logprobs          # logprobs is None when the server returns none

Chat prompts go to /v1/chat/completions, plain strings to /v1/completions. Requests run on a
thread pool of `concurrency`; each is retried on 429, 5xx, timeouts and refused connections with
exponential backoff (0.5 s, 1 s, 2 s ... capped at 20 s, or the server's Retry-After), then fails
with a one-line UsageError naming the URL. A request the server refuses for itself (HTTP 400,
e.g. a prompt longer than its context) comes back as an empty Completion with finish_reason
`error` and the server's message in `backend.last_error`, so one bad prompt does not end a batch.
The API returns token text, not ids: TokenLogprobs.id is -1 and `top` holds (-1, text, logprob).
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from slmkit.backends import Backend, Completion, Request, TokenLogprobs
from slmkit.errors import UsageError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
SPEC_HELP = "`openai:NAME@URL`, e.g. openai:gpt-4o-mini@https://api.openai.com/v1"


def parse_spec(spec: str) -> tuple[str, str]:
    """`openai:NAME@URL` -> (model name, base URL ending in /v1 when the URL has no path)."""
    body = spec[len("openai:"):] if spec.startswith("openai:") else ""
    at = body.find("@http")  # a model name may itself hold `@`; the URL starts at @http
    name, url = (body[:at], body[at + 1:]) if at > 0 else ("", "")
    if not name or not url or urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise UsageError(f"teacher `{spec}`: expected {SPEC_HELP}")
    url = url.rstrip("/")
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return name, url


def api_key() -> str | None:
    return os.environ.get("SLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


class OpenAIBackend(Backend):
    def __init__(self, name: str, base_url: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 5, context_length: int = 8192):
        self.name = name
        self.base_url = base_url
        self.key = api_key
        self.concurrency = concurrency
        self.timeout = timeout  # seconds per HTTP request
        self.retries = retries  # extra tries after the first
        self.context_length = context_length  # unknown to the client; only informative
        self.last_error: str | None = None
        """The server's message for the last request it refused (finish_reason `error`)."""

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "OpenAIBackend":
        name, url = parse_spec(spec)
        return cls(name, url, api_key=api_key(), **kw)

    def prompt_ids(self, prompt) -> list[int]:
        raise UsageError(f"teacher `{self.name}` is an HTTP endpoint: its token ids are not known here")

    def run(self, requests: list[Request]) -> list[Completion]:
        if len(requests) == 1:
            return [self._one(requests[0])]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    # ----------------------------------------------------------------------- one request

    def _one(self, req: Request) -> Completion:
        start = time.monotonic()
        if req.cancel.is_set():
            return Completion("", "cancelled", 0, 0)
        chat = not isinstance(req.prompt, str)
        body = {"model": self.name, "max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p}
        body |= {"messages": req.prompt} if chat else {"prompt": req.prompt}
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.logprobs:
            body |= {"logprobs": True, "top_logprobs": req.logprobs} if chat else {"logprobs": req.logprobs}
        path = "/chat/completions" if chat else "/completions"
        try:
            try:
                data = self._post(path, body, req.deadline)
            except _BadRequest as e:
                if not req.logprobs or "logprob" not in str(e).lower():
                    raise
                # a server that refuses the logprobs parameter: ask again without it (the
                # Completion then has logprobs None, which the caller reports)
                for k in ("logprobs", "top_logprobs"):
                    body.pop(k, None)
                data = self._post(path, body, req.deadline)
        except _BadRequest as e:
            self.last_error = f"{self.base_url}{path}: {e}"
            return Completion("", "error", 0, 0, seconds=time.monotonic() - start)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise UsageError(f"teacher {self.base_url}{path}: unexpected reply "
                             f"{json.dumps(data)[:200]}; is it an OpenAI-compatible endpoint?") from None
        lps = parse_logprobs(choice.get("logprobs"), chat) if req.logprobs else None
        usage = data.get("usage") or {}
        comp = Completion(text=text or "", finish_reason=choice.get("finish_reason") or "stop",
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", len(lps or [])),
                          logprobs=lps, seconds=time.monotonic() - start)
        if req.on_text and comp.text:
            req.on_text(comp.text)  # no streaming over HTTP here: the whole text at once
        return comp

    def _post(self, path: str, body: dict, deadline: float | None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        payload = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, max(0.1, deadline - time.monotonic()))
            wait = min(20.0, 0.5 * 2 ** attempt) * (0.75 + 0.5 * random.random())  # jitter
            try:
                r = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(r, timeout=timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code in (401, 403):
                    raise UsageError(f"teacher {url}: HTTP {e.code} ({detail}); set SLM_API_KEY or "
                                     "OPENAI_API_KEY to a key the server accepts") from None
                if e.code == 404:
                    raise UsageError(f"teacher {url}: HTTP 404 ({detail}); check the URL (it should "
                                     f"end in /v1) and the model name `{self.name}`") from None
                if e.code not in RETRY_STATUS:
                    raise _BadRequest(f"HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code} ({detail})"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(60.0, float(retry_after))
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
            except json.JSONDecodeError:
                last = "a reply that is not JSON"
            if attempt < self.retries:
                time.sleep(wait)
        raise UsageError(f"teacher {url} failed after {self.retries + 1} tries: {last}; "
                         "check that the server is running and the URL is right")


class _BadRequest(Exception):
    """A 4xx the server will answer the same way again (not retried)."""


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        msg = body.get("error", body)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        return str(msg)[:200]
    except (ValueError, OSError):
        return e.reason or "no detail"


def parse_logprobs(lp, chat: bool) -> list[TokenLogprobs] | None:
    """OpenAI's logprobs object -> TokenLogprobs per generated token; None when absent."""
    if not lp:
        return None
    out = []
    if chat:
        for t in lp.get("content") or []:
            top = [(-1, a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []]
            out.append(TokenLogprobs(-1, t["token"], float(t["logprob"]), top))
    else:  # legacy completions: parallel lists, top_logprobs as {token: logprob}
        tops = lp.get("top_logprobs") or [{}] * len(lp.get("tokens") or [])
        for tok, val, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops):
            ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
            out.append(TokenLogprobs(-1, tok, float(val), [(-1, k, float(v)) for k, v in ranked]))
    return out or None
