"""The sort eval's judge over HTTP: any OpenAI-compatible vision chat endpoint, stdlib only.

The eval loop owns resume and the answers file; a judge asks one question per call and says
A, B or None (unusable). Transport failures are retried; a judgement is never asked twice.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Literal

from PIL import Image

from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.support.errors import BadSetting, Unreachable

log = logging.getLogger(__name__)

PROMPT = (
    "Image 1 is feature A's grid: the images that activate feature A most. "
    "Image 2 is feature B's grid: the images that activate feature B most. "
    "Image 3 is the query. Which feature does the query belong to? "
    "Answer with exactly one letter, A or B."
)
URL_VAR, MODEL_VAR = "VITSCOPE_JUDGE_URL", "VITSCOPE_JUDGE_MODEL"
KEY_VARS = ("VITSCOPE_JUDGE_API_KEY", "OPENAI_API_KEY")
DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
KEY_SOURCES = f"the variable --judge-key-env names, else ${KEY_VARS[0]} or ${KEY_VARS[1]}"
MAX_TOKENS = 16  # room for "A" or a short sentence, not an essay
MAX_REPLY = 200  # characters: longer replies are reasoning, not an answer, and count as unusable
MAX_WAIT = 60.0  # seconds: the cap on one backoff or Retry-After sleep
_LETTERS: dict[str, Literal["A", "B"]] = {"A": "A", "B": "B"}
# In a sentence only capitals count: a lowercase "a" is the article, and accepting "b" alone
# would bias the parser towards B.
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])[AB](?![A-Za-z0-9])")


class JudgeError(Unreachable):
    """The endpoint could not be asked: a bad key or URL, or still failing after the retries."""


def parse_letter(reply: str) -> Literal["A", "B"] | None:
    """A bare letter (any case, any punctuation around it), or a short sentence naming one."""
    bare = _LETTERS.get(reply.strip(string.whitespace + string.punctuation).upper())
    if bare or len(reply) > MAX_REPLY:
        return bare
    found = set(_STANDALONE.findall(reply))
    return _LETTERS[found.pop()] if len(found) == 1 else None


def data_uri(image: Image.Image) -> str:
    """A JPEG data URI, the image form every OpenAI-compatible vision endpoint accepts."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _hint(status: int) -> str:
    if status in (401, 403):
        return f"check the API key in {KEY_SOURCES}"
    if status == 404:
        return "check --judge-url (it usually ends in /v1) and --judge-model"
    return "check the model name and that it accepts images"


def checked_url(url: str) -> str:
    """The judge URL if it is http(s) with a host and no user:key@ part (a key there would be
    printed with every message that names the endpoint); else one line without the userinfo."""
    parts = urllib.parse.urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    if "@" in parts.netloc:
        raise BadSetting(
            f"--judge-url {shown}: expected a URL without a user:key@ part, found one; drop it "
            f"and export the key in {KEY_SOURCES}"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSetting(
            f"--judge-url {shown}: expected an http:// or https:// URL with a host (an "
            "OpenAI-compatible endpoint, e.g. https://api.openai.com/v1); fix the URL"
        )
    return url


class HttpJudge:
    """Asks a vision chat model which feature's grid a query image belongs to.

    `requests` counts HTTP attempts, `retried` the retries among them, `unusable` the replies
    that named neither or both letters. The key lives only in the Authorization header.
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        if not api_key:
            raise BadSetting(
                f"the http judge: expected an API key, found none; export it in {KEY_SOURCES}"
            )
        self.url = checked_url(base_url).rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.backoff = model, timeout, backoff
        self.retries = max(0, retries)
        self._key = api_key
        self.requests = self.retried = self.unusable = 0

    @classmethod
    def from_config(cls, config: SortEvalConfig) -> HttpJudge:
        """Every setting of the http judge, from one place: a flag, else its environment
        variable, else the default (the key only ever from the environment, never a flag)."""
        url = config.judge_url or os.environ.get(URL_VAR) or DEFAULT_URL
        model = config.judge_model or os.environ.get(MODEL_VAR) or DEFAULT_MODEL
        if config.judge_key_env:
            key = os.environ.get(config.judge_key_env)
            if not key:
                raise BadSetting(
                    f"--judge-key-env {config.judge_key_env}: that environment variable is not "
                    "set; export the API key in it"
                )
        else:
            key = next(filter(None, map(os.environ.get, KEY_VARS)), "")
        return cls(url, model, key, timeout=config.judge_timeout, retries=config.judge_retries)

    def __repr__(self) -> str:
        return f"HttpJudge(url={self.url!r}, model={self.model!r})"

    def answer(
        self, grid_a: Image.Image, grid_b: Image.Image, query: Image.Image
    ) -> Literal["A", "B"] | None:
        """The judge's letter, or None (counted in `unusable`) when the reply names no clear one."""
        images = [
            {"type": "image_url", "image_url": {"url": data_uri(im)}}
            for im in (grid_a, grid_b, query)
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, *images]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        raw = self._post(json.dumps(body).encode())
        try:
            reply = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            reply = None
        letter = parse_letter(reply) if isinstance(reply, str) else None
        if letter is None:
            self.unusable += 1
            log.info(
                "judge %s: unusable reply %s",
                self.url,
                self._scrub(raw.decode(errors="replace"))[:120],
            )
        return letter

    def _post(self, data: bytes) -> bytes:
        """The response body of a 2xx, retrying 429, 5xx, timeouts and dropped connections."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"}
        for attempt in range(self.retries + 1):
            self.requests += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            wait = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = f"HTTP {err.code} {self._excerpt(err)}"
                if err.code != 429 and err.code < 500:
                    raise JudgeError(
                        f"judge endpoint {self.url} answered {detail}: {_hint(err.code)}"
                    ) from None
                wait = retry_after(err.headers.get("Retry-After"))
            except (OSError, HTTPException) as err:  # timeouts, refused or dropped connections
                detail = self._scrub(f"{type(err).__name__}: {err}")
            if attempt == self.retries:
                break
            pause = min(MAX_WAIT, self.backoff * 2**attempt if wait is None else wait)
            self.retried += 1
            log.warning(
                "judge %s: %s; retry %d/%d in %.2f s",
                self.url,
                detail,
                attempt + 1,
                self.retries,
                pause,
            )
            time.sleep(pause)
        raise JudgeError(
            f"judge endpoint {self.url} still failing after {self.retries + 1} "
            f"attempts (last: {detail}): try later, or raise the timeout or the retries "
            "(--judge-timeout, --judge-retries)"
        )

    def _excerpt(self, err: urllib.error.HTTPError) -> str:
        """The start of an error body, scrubbed before it is cut so no piece of the key survives."""
        try:
            body = err.read(1 << 16).decode(errors="replace")
        except (OSError, HTTPException):
            body = ""
        return self._scrub(body)[:300]

    def _scrub(self, text: str) -> str:
        """One line with the key blanked out, safe for a log or an exception message."""
        return " ".join(text.replace(self._key, "***").split())
