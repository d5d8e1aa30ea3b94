"""A malicious chat template (one that tries to leave the Jinja sandbox) is the model's fault: a
one-line error with exit 2 in `slm chat` / `slm eval`, a 4xx JSON error in `slm serve`."""

import io
import json
import urllib.error
import urllib.request

import pytest

from conftest import CHAT_TEMPLATE

EVIL = "{{ ''.__class__.__mro__[1].__subclasses__() }}" + CHAT_TEMPLATE


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory):
    from transformers import AutoTokenizer

    from conftest import make_tiny_model

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("evil") / "evil", layers=1)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = EVIL
    tok.save_pretrained(folder)
    return folder


def one_clean_error(err: str, folder=None) -> None:
    """One `error:` line (progress bars and banners aside), no traceback."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "SecurityError" in errors[0] and "chat template" in errors[0]
    assert folder is None or str(folder) in errors[0]


def test_chat_refuses_a_malicious_template(cli, evil_model, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, _, err = cli("chat", evil_model, "--max-tokens", "4")
    assert code == 2
    one_clean_error(err, evil_model)


def test_eval_refuses_a_malicious_template(cli, evil_model):
    code, _, err = cli("eval", evil_model, "--task", "summarize", "--limit", "1",
                       "--max-new-tokens", "2")
    assert code == 2
    one_clean_error(err, evil_model)


def test_a_template_error_from_anywhere_is_one_line(cli, monkeypatch):
    from jinja2.exceptions import SecurityError

    def rendering(args):  # e.g. a code path that renders a template without naming the model
        raise SecurityError("access to attribute '__class__' of 'str' object is unsafe.")

    monkeypatch.setattr("slmkit.info.run", rendering)
    code, _, err = cli("info", "x")
    assert code == 2
    one_clean_error(err)


def test_serve_answers_a_malicious_template_with_400(evil_model):
    from slmkit.serve import start_server

    with start_server([evil_model], names=["evil"]) as s:
        def post(path, body):
            req = urllib.request.Request(s.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, body = post("/v1/chat/completions", {"model": "evil", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and body["error"]["code"] == "chat_template_error", body
        assert "SecurityError" in body["error"]["message"]
        status, body = post("/v1/completions", {"model": "evil", "prompt": "hi", "max_tokens": 2})
        assert status == 200  # plain prompts need no template: the server keeps serving
