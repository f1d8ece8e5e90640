"""The CoT-Editing Consistency (CEC) judge: a VLM served by vLLM scores 0-10 how well an edit follows its Meta-CoT.

``CECJudge`` is a reward per :mod:`rewards.contract` (scale ``(0, 10)``, ``None`` = no score). For each sample it
sends one chat request with the source image, the edited image, the instruction and the rendered Meta-CoT, laid
out by a versioned prompt file ``rewards/prompts/<name>.txt``; the judge exposes which one it used
(:attr:`CECJudge.prompt_id` = name + content hash).

Prompt files are plain text with four placeholders, each exactly once: ``{{source_image}}`` and
``{{edited_image}}`` (where the images go), ``{{instruction}}`` and ``{{cot}}`` (the untrusted text, which the file
must enclose in ``<instruction>...</instruction>`` and ``<cot>...</cot>``). Untrusted text is inserted as data: any
``<`` that would open or close one of those tags inside it is written ``&lt;``, so whatever the text contains, the
prompt holds exactly one instruction block and one CoT block. Substitution is single-pass, so text containing
``{{cot}}`` is never expanded.

Score modes (``mode``):

- ``"parse"``: free reply, read strictly: the whole reply is one integer 0-10, or its last non-empty line is
  ``Score: N``. Anything else is no score (never a default).
- ``"choice"``: vLLM structured outputs restrict the reply to ``"0"`` .. ``"10"``.
- ``"logprobs"``: the expected score ``sum_s s * p(s)`` over the score tokens among the first position's
  ``top_logprobs`` (renormalised over those present; None when none is). The reply is also restricted to
  ``"0"`` .. ``"10"``, so on a server started by ``metacot reward serve`` (``--logprobs-mode processed_logprobs``)
  the listed probabilities are exactly those of the valid scores. Tokenizers that split ``"10"`` into ``"1"``,
  ``"0"`` (Qwen's do) make ``p("1")`` the mass of both 1 and 10: it is split by ``p("0" | "1")`` read at the
  second position, from the reply itself when its greedy path went through ``"1"``, else from one follow-up request
  restricted to ``"1"``/``"10"``. Follow-ups are skipped when ``p("1") < 1e-3`` (error below 0.01 points).

Replies without a score are counted in :attr:`CECJudge.stats` and logged with their raw text.

Deliberately left out: judging without images (text-only), multi-turn judging, and averaging several samples per
edit (use ``mode="logprobs"`` for a smooth score instead).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rewards.client import ChatClient, ChatRequest, ChatResult, Deadline, image_part, text_part
from rewards.contract import RewardBatch

if TYPE_CHECKING:  # pragma: no cover
    import httpx

log = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).parent / "prompts"
MODES = ("parse", "choice", "logprobs")
SCORE_CHOICES = tuple(str(i) for i in range(11))
TOP_LOGPROBS = 20  # vLLM's default ceiling (--max-logprobs)
TEN_SPLIT_MIN_P = 1e-3  # below this p("1"), skip the "1"-vs-"10" follow-up: it moves the score < 0.01
_PLACEHOLDERS = ("source_image", "edited_image", "instruction", "cot")
_BLOCKS = ("instruction", "cot")
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
# A "<" that would open or close one of our data tags (any case, spaces, unterminated): the escape target.
_TAG_OPEN_RE = re.compile(r"<(?=\s*/?\s*(?:" + "|".join(_BLOCKS) + r")\b)", re.IGNORECASE)
_SCORE_LINE_RE = re.compile(r"score\s*:\s*(\d+)", re.IGNORECASE)
_BARE_INT_RE = re.compile(r"\d+")


# ------------------------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    """A versioned prompt file: ``name`` (file stem), ``text``, ``sha`` (first 12 hex of its SHA-256)."""

    name: str
    text: str
    sha: str

    @property
    def id(self) -> str:
        """``name@sha``: what a score was produced with."""
        return f"{self.name}@{self.sha}"


def available_prompts() -> list[str]:
    """Names of the prompt variants shipped in ``rewards/prompts/``."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def load_prompt(name_or_path: str | Path) -> Prompt:
    """Load and validate a prompt variant by name (``cec_v1``) or by path to a ``.txt`` file.

    Raises:
        FileNotFoundError: no such variant (the message lists the shipped ones).
        ValueError: a placeholder is missing, repeated or unknown, or a data block is not enclosed in its tags.
    """
    path = Path(name_or_path)
    if path.suffix != ".txt":
        path = PROMPT_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {path}; shipped variants: {', '.join(available_prompts())}")
    text = path.read_text(encoding="utf-8")
    found = Counter(m.group(1) for m in _PLACEHOLDER_RE.finditer(text))
    wrong = {k: found.get(k, 0) for k in _PLACEHOLDERS if found.get(k, 0) != 1}
    wrong.update({k: n for k, n in found.items() if k not in _PLACEHOLDERS})
    if wrong:
        raise ValueError(
            f"prompt {path}: each of {{{{{'}}, {{'.join(_PLACEHOLDERS)}}}}} must appear exactly once and nothing "
            f"else in double braces; counts that are off: {wrong}"
        )
    for block in _BLOCKS:
        pattern = rf"<{block}>\s*\{{\{{\s*{block}\s*\}}\}}\s*</{block}>"
        if len(re.findall(pattern, text)) != 1 or len(_TAG_OPEN_RE.findall(text)) != 2 * len(_BLOCKS):
            raise ValueError(
                f"prompt {path}: {{{{{block}}}}} must be enclosed as <{block}>{{{{{block}}}}}</{block}>, and those "
                "tags may appear nowhere else (they delimit untrusted text)"
            )
    return Prompt(path.stem, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12])


def escape_untrusted(text: str) -> str:
    """Neutralise every ``<`` that would open or close an ``instruction``/``cot`` tag (written ``&lt;``)."""
    return _TAG_OPEN_RE.sub("&lt;", text)


def render_segments(prompt: Prompt, instruction: str, cot: str) -> list[tuple[str, str]]:
    """Fill a prompt: a list of ``("text", str)`` and ``("image", "source" | "edited")`` segments, in order.

    Untrusted text is escaped (:func:`escape_untrusted`) and substituted in one pass (never re-expanded).
    """
    values = {"instruction": escape_untrusted(instruction), "cot": escape_untrusted(cot)}
    segments: list[tuple[str, str]] = []
    pos = 0
    text = ""
    for m in _PLACEHOLDER_RE.finditer(prompt.text):
        text += prompt.text[pos : m.start()]
        pos = m.end()
        key = m.group(1)
        if key in values:
            text += values[key]
            continue
        if text.strip():
            segments.append(("text", text.strip("\n")))
        segments.append(("image", key.removesuffix("_image")))
        text = ""
    text += prompt.text[pos:]
    if text.strip():
        segments.append(("text", text.strip("\n")))
    return segments


def render_text(prompt: Prompt, instruction: str, cot: str) -> str:
    """The filled prompt as one string, images shown as ``[source image]`` / ``[edited image]`` (for logs, tests)."""
    return "\n".join(v if k == "text" else f"[{v} image]" for k, v in render_segments(prompt, instruction, cot))


def cot_text(cot: Any) -> str:
    """The CoT as the judge reads it: a ``MetaCoT`` rendered by :func:`metacot.cot.render`, a dict in
    :func:`metacot.cot.to_dict` form, text as is, or a marker when the sample has none.

    Raises:
        TypeError: anything else.
    """
    if cot is None:
        return "(no Meta-CoT was given for this edit)"
    if isinstance(cot, str):
        return cot
    from metacot.cot import MetaCoT, from_dict, render

    if isinstance(cot, dict):
        cot = from_dict(cot)
    if isinstance(cot, MetaCoT):
        return render(cot)
    raise TypeError(f"a CoT must be a MetaCoT, its dict form, text or None; got {type(cot).__name__}")


# ------------------------------------------------------------------------------------------------------ reading
def parse_score(text: str) -> tuple[int | None, str]:
    """Strict read of a free reply: the whole reply is one integer, or the last non-empty line is ``Score: N``.

    Returns:
        (score, "") or (None, why): ``"empty reply"``, ``"no score"``, ``"score N outside 0-10"``.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, "empty reply"
    if len(lines) == 1 and _BARE_INT_RE.fullmatch(lines[0]):
        value = int(lines[0])
    else:
        m = _SCORE_LINE_RE.fullmatch(lines[-1])
        if m is None:
            return None, "no score"
        value = int(m.group(1))
    if not 0 <= value <= 10:
        return None, f"score {value} outside 0-10"
    return value, ""


def first_token_scores(result: ChatResult) -> dict[int, float]:
    """Probability of each score value among the first position's ``top_logprobs`` (not renormalised).

    Tokens are matched after stripping spaces; ``"10"`` counts only where it is a single token.
    """
    if not result.logprobs:
        return {}
    probs: dict[int, float] = {}
    for token, logprob in result.logprobs[0].top:
        key = token.strip()
        if key in SCORE_CHOICES:
            probs[int(key)] = probs.get(int(key), 0.0) + math.exp(logprob)
    return probs


def ten_share(result: ChatResult) -> float | None:
    """``p("0" | "1")`` at the second position of a reply whose first token is ``"1"``; None when it is not."""
    if not result.logprobs or len(result.logprobs) < 2 or result.logprobs[0].token.strip() != "1":
        return None
    top = result.logprobs[1].top
    total = sum(math.exp(lp) for _, lp in top)
    zero = sum(math.exp(lp) for token, lp in top if token.strip() == "0")
    return zero / total if total > 0 else None


def expected_score(probs: dict[int, float]) -> float | None:
    """``sum_s s * p(s) / sum_s p(s)``; None when no score has mass."""
    total = sum(probs.values())
    if total <= 0:
        return None
    return sum(s * p for s, p in probs.items()) / total


# ------------------------------------------------------------------------------------------------------ the judge
@dataclass
class Judgement:
    """One sample's outcome: ``score`` (None = no score, with ``reason``) and the ``raw`` reply text."""

    score: float | None
    raw: str
    reason: str = ""


@dataclass
class JudgeStats:
    """Counters kept on the judge across calls (read them, log them, reset with ``judge.stats = JudgeStats()``)."""

    samples: int = 0
    scored: int = 0
    no_score: int = 0
    followup_requests: int = 0
    reasons: Counter = field(default_factory=Counter)
    recent_unscored: deque = field(default_factory=lambda: deque(maxlen=20))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for metrics (reasons flattened as ``no_score/<reason>``)."""
        out: dict[str, Any] = {
            "samples": self.samples,
            "scored": self.scored,
            "no_score": self.no_score,
            "followup_requests": self.followup_requests,
        }
        out.update({f"no_score/{k}": v for k, v in self.reasons.items()})
        return out


class CECJudge:
    """CoT-Editing Consistency reward from a VLM judge; scale (0, 10), None = no score.

    Args:
        url: judge server root (``metacot reward serve`` prints it).
        model: served model name; None = the server's only model.
        prompt: prompt variant name in ``rewards/prompts/`` or path to a ``.txt`` file.
        mode: ``"parse"``, ``"choice"`` or ``"logprobs"`` (module docstring).
        concurrency: requests in flight.
        timeout_s: limit of one request attempt.
        retries: further attempts after a transient failure.
        total_timeout_s: limit of one batch, retries included; past it the call raises instead of hanging.
        api_key_env: name of the environment variable holding the server's API key (None = no key).
        max_tokens: reply budget in ``"parse"`` mode (the other modes need 3).
        client: an existing :class:`ChatClient` to share (then url/model/concurrency/... are taken from it).
        transport: httpx transport for tests (``httpx.MockTransport``); None = the network.

    Raises:
        ValueError: unknown mode, or the key's environment variable is unset.
        ServerUnavailable, JudgeError: the server is unreachable or serves another model.
    """

    scale = (0.0, 10.0)

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        prompt: str = "cec_v1",
        mode: str = "choice",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 4,
        total_timeout_s: float = 600.0,
        api_key_env: str | None = None,
        max_tokens: int = 256,
        client: ChatClient | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"CECJudge mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.prompt = load_prompt(prompt)
        self.max_tokens = max_tokens
        self.stats = JudgeStats()
        if client is None:
            api_key = None
            if api_key_env:
                api_key = os.environ.get(api_key_env)
                if not api_key:
                    raise ValueError(f"CECJudge: api_key_env={api_key_env!r} but that environment variable is unset")
            client = ChatClient(
                url, model, api_key=api_key, concurrency=concurrency, timeout_s=timeout_s, retries=retries,
                total_timeout_s=total_timeout_s, transport=transport,
            )
        self.client = client

    @property
    def prompt_id(self) -> str:
        """``name@sha`` of the prompt file used."""
        return self.prompt.id

    @property
    def model(self) -> str:
        """The served model name the judge talks to."""
        return str(self.client.model)

    def describe(self) -> dict[str, str]:
        """What produced the scores, for run configs and logs: url, model, prompt name and hash, mode."""
        return {"url": self.client.url, "model": self.model, "prompt": self.prompt.name,
                "prompt_sha": self.prompt.sha, "mode": self.mode}

    def close(self) -> None:
        """Release the client's connections."""
        self.client.close()

    def __call__(self, batch: RewardBatch) -> list[float | None]:
        return [j.score for j in self.judge(batch)]

    def judge(
        self, batch: RewardBatch, on_result: Callable[[int, Judgement], None] | None = None
    ) -> list[Judgement]:
        """Score a batch; one :class:`Judgement` per sample, in order (``on_result`` sees each as it finishes).

        Raises:
            RequestRefused, ServerUnavailable: see :class:`rewards.client.ChatClient`; never returns partially.
        """
        requests = self.build_requests(batch)
        ids = list(batch.extras.get("ids", range(len(batch))))

        def record(index: int, result: Judgement) -> None:
            self._count(ids[index], result)
            if on_result is not None:
                on_result(index, result)

        return self.client.map(self._judge_one, requests, record)

    def build_requests(self, batch: RewardBatch) -> list[ChatRequest]:
        """One request per sample (images encoded once per distinct image object)."""
        encoded: dict[int, dict[str, Any]] = {}

        def part(image: Any) -> dict[str, Any]:
            if id(image) not in encoded:
                encoded[id(image)] = image_part(image)
            return encoded[id(image)]

        requests = []
        for source, edited, instruction, cot in zip(
            batch.source_images, batch.edited_images, batch.instructions, batch.cots, strict=True
        ):
            images = {"source": source, "edited": edited}
            content = [
                text_part(value) if kind == "text" else part(images[value])
                for kind, value in render_segments(self.prompt, instruction, cot_text(cot))
            ]
            messages = [{"role": "user", "content": content}]
            if self.mode == "parse":
                requests.append(ChatRequest(messages, max_tokens=self.max_tokens))
            elif self.mode == "choice":
                requests.append(ChatRequest(messages, max_tokens=3, choice=SCORE_CHOICES))
            else:
                requests.append(ChatRequest(messages, max_tokens=3, choice=SCORE_CHOICES, top_logprobs=TOP_LOGPROBS))
        return requests

    # ---------------------------------------------------------------------------------------------- internals
    def _judge_one(self, request: ChatRequest, deadline: Deadline) -> Judgement:
        result = self.client.chat_one(request, deadline)
        if self.mode == "parse":
            score, reason = parse_score(result.text)
            return Judgement(None if score is None else float(score), result.text, reason)
        if self.mode == "choice":
            text = result.text.strip()
            if text in SCORE_CHOICES:
                return Judgement(float(text), result.text)
            return Judgement(None, result.text, "reply outside the score choices (is the server vLLM?)")
        probs = first_token_scores(result)
        if not probs:
            return Judgement(None, result.text, "no score token among top_logprobs")
        p_one = probs.get(1, 0.0)
        if p_one >= TEN_SPLIT_MIN_P:
            share = ten_share(result)
            if share is None:
                forced = ChatRequest(request.messages, max_tokens=2, choice=("1", "10"), top_logprobs=TOP_LOGPROBS)
                share = ten_share(self.client.chat_one(forced, deadline))
                # Counted here, on a worker thread: a lone int += under the GIL is enough for a statistic.
                self.stats.followup_requests += 1
            # None: the follow-up's first token was not "1", so the tokenizer writes "10" as one token, which
            # the first position already counted; the "1" mass is then all 1.
            probs[1] = p_one * (1.0 - (share or 0.0))
            probs[10] = probs.get(10, 0.0) + p_one * (share or 0.0)
        return Judgement(expected_score(probs), result.text)

    def _count(self, sample_id: Any, result: Judgement) -> None:
        self.stats.samples += 1
        if result.score is not None:
            self.stats.scored += 1
            return
        self.stats.no_score += 1
        self.stats.reasons[result.reason] += 1
        self.stats.recent_unscored.append((sample_id, result.raw))
        log.warning(
            "CEC judge (%s, %s) gave no score for sample %s (%s); raw reply: %r",
            self.prompt_id, self.mode, sample_id, result.reason, result.raw[:500],
        )
