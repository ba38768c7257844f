"""Verifiable math reward: final-answer extraction and math-verify checks, bounded in time.

The parent process extracts the final answer with plain string scans (never sympy, never eval) and
rejects obviously hostile answers; the symbolic check runs in separate CPU-only worker processes
(fresh interpreters that import math-verify/sympy and never jax). Every item has a hard deadline
enforced by the parent: a worker that overruns it is killed and replaced, and the item scores 0.
"""

from __future__ import annotations

import atexit
import collections
import fractions
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence

MAX_ANSWER_CHARS = 1000
MAX_NESTING = 24
_ANSWER_LINE_TAIL = 8192
_MAX_BOXED_TRIED = 8

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+)?answer[ \t]*[*_]*[ \t]*[:：](.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_MAX_BOX_GAP = 80
# Only separators between two boxes: spaces, punctuation, `and` / `or`, math delimiters, spacing
# commands, short `\\text{...}`, and `name =` before the next box.
_BOX_GAP_RE = re.compile(
    r"(?:\s|[,;.&]|\band\b|\bor\b|\$|\\[()\[\]]|\\q?quad\b|\\[,;:! ]|\\\\"
    r"|\\text\s*\{[^{}]{0,40}\}|[A-Za-z](?:_\{?\w{1,4}\}?)?\s*=)*"
)
_BOX_NAME_RE = re.compile(r"([A-Za-z](?:_\{?\w{1,4}\}?)?)\s*=\s*$")
_IS_SPLIT_RE = re.compile(r"\s(?:is|are|equals)\s", re.IGNORECASE)
# A LaTeX environment as math-verify finds it: $$..$$, \[..\], $..$ (one line), \(..\) (one line).
_ENV = (
    r"(?:(?<!\\)\$\$(?P<env1>(?:[^$]|\$(?!\$)){1,1000}?)(?<!\\)\$\$"
    r"|(?<!\\)\\\[(?P<env2>(?:[^\\]|\\(?!\])){1,1000}?)(?<!\\)\\\]"
    r"|(?<![\\\d])\$(?P<env3>(?:\\\$|[^\n$]){1,1000}?)(?<!\\)\$"
    r"|(?<!\\)\\\((?P<env4>(?:[^\\\n]|\\(?!\))){1,1000}?)(?<!\\)\\\))"
)
_FINAL_HOPE_RE = re.compile(r"(?i:final answer is):?\s*" + _ENV + r"\.?\s?I hope", re.DOTALL)
_FINAL_IS_RE = re.compile(r"(?i:final answer.{0,100}?)\s+is:?\s*" + _ENV, re.DOTALL)
_ANSWER_COLON_ENV_RE = re.compile(r"(?i:answer):.{0,50}?" + _ENV, re.DOTALL)
_ANSWER_ENV_RE = re.compile(r"(?i:answer).{0,50}?" + _ENV, re.DOTALL)
_MAX_ANCHORS_TRIED = 8
_ANCHORS = {
    _FINAL_HOPE_RE: re.compile(r"(?i:final answer is)"),
    _FINAL_IS_RE: re.compile(r"(?i:final answer)"),
    _ANSWER_COLON_ENV_RE: re.compile(r"(?i:answer):"),
    _ANSWER_ENV_RE: re.compile(r"(?i:answer)"),
}
_GOLD_TEXT_RE = re.compile(r"\\boxed|\\fbox|\$|\\\(|\\\[")
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
_BIG_FACTORIAL_RE = re.compile(r"\d{5,}\s*!|!\s*[)}\]]\s*!")
_HUGE_EXPONENT_RE = re.compile(r"\^\s*\{?\s*\d{6,}")
_NUMERIC_TOWER_RE = re.compile(r"\d\s*\^\s*(?:\{[\d\s.+\-*()]*|\(?[\d\s.]*)\^|\d\s*\*\*\s*\(?\d[\d\s.]*\*\*")
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_FRAC_DIGITS_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_FRAC_BRACE_DIGIT_RE = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\})\s*(\d)")
_FRAC_DIGIT_BRACE_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\{)")
_SQRT_RE = re.compile(r"\\sqrt\s*(\d|[a-zA-Z](?![a-zA-Z]))")
_NUMBER_RE = re.compile(
    r"-?(?:(?P<dec>\d{1,60}(?:\.\d{1,60})?)|\\frac\{(?P<num>\d{1,60})\}\{(?P<den>\d{1,60})\}"
    r"|(?P<num2>\d{1,60})/(?P<den2>\d{1,60}))"
)
_ASSIGNMENT_RE = re.compile(r"[a-zA-Z]\s*=\s*(.+)", re.DOTALL)
# Spaces around punctuation go, except after a comma: `32, 349` is a list, `32,349` a number.
_SPACE_PUNCT_RE = re.compile(r"\s*([^\w\s\\])(\s*)")
# `\\ ` is a LaTeX space but `\\\\ ` a row break followed by a space: pairs of backslashes go first.
_LATEX_SPACE_RE = re.compile(r"(\\\\)|\\ ")
_THOUSANDS_BRACE_RE = re.compile(r"(?<!\\)\{\s*,\s*\}")
_DECIMAL_COMMA_RE = re.compile(r"-?\d+,\d+")
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+")
_DROP_RE = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[!,;:]\s*")


def _matching_brace(text: str, open_pos: int, limit: int) -> int:
    """Index of the `}` closing the `{` at `open_pos`, or -1 if unclosed within `limit` characters."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_pos, min(len(text), open_pos + limit + 2)):
        tok = m.group()
        if len(tok) == 2:
            continue
        depth += 1 if tok == "{" else -1
        if depth == 0:
            return m.start()
    return -1


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of the last closed `\\boxed{...}` / `\\fbox{...}` boxes, in order (at most
    _MAX_BOXED_TRIED). A box cut off by the end of the text is skipped; one still open after
    MAX_ANSWER_CHARS ends the list with its over-long content, so that the caller refuses it."""
    starts = collections.deque(((m.start(), m.end()) for m in _BOXED_RE.finditer(text)), maxlen=_MAX_BOXED_TRIED)
    spans: list[tuple[int, int, str]] = []
    for start, pos in starts:
        rest = text[pos : pos + 2 * MAX_ANSWER_CHARS]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            open_pos = pos + len(rest) - len(stripped)
            close = _matching_brace(text, open_pos, MAX_ANSWER_CHARS)
            if close < 0:
                if len(text) - open_pos > MAX_ANSWER_CHARS + 1:
                    spans.append((start, len(text), text[open_pos + 1 : open_pos + 2 + MAX_ANSWER_CHARS]))
                continue
            spans.append((start, close + 1, text[open_pos + 1 : close]))
        elif rest[:1] == " ":
            token = stripped.split(None, 1)[0] if stripped else ""
            token = token.split("$", 1)[0]
            if token:
                spans.append((start, pos + 1 + len(token), token))
    spans.sort()
    return [span for k, span in enumerate(spans) if k == 0 or span[0] >= spans[k - 1][1]]


def _boxed_answer(text: str) -> tuple[int, str] | None:
    """(end, answer) of the last box, joined with the boxes right before it when only separators lie
    between them (`\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}` -> `(2, 2), (6, 2)`, as math-verify
    joins them); None without a closed box."""
    spans = _boxed_spans(text)
    if not spans:
        return None
    group = [spans[-1]]
    for span in reversed(spans[:-1]):
        gap = text[span[1] : group[0][0]]
        if len(gap) > _MAX_BOX_GAP or _BOX_GAP_RE.fullmatch(gap) is None:
            break
        group.insert(0, span)
    if len(group) == 1:
        return group[0][1], group[0][2]
    items: list[str] = []
    for start, _, content in group:
        named = _BOX_NAME_RE.search(text, max(0, start - 40), start)
        item = f"{named.group(1)} = {content}" if named is not None else content
        if item not in items:
            items.append(item)
    return group[-1][1], ", ".join(items)


def _last_boxed(text: str) -> str | None:
    """Content of the last closed box (joined with adjacent boxes), or None."""
    found = _boxed_answer(text)
    return None if found is None else found[1]


def _env_content(match: re.Match) -> str:
    """The math inside the first LaTeX environment group of an anchor match."""
    return next(v for k, v in match.groupdict().items() if k.startswith("env") and v is not None)


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """Match of `pattern` at the last of its anchor's occurrences where it matches (only the last
    _MAX_ANCHORS_TRIED are tried, so that a text full of anchors costs little)."""
    anchor = _ANCHORS[pattern]
    starts = collections.deque((m.start() for m in anchor.finditer(text)), maxlen=_MAX_ANCHORS_TRIED)
    for start in reversed(starts):
        found = pattern.match(text, start)
        if found is not None:
            return found
    return None


def _clean_answer_value(value: str) -> str | None:
    """An `Answer:` line's value without prose, `$`, bold or the final period
    (`The largest $n$ is 34.` -> `34`)."""
    value = value.strip().strip("*_").strip()
    inner = _last_boxed(value)
    if inner is not None:
        return inner
    tail = _IS_SPLIT_RE.split(value)[-1].strip()
    if tail.rstrip(".").strip(" $"):
        value = tail
    value = value.rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if value.startswith(left) and value.endswith(right) and len(value) >= len(left) + len(right):
            value = value[len(left) : len(value) - len(right)].strip()
            break
    return value.rstrip(".").strip() or None


def _answer_line(text: str) -> str | None:
    """Value of the last `Answer: ...` line (DAPO format), cleaned by _clean_answer_value."""
    tail = text[-_ANSWER_LINE_TAIL:]
    value = None
    for m in _ANSWER_LINE_RE.finditer(tail):
        if m.group(1).strip(" \t*_$"):
            value = m.group(1)
    return None if value is None else _clean_answer_value(value)


def extract_answer(completion: str) -> str | None:
    """Final answer of an R1-style completion, looked for after the last `</think>` (when present) in
    math-verify's order of anchors: the last box (with the boxes joined to it) or `final answer is $x$.
    I hope`, whichever ends last; then `final answer ... is $x$`; then the last `Answer:` line; then
    `answer` followed by a LaTeX environment. None when there is no answer."""
    if not isinstance(completion, str):
        return None
    cut = completion.rfind("</think>")
    text = completion[cut + len("</think>") :] if cut >= 0 else completion
    tail = text[-_ANSWER_LINE_TAIL:]
    boxed = _boxed_answer(text)
    hope = _last_match(_FINAL_HOPE_RE, tail)
    if hope is not None and (boxed is None or len(text) - len(tail) + hope.end() > boxed[0]):
        return _env_content(hope).strip()
    if boxed is not None:
        return boxed[1]
    final_is = _last_match(_FINAL_IS_RE, tail)
    if final_is is not None:
        return _env_content(final_is).strip()
    line = _answer_line(text)
    if line is not None:
        return line
    for pattern in (_ANSWER_COLON_ENV_RE, _ANSWER_ENV_RE):
        found = _last_match(pattern, tail)
        if found is not None:
            return _env_content(found).strip()
    return None


def normalize_answer(answer: str) -> str:
    """Cheap LaTeX clean-up shared by the fast path and the worker (no semantics beyond spelling)."""
    s = answer.strip()
    if s.startswith("$") and s.endswith("$"):
        s = s.strip("$")
    s = _DROP_RE.sub("", s)
    s = _LATEX_SPACE_RE.sub(lambda m: m.group(1) or " ", s)
    s = _THOUSANDS_BRACE_RE.sub(",", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_BRACE_DIGIT_RE.sub(r"\\frac\1{\2}", s)
    s = _FRAC_DIGIT_BRACE_RE.sub(r"\\frac{\1}\2", s)
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = _SCI_RE.sub(r"\1\\times10^{\2}", s)
    s = _SPACE_PUNCT_RE.sub(lambda m: ", " if m.group(1) == "," and m.group(2) else m.group(1), " ".join(s.split()))
    s = s.rstrip(".").strip()
    return s


def normalize_gold(gold: str) -> str:
    """normalize_answer, and a lone gold number with a decimal comma (`1,22`, `0,111`; not `1,000`)
    read as math-verify reads gold numbers: a decimal."""
    s = normalize_answer(gold)
    if _DECIMAL_COMMA_RE.fullmatch(s) and not _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", ".")
    return s


def strip_assignment(answer: str, gold: str) -> str:
    """`x = 5` -> `5` when the gold is not itself an equation (math-verify compares such a prediction
    by its right-hand side too; doing it here lets plain numbers skip sympy)."""
    m = _ASSIGNMENT_RE.fullmatch(answer)
    if m is None or "=" in gold or "=" in m.group(1):
        return answer
    return m.group(1)


def hostile_reason(answer: str) -> str | None:
    """Why an extracted answer is refused before sympy sees it (None if it may be verified)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "too long"
    if _CONTROL_RE.search(answer):
        return "control or undecodable characters"
    depth = max_depth = 0
    for ch in answer:
        if ch in "{([":
            depth += 1
            max_depth = max(max_depth, depth)
        elif ch in "})]":
            depth -= 1
    if max_depth > MAX_NESTING:
        return "nesting too deep"
    if _BIG_FACTORIAL_RE.search(answer):
        return "factorial of a huge number"
    if _HUGE_EXPONENT_RE.search(answer) or _NUMERIC_TOWER_RE.search(answer):
        return "numeric power too large"
    return None


def _string_key(s: str) -> str:
    """Key for the plain string match used when the gold answer does not parse."""
    return s.replace("\\text{", "{").replace(" ", "").lower()


def _simple_number(s: str) -> fractions.Fraction | None:
    """Exact value of a plain integer, decimal or fraction (`-3`, `2.50`, `\\frac{7}{2}`, `-7/2`)."""
    m = _NUMBER_RE.fullmatch(s)
    if m is None:
        return None
    sign = -1 if s.startswith("-") else 1
    if m.group("dec") is not None:
        return sign * fractions.Fraction(m.group("dec"))
    num, den = (m.group("num"), m.group("den")) if m.group("num") else (m.group("num2"), m.group("den2"))
    return sign * fractions.Fraction(int(num), int(den)) if int(den) else None


def numeric_verdict(answer: str, gold: str) -> float | None:
    """Decide plain-number pairs without sympy: 1.0 if exactly equal, 0.0 if both are integers or
    they differ far beyond math-verify's rounding tolerance, None if sympy must decide."""
    a, g = _simple_number(answer), _simple_number(gold)
    if a is None or g is None:
        return None
    if a == g:
        return 1.0
    if (a.denominator == 1 and g.denominator == 1) or abs(a - g) > 1e-3 * max(1, abs(a), abs(g)):
        return 0.0
    return None


# ----------------------------------------------------------------------------------------------
# Worker process (runs `python -c "...; _worker_main()"`; imports math-verify, never jax).


class _SoftDeadline(BaseException):
    """Raised by the in-worker alarm; a BaseException so library `except Exception` cannot eat it."""


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the parent dies (even mid-computation)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(os.environ.get("JAXRL_REWARD_PARENT_PID", os.getppid())):
        os._exit(0)


def _worker_main() -> None:
    """Serve JSON-line requests {i, a, g, t} on stdin with {i, r} replies on the protocol fd."""
    _die_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    import functools
    import logging
    import resource

    limit_mb = int(os.environ.get("JAXRL_REWARD_MEMORY_MB", "0"))
    if limit_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    sys.setrecursionlimit(3000)
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        from math_verify.parser import NormalizationConfig
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        proto.write(json.dumps({"error": f"worker cannot import math_verify: {e!r}"}) + "\n")
        return
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    config = [
        LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0),
        ExprExtractionConfig(),
    ]

    def parse_answer(s: str) -> list:
        return parse("\\boxed{" + s + "}", extraction_config=config, parsing_timeout=None)

    @functools.lru_cache(maxsize=16384)
    def parse_gold(gold: str) -> tuple:
        """A bare gold expression is parsed as if boxed; gold text with LaTeX delimiters or boxes (a
        worked solution) as the study parses it: math-verify's default extraction."""
        parsed = []
        if _GOLD_TEXT_RE.search(gold):
            parsed = [p for p in parse(gold, parsing_timeout=None) if not isinstance(p, str)]
        gold_n = normalize_gold(gold)
        if not parsed and len(gold_n) <= MAX_ANSWER_CHARS:
            parsed = [p for p in parse_answer(gold_n) if not isinstance(p, str)]
        return tuple(parsed)

    def score(answer: str, gold: str) -> float:
        gold_parsed = list(parse_gold(gold))
        if not gold_parsed:
            return float(_string_key(answer) == _string_key(normalize_gold(gold)))
        pred = parse_answer(answer)
        if not pred:
            return 0.0
        return float(verify(gold_parsed, pred, timeout_seconds=None))

    def on_alarm(signum, frame):
        raise _SoftDeadline

    signal.signal(signal.SIGALRM, on_alarm)
    parse_answer("1")
    proto.write('{"ready": true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        reward = 0.0
        try:
            signal.setitimer(signal.ITIMER_REAL, float(req["t"]))
            try:
                reward = score(req["a"], req["g"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0.0)
        except (_SoftDeadline, Exception):  # noqa: BLE001 - any failure scores 0
            reward = 0.0
        proto.write(json.dumps({"i": req["i"], "r": reward}) + "\n")


# ----------------------------------------------------------------------------------------------
# Parent side.


class _Worker:
    """One worker process with a line-buffered reply reader."""

    def __init__(self, memory_limit_mb: int, max_tasks: int):
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(
            JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
            JAXRL_REWARD_MEMORY_MB=str(memory_limit_mb), JAXRL_REWARD_PARENT_PID=str(os.getpid()),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from jaxrl_peft.rewards.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=pkg_root, start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: tuple[int, float] | None = None
        self.tasks_left = max_tasks

    def send(self, idx: int, answer: str, gold: str, soft_s: float) -> bool:
        try:
            self.proc.stdin.write((json.dumps({"i": idx, "a": answer, "g": gold, "t": soft_s}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.task = (idx, time.monotonic())
        self.tasks_left -= 1
        return True

    def read_messages(self) -> list[dict] | None:
        """Messages available now; None when the worker closed its end (died)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except OSError:
            return None
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def retire(self) -> None:
        """Ask an idle worker to exit (EOF on stdin), killing it if it lingers."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class MathRewardPool:
    """Pool of verifier processes; call it like `math_reward`. Use as a context manager or close()."""

    def __init__(
        self,
        workers: int = 2,
        deadline_s: float = 2.0,
        max_tasks_per_worker: int = 20000,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 120.0,
        cache_size: int = 65536,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.num_workers = workers
        self.deadline_s = deadline_s
        self.max_tasks = max_tasks_per_worker
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.cache_size = cache_size
        self.stats = collections.Counter()
        self._cache: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._workers: list[_Worker | None] = [None] * workers
        self._lock = threading.RLock()
        self._closed = False
        atexit.register(_close_ref, weakref.ref(self))

    def __enter__(self) -> "MathRewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker process; the pool cannot be used afterwards."""
        with self._lock:
            self._closed = True
            for k, w in enumerate(self._workers):
                if w is None:
                    continue
                if w.task is None:
                    w.retire()
                else:
                    w.kill()
                self._workers[k] = None

    def __call__(self, completions: Sequence[str], gold_answers: Sequence[str]) -> list[float]:
        """Binary rewards: 1.0 where the completion's final answer equals the gold answer."""
        if self._closed:
            raise RuntimeError("MathRewardPool is closed")
        if len(completions) != len(gold_answers):
            raise ValueError(
                f"math_reward: completions has {len(completions)} items but gold_answers has {len(gold_answers)}"
            )
        for k, g in enumerate(gold_answers):
            if not isinstance(g, str):
                raise TypeError(f"math_reward: gold_answers[{k}] must be str, got {type(g).__name__}")
        with self._lock:  # one batch at a time; the cache and the workers are shared
            rewards = [0.0] * len(completions)
            jobs: dict[tuple[str, str], list[int]] = {}
            for k, (c, g) in enumerate(zip(completions, gold_answers)):
                if isinstance(c, bytes):
                    c = c.decode("utf-8", errors="replace")
                answer = extract_answer(c) if isinstance(c, str) else None
                if answer is None or hostile_reason(answer) is not None:
                    self.stats["refused" if answer is not None else "no_answer"] += 1
                    continue
                gold = g.strip()
                gold_n = normalize_gold(gold)
                answer = strip_assignment(normalize_answer(answer), gold_n)
                verdict = 1.0 if answer and answer == gold_n else numeric_verdict(answer, gold_n)
                if verdict is not None:
                    rewards[k] = verdict
                    self.stats["fast_path"] += 1
                    continue
                if not answer:
                    continue
                jobs.setdefault((answer, gold), []).append(k)
            todo = []
            for key, idxs in jobs.items():
                if key in self._cache:
                    self._cache.move_to_end(key)
                    for k in idxs:
                        rewards[k] = self._cache[key]
                    self.stats["cached"] += len(idxs)
                else:
                    todo.append(key)
            if todo:
                results = self.verify_pairs(todo)
                for key, r in zip(todo, results):
                    for k in jobs[key]:
                        rewards[k] = r
                    if self.cache_size > 0:
                        self._cache[key] = r
                        if len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
            return rewards

    def verify_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Check normalized (answer, gold) pairs with math-verify on the workers (no fast path,
        no pre-filter, no cache): 1.0 / 0.0 each, 0.0 for any pair that overruns the deadline."""
        with self._lock:
            if self._closed:
                raise RuntimeError("MathRewardPool is closed")
            self.stats["verified"] += len(pairs)
            return self._run(list(pairs))

    def _spawn(self, slot: int) -> _Worker:
        jitter = self.max_tasks * slot // max(1, self.num_workers)
        w = _Worker(self.memory_limit_mb, self.max_tasks + jitter)
        self._workers[slot] = w
        self.stats["spawned"] += 1
        return w

    def _run(self, items: list[tuple[str, str]]) -> list[float]:
        """Verify (answer, gold) pairs on the workers under the per-item hard deadline."""
        results = [0.0] * len(items)
        pending = collections.deque(range(len(items)))
        soft_s = max(0.05, 0.75 * self.deadline_s)
        for slot in range(self.num_workers):
            if self._workers[slot] is None:
                self._spawn(slot)
        remaining = len(items)
        while remaining:
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w is None:
                    w = self._spawn(slot)
                if w.ready and w.task is None:
                    if w.tasks_left <= 0:
                        w.kill()
                        self._spawn(slot)
                        self.stats["recycled"] += 1
                    elif pending:
                        idx = pending.popleft()
                        if not w.send(idx, items[idx][0], items[idx][1], soft_s):
                            pending.appendleft(idx)
                            self._replace(slot, "crashed")
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    # A worker silent past the start-up timeout is replaced; only when no worker of the pool
                    # has started after that many tries is the run stopped.
                    if self.stats["slow_start"] >= 2 * self.num_workers and not any(
                            x is not None and x.ready for x in self._workers):
                        w.kill()
                        raise RuntimeError(
                            f"reward workers did not start within {self.startup_timeout_s:.0f}s, "
                            f"{self.stats['slow_start']} times (command: {sys.executable} -c "
                            "'from jaxrl_peft.rewards.math import _worker_main')")
                    self._replace(slot, "slow_start")
            waits = [w.task[1] + self.deadline_s for w in self._workers if w is not None and w.task]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else 0.5
            fds = {w.fd: slot for slot, w in enumerate(self._workers) if w is not None}
            readable, _, _ = select.select(list(fds), [], [], timeout)
            for fd in readable:
                slot = fds[fd]
                w = self._workers[slot]
                msgs = w.read_messages()
                if msgs is None:
                    if w.task is not None:
                        remaining -= 1
                    elif not w.ready:
                        w.kill()
                        raise RuntimeError("reward worker exited during start-up; its error is on stderr above")
                    self._replace(slot, "crashed")
                    continue
                for msg in msgs:
                    if "error" in msg:
                        w.kill()
                        raise RuntimeError(msg["error"])
                    if msg.get("ready"):
                        w.ready = True
                    elif w.task is not None and msg.get("i") == w.task[0]:
                        results[msg["i"]] = float(msg["r"])
                        w.task = None
                        remaining -= 1
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w is not None and w.task is not None and now - w.task[1] > self.deadline_s:
                    remaining -= 1
                    self._replace(slot, "timed_out")
        return results

    def _replace(self, slot: int, why: str) -> None:
        """Kill the worker in `slot` (its current item keeps reward 0) and start a fresh one."""
        self._workers[slot].kill()
        self.stats[why] += 1
        self._spawn(slot)


def _close_ref(ref: "weakref.ref[MathRewardPool]") -> None:
    pool = ref()
    if pool is not None:
        pool.close()


_default_pool: MathRewardPool | None = None
_default_lock = threading.Lock()


def default_pool() -> MathRewardPool:
    """The process-wide pool behind `math_reward`, created on first use."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._closed:
            _default_pool = MathRewardPool()
        return _default_pool


def math_reward(completions: Sequence[str], gold_answers: Sequence[str]) -> list[float]:
    """Binary accuracy reward of R1-style completions against gold answers (default worker pool)."""
    return default_pool()(completions, gold_answers)
