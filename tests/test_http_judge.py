"""The sort eval's HTTP judge against an OpenAI-compatible server on 127.0.0.1, over real HTTP."""

from __future__ import annotations

import dataclasses
import logging
import socket
import traceback

import pytest
from openai_server import OpenAIServer, request_images, serve_openai
from PIL import Image

from vitscope.analysis import judge_http
from vitscope.analysis.judge_http import PROMPT, HttpJudge, JudgeError, parse_letter
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.support.errors import BadSetting

KEY = "sk-test-secret-key-0123456789"
RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture
def server() -> OpenAIServer:
    with serve_openai(KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; loopback must not go through one."""
    monkeypatch.setenv("no_proxy", "*")


def judge(server: OpenAIServer, **overrides: object) -> HttpJudge:
    settings: dict = dict(api_key=KEY, timeout=2.0, retries=3, backoff=0.01)
    return HttpJudge(server.url, "test-vision-model", **{**settings, **overrides})


def ask(j: HttpJudge, query: tuple[int, int, int] = RED) -> str | None:
    """Grid A red, grid B blue: the server's stand-in judge answers by the query's colour."""
    return j.answer(
        Image.new("RGB", (48, 48), RED),
        Image.new("RGB", (48, 48), BLUE),
        Image.new("RGB", (16, 16), query),
    )


def one_line_without_key(err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    assert "\n" not in str(err) and KEY not in text


def test_a_plain_answer_sends_the_prompt_and_three_jpeg_images(server: OpenAIServer):
    j = judge(server)
    assert ask(j, RED) == "A" and ask(j, BLUE) == "B"
    assert (j.requests, j.retried, j.unusable) == (2, 0, 0)
    body = server.requests[0]
    assert (body["model"], body["temperature"]) == ("test-vision-model", 0)
    assert body["max_tokens"] > 0
    parts = body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": PROMPT}
    assert [p["type"] for p in parts[1:]] == ["image_url"] * 3
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in parts[1:])
    images = request_images(body)
    assert [(im.format, im.size) for im in images] == [("JPEG", (48, 48))] * 2 + [
        ("JPEG", (16, 16))
    ]


def test_429_and_500_are_retried_then_answered(server: OpenAIServer):
    server.faults += ["429", "500"]
    j = judge(server)
    assert ask(j) == "A"
    assert (j.requests, j.retried, j.unusable) == (3, 2, 0)


def test_a_reply_slower_than_the_timeout_is_retried(server: OpenAIServer):
    server.faults.append("slow")
    server.slow_s = 1.0
    j = judge(server, timeout=0.3)
    assert ask(j) == "A"
    assert (j.requests, j.retried) == (2, 1)


@pytest.mark.parametrize("fault", ["malformed", "garbled"])
def test_an_unusable_reply_is_none_and_counted_not_retried(server: OpenAIServer, fault: str):
    server.faults.append(fault)
    j = judge(server)
    assert ask(j) is None and ask(j) == "A"
    assert (j.requests, j.retried, j.unusable) == (2, 0, 1)


def test_unclear_replies_are_none():
    with serve_openai(KEY, answer=lambda body: "A or B, hard to say") as running:
        j = judge(running)
        assert ask(j) is None and j.unusable == 1


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("A", "A"),
        (" b.\n", "B"),
        ("**B**", "B"),
        ("(a)", "A"),
        ("Answer: B", "B"),
        ("The query belongs to feature A.", "A"),
        ("It's B's grid", "B"),
        ("A or B", None),
        ("neither", None),
        ("", None),
        ("the answer is C or maybe D", None),
        ("the answer is b", None),
        ("A" + " word" * 60, None),
    ],
)
def test_parse_letter(reply: str, letter: str | None):
    assert parse_letter(reply) == letter


def test_a_wrong_key_fails_at_once_in_one_line_without_the_key(server: OpenAIServer):
    j = judge(server, api_key=KEY + "-wrong")
    with pytest.raises(JudgeError, match=r"HTTP 401.*API key") as caught:
        ask(j)
    assert j.requests == 1 and j.retried == 0
    one_line_without_key(caught.value)


def test_spent_retries_raise_one_line_naming_the_endpoint(server: OpenAIServer):
    server.faults += ["500"] * 3
    j = judge(server, retries=2)
    with pytest.raises(JudgeError, match=r"after 3 attempts.*HTTP 500") as caught:
        ask(j)
    assert server.url in str(caught.value)
    assert (j.requests, j.retried) == (3, 2)
    one_line_without_key(caught.value)


def test_a_refused_connection_is_retried_then_raises():
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    j = HttpJudge(f"http://127.0.0.1:{port}/v1", "m", api_key=KEY, retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="after 3 attempts") as caught:
        ask(j)
    assert j.retried == 2
    one_line_without_key(caught.value)


def test_the_key_never_reaches_logs_output_or_errors(
    server: OpenAIServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
):
    caplog.set_level(logging.DEBUG)
    j = judge(server, retries=1, timeout=0.3)
    errors = []
    for faults in (["slow", "leaky"], ["429"], ["malformed"], ["garbled"], ["401"]):
        server.faults[:] = faults
        try:
            ask(j)
        except JudgeError as err:
            errors.append(err)
    assert len(errors) == 2 and j.unusable == 2
    for err in errors:
        one_line_without_key(err)
    assert "Bearer ***" in str(errors[0])  # the echoed header was scrubbed, not dropped
    out, err = capsys.readouterr()
    assert KEY not in caplog.text + out + err
    assert "retry" in caplog.text and "unusable" in caplog.text
    assert KEY not in repr(j) + str(j)


def test_the_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, server: OpenAIServer):
    monkeypatch.delenv("VITSCOPE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = SortEvalConfig(run="r", judge="http", judge_url=server.url, judge_model="m")
    with pytest.raises(
        BadSetting, match=r"--judge-key-env.*VITSCOPE_JUDGE_API_KEY.*OPENAI_API_KEY"
    ):
        HttpJudge.from_config(config)
    monkeypatch.setenv("OPENAI_API_KEY", "other")
    monkeypatch.setenv("VITSCOPE_JUDGE_API_KEY", KEY)
    assert ask(HttpJudge.from_config(config)) == "A"


def test_the_backoff_doubles_up_to_its_cap_and_a_retry_after_wins(
    monkeypatch: pytest.MonkeyPatch, server: OpenAIServer
):
    pauses: list[float] = []
    monkeypatch.setattr(judge_http.time, "sleep", pauses.append)
    server.faults += ["500", "500", "500"]
    assert ask(judge(server, backoff=0.01)) == "A"
    assert pauses == pytest.approx([0.01, 0.02, 0.04])
    pauses.clear()
    server.faults += ["500", "500", "429"]  # this 429 says Retry-After: 0
    assert ask(judge(server, backoff=40.0)) == "A"
    assert pauses == [40.0, judge_http.MAX_WAIT, 0.0]


def test_the_sort_eval_takes_url_model_and_key_variable_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, server: OpenAIServer
):
    monkeypatch.setenv("VITSCOPE_JUDGE_URL", server.url)
    monkeypatch.setenv("VITSCOPE_JUDGE_MODEL", "model-from-env")
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    config = SortEvalConfig(run="r", judge="http", judge_key_env="MY_JUDGE_KEY", judge_retries=0)
    j = HttpJudge.from_config(config)
    assert ask(j) == "A" and server.requests[-1]["model"] == "model-from-env"
    assert (j.retries, j.timeout) == (0, 60.0)
    flagged = dataclasses.replace(config, judge_model="model-from-flag", judge_timeout=2.5)
    assert (
        ask(HttpJudge.from_config(flagged)) == "A"
        and server.requests[-1]["model"] == "model-from-flag"
    )
    assert HttpJudge.from_config(flagged).timeout == 2.5
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match=r"^--judge-key-env MY_JUDGE_KEY: that environment"):
        HttpJudge.from_config(config)
