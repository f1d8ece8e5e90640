"""The one OpenAI-compatible chat client of metacot (the CEC judge and the data-annotation recipe both use it).

It talks to a vLLM server (``metacot reward serve``) or any server with the same ``/v1/chat/completions`` API:

- images go inline as base64 PNG data URLs (:func:`image_part`), so the server needs no access to our files;
- requests run concurrently on a bounded thread pool (:meth:`ChatClient.map` / :meth:`ChatClient.chat`), results
  come back in input order, each input exactly once, and an optional ``on_result`` callback sees each one as soon
  as it is done (on the calling thread, so a writer needs no lock);
- transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential backoff and
  jitter; refusals (other 4xx) are not, and raise :class:`RequestRefused` with the server's reason and a hint;
- every call is bounded: per-attempt timeouts, a retry limit and a total deadline per batch, after which
  :class:`ServerUnavailable` names the URL and the last error. A judge that dies never hangs the trainer;
- :meth:`ChatClient.check` (run at construction) checks ``/health`` and ``/v1/models`` and refuses a server that
  serves a different model than asked for.

Structured outputs follow vLLM's request extension (``structured_outputs: {"choice": [...]}`` or ``{"json":
schema}``); logprobs follow the OpenAI fields (``logprobs``, ``top_logprobs``).

Deliberately left out: streaming, tool calls, the legacy completions endpoint, and asyncio (a thread pool is enough
for the few dozen requests in flight that a judge needs, and keeps the API synchronous for the trainer).
"""

from __future__ import annotations

import base64
import io
import logging
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import httpx

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# vLLM answers logprobs of tokens masked out by a constraint as -9999.0 (its JSON stand-in for -inf).
_MASKED_LOGPROB = -9999.0


class JudgeError(RuntimeError):
    """Base class of the client's errors."""


class ServerUnavailable(JudgeError):
    """The server cannot be reached, keeps failing, or did not answer before the deadline."""


class RequestRefused(JudgeError):
    """The server answered with a 4xx refusal other than 429: retrying the same request cannot help."""


def text_part(text: str) -> dict[str, Any]:
    """A text content part of a chat message."""
    return {"type": "text", "text": text}


def image_data_url(image: Image.Image | str | Path) -> str:
    """Encode an image (PIL or a path) as a ``data:image/png;base64,...`` URL (converted to RGB PNG)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            pil = opened.convert("RGB")
    else:
        pil = image.convert("RGB") if image.mode != "RGB" else image
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(image: Image.Image | str | Path) -> dict[str, Any]:
    """An image content part of a chat message, inline as a base64 PNG data URL."""
    return {"type": "image_url", "image_url": {"url": image_data_url(image)}}


@dataclass
class ChatRequest:
    """One chat completion request.

    Attributes:
        messages: OpenAI chat messages (``content`` a string or a list of :func:`text_part`/:func:`image_part`).
        max_tokens: generation budget.
        temperature: 0 = greedy (deterministic), the judge's default.
        choice: restrict the reply to one of these strings (vLLM structured outputs).
        json_schema: restrict the reply to JSON matching this schema (vLLM structured outputs).
        top_logprobs: when set, ask for the logprob of each generated token and this many alternatives per position.
    """

    messages: list[dict[str, Any]]
    max_tokens: int = 16
    temperature: float = 0.0
    choice: Sequence[str] | None = None
    json_schema: dict[str, Any] | None = None
    top_logprobs: int | None = None

    def payload(self, model: str) -> dict[str, Any]:
        """The JSON body for ``/v1/chat/completions``.

        Raises:
            ValueError: both ``choice`` and ``json_schema`` are set (a reply cannot obey two grammars).
        """
        body: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.choice is not None and self.json_schema is not None:
            raise ValueError("ChatRequest: set either choice or json_schema, not both")
        if self.choice is not None:
            body["structured_outputs"] = {"choice": list(self.choice)}
        if self.json_schema is not None:
            body["structured_outputs"] = {"json": self.json_schema}
        if self.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def has_images(self) -> bool:
        """Whether any message carries an image part."""
        return any(
            isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
            for m in self.messages
        )


@dataclass
class TokenLogprob:
    """One generated position: the token, its logprob, and the alternatives the server listed.

    ``top`` keeps (token text, logprob) pairs in the server's order; tokens a constraint masked out are dropped.
    """

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ChatResult:
    """A completed chat request.

    Attributes:
        text: the reply.
        finish_reason: ``"stop"``, ``"length"``, ... as the server said.
        logprobs: one entry per generated position when logprobs were asked for, else None.
        attempts: how many attempts it took (1 = no retry).
        latency_s: wall time of the successful attempt.
    """

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    attempts: int
    latency_s: float


class Deadline:
    """The time left to a batch, and a flag that stops its remaining work once the batch has failed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.cancelled = threading.Event()

    def remaining(self) -> float:
        return self.end - time.monotonic()


def _parse_logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        return None
    out = []
    for pos in content:
        top = [
            (t["token"], float(t["logprob"]))
            for t in pos.get("top_logprobs") or []
            if t.get("logprob") is not None and float(t["logprob"]) > _MASKED_LOGPROB
        ]
        lp = pos.get("logprob")
        out.append(TokenLogprob(pos.get("token", ""), float(lp) if lp is not None else float("-inf"), top))
    return out


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if "message" in body:
            return str(body["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:500]


class ChatClient:
    """Bounded, retrying, order-preserving client for one model on one OpenAI-compatible server.

    Args:
        url: server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted and dropped).
        model: the served model name; None = the server's only model (refused when it serves several).
        api_key: bearer token, if the server was started with one.
        concurrency: requests in flight at once.
        timeout_s: limit of one attempt (connect + answer).
        retries: further attempts after a transient failure (so ``retries + 1`` attempts at most).
        backoff_s: first retry delay; doubles each retry (with jitter), capped at 8x.
        total_timeout_s: limit of one :meth:`map`/:meth:`chat` call, retries included.
        check: run :meth:`check` now (health + model name).
        transport: httpx transport for tests (``httpx.MockTransport``); None = the network.

    Raises:
        ServerUnavailable, JudgeError: from :meth:`check`.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        total_timeout_s: float = 600.0,
        check: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if concurrency < 1 or retries < 0 or timeout_s <= 0 or total_timeout_s <= 0 or backoff_s < 0:
            raise ValueError(
                f"ChatClient: need concurrency >= 1, retries >= 0, timeout_s > 0, total_timeout_s > 0, "
                f"backoff_s >= 0; got {concurrency}, {retries}, {timeout_s}, {total_timeout_s}, {backoff_s}"
            )
        self.url = re.sub(r"/v1/?$", "", url.rstrip("/"))
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.total_timeout_s = total_timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )
        if check:
            self.check()

    # ----------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the connections."""
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> str:
        """Check ``/health`` and ``/v1/models``; resolve ``self.model`` when it was None.

        Returns:
            The served model name used from now on.

        Raises:
            ServerUnavailable: the server cannot be reached or is not healthy.
            RequestRefused: the server wants an API key we did not give (or a different one).
            JudgeError: the server does not serve the requested model.
        """
        start = "start one with `metacot reward serve --model DIR` or fix the URL"
        try:
            health = self._http.get("/health", timeout=10.0)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"cannot reach the judge server at {self.url} ({exc!r}); {start}") from exc
        if health.status_code != 200:
            raise ServerUnavailable(
                f"{self.url}/health answered HTTP {health.status_code}: the server is up but not healthy "
                "(still loading, or its engine died: read its log)"
            )
        try:
            listing = self._http.get("/v1/models", timeout=10.0)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"cannot reach {self.url}/v1/models ({exc!r}); {start}") from exc
        if listing.status_code in (401, 403):
            raise RequestRefused(
                f"{self.url}/v1/models answered HTTP {listing.status_code}: the server wants an API key; pass the "
                "one it was started with (--api-key when serving; api_key_env in the judge config)"
            )
        if listing.status_code != 200:
            raise ServerUnavailable(
                f"{self.url}/v1/models answered HTTP {listing.status_code}: {_server_message(listing)}"
            )
        served = [m.get("id") for m in listing.json().get("data", [])]
        if self.model is None:
            if len(served) != 1:
                raise JudgeError(f"{self.url} serves {served}; name the model to use (model=... / --model)")
            self.model = served[0]
        elif self.model not in served:
            raise JudgeError(
                f"{self.url} serves {served}, not {self.model!r}: use one of those names, or start the server "
                f"with --served-model-name {self.model}"
            )
        return str(self.model)

    # ----------------------------------------------------------------------------------------------- requests
    def chat_one(self, request: ChatRequest, deadline: Deadline | None = None) -> ChatResult:
        """Send one request with retries (within ``deadline``, or ``total_timeout_s`` from now).

        Raises:
            RequestRefused: a 4xx refusal (other than 429).
            ServerUnavailable: retries exhausted, deadline passed, or the batch was cancelled.
        """
        if self.model is None:
            self.check()
        deadline = deadline or Deadline(self.total_timeout_s)
        payload = request.payload(str(self.model))
        last = "no attempt made"
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            if deadline.cancelled.is_set():
                raise ServerUnavailable(f"request to {self.url} cancelled: another request of its batch failed")
            remaining = deadline.remaining()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"judge server {self.url} did not finish the batch within total_timeout_s={deadline.seconds:g} s "
                    f"(last error: {last}); the server may be overloaded or hung: read its log"
                )
            t0 = time.monotonic()
            try:
                response = self._http.post("/v1/chat/completions", json=payload, timeout=min(self.timeout_s, remaining))
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._result(response, attempt, time.monotonic() - t0)
                if response.status_code != 429 and response.status_code < 500:
                    raise self._refusal(response, request)
                last = f"HTTP {response.status_code}: {_server_message(response)[:200]}"
            if attempt < attempts:
                delay = min(self.backoff_s * 2 ** (attempt - 1), 8 * self.backoff_s) * (0.5 + random.random() / 2)
                log.info("judge request failed (%s); retry %d/%d in %.2f s", last, attempt, self.retries, delay)
                deadline.cancelled.wait(min(delay, max(0.0, deadline.remaining())))
        raise ServerUnavailable(
            f"judge server {self.url} failed {attempts} attempts (last error: {last}); is it still running? "
            "Restart it (`metacot reward serve`) and rerun; finished results were kept"
        )

    def chat(
        self, requests: Sequence[ChatRequest], on_result: Callable[[int, ChatResult], None] | None = None
    ) -> list[ChatResult]:
        """Run ``requests`` concurrently; results in input order. See :meth:`map` for the guarantees."""
        return self.map(self.chat_one, requests, on_result)

    def map(
        self,
        fn: Callable[[T, Deadline], R],
        items: Sequence[T],
        on_result: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """Apply ``fn(item, deadline)`` to every item on the bounded pool, under one total deadline.

        ``fn`` is typically :meth:`chat_one` or a function making one or more :meth:`chat_one` calls for one
        sample. ``on_result(index, result)`` runs on the calling thread as each item finishes.

        Returns:
            One result per item, in input order.

        Raises:
            The first error of any item (remaining items are cancelled; those finished were passed to on_result),
            or ServerUnavailable when the deadline passes.
        """
        deadline = Deadline(self.total_timeout_s)
        # A pool per call: nothing lingers between calls, and an abandoned call's threads end with its deadline.
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(items))), thread_name_prefix="judge")
        futures: dict[Future[R], int] = {pool.submit(fn, item, deadline): i for i, item in enumerate(items)}
        results: list[Any] = [None] * len(items)
        pending = set(futures)
        try:
            while pending:
                # A little past the deadline: each request checks it itself and raises the clearer error.
                done, pending = wait(pending, timeout=max(0.0, deadline.remaining()) + 5.0, return_when=FIRST_COMPLETED)
                if not done:
                    raise ServerUnavailable(
                        f"judge server {self.url} left {len(pending)} of {len(items)} requests unanswered past "
                        f"total_timeout_s={self.total_timeout_s:g} s"
                    )
                error: BaseException | None = None
                for fut in sorted(done, key=futures.__getitem__):
                    if fut.exception() is not None:
                        error = error or fut.exception()
                        continue
                    index = futures[fut]
                    results[index] = fut.result()
                    if on_result is not None:  # finished work is handed over even when a sibling failed
                        on_result(index, results[index])
                if error is not None:
                    raise error
        except BaseException:
            deadline.cancelled.set()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    # ----------------------------------------------------------------------------------------------- helpers
    def _result(self, response: httpx.Response, attempts: int, latency_s: float) -> ChatResult:
        try:
            choice = response.json()["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise JudgeError(
                f"{self.url} answered 200 but not with an OpenAI chat completion (choices[0].message): "
                f"{response.text[:300]!r}; is this URL a vLLM/OpenAI-compatible server?"
            ) from exc
        return ChatResult(text, choice.get("finish_reason"), _parse_logprobs(choice), attempts, latency_s)

    def _refusal(self, response: httpx.Response, request: ChatRequest) -> RequestRefused:
        message = _server_message(response)
        code = response.status_code
        if code in (401, 403):
            hint = "the server wants an API key: pass the one it was started with (api_key_env / --api-key)"
        elif re.search(r"context length|max_model_len|too long", message, re.I):
            hint = "the prompt does not fit: raise --max-model-len when serving, or send smaller images"
        elif request.has_images() and re.search(r"image|multi-?modal|vision|mm_", message, re.I):
            hint = (
                "the request carries images: is the served model a vision-language model, and was the server "
                "started with --limit-mm-per-prompt allowing them (`metacot reward serve` allows 2)?"
            )
        elif code == 404:
            hint = f"unknown endpoint or model {self.model!r} on this server"
        else:
            hint = "fix the request or the server settings; retrying the same request cannot help"
        return RequestRefused(f"judge server {self.url} refused the request (HTTP {code}): {message} -- {hint}")
