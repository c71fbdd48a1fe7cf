"""`bertqa serve`: a question-answering HTTP server (Starlette under uvicorn).

- `POST /` speaks HuggingFace's Inference API for question answering, so `InferenceClient(model=URL)` works;
  `POST /v1/answer` is bertqa's own batch form; `GET /v1/model`, `/healthz`, `/readyz`, `/metrics`;
  `GET /` is a small page to try the model.
- Concurrent requests are batched: a batcher task gathers queued questions until `max_batch_size` of them
  wait or the oldest has waited `max_wait_ms`, and runs them through the model in one worker thread, so the
  event loop never blocks on it. The queue is bounded (503 with Retry-After when full), every request has a
  timeout (408 for a body not sent within it, 504 for an answer not ready), and every error is a one-line JSON
  body: no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import json
import logging
import math
import os
import signal
import socket
import time
from bisect import bisect_left
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .cli import is_out_of_memory
from .files import first_line, note, soft_limit
from .inference import NonFiniteLogits
from .qa import QuestionAnswerer, check_pairs, input_pairs, window_settings
from .squad.features import TooManyWindows, check_positive

log = logging.getLogger("bertqa.serve")

# The answering parameters and their defaults: those of the Python API, so the server answers as `qa(...)` does.
DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(QuestionAnswerer.answer_pairs).parameters.items()
    if name not in ("self", "pairs") and p.kind is not p.KEYWORD_ONLY
}
ANSWER_PATHS = {"/", "/v1/answer"}
MAX_TOP_K = 100  # a top_k near the window width makes the span search quadratic in it: bound it
WARMUP = ("What is warmed up?", "The model is warmed up before the server says it is ready.")
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'",
}


class ApiError(Exception):
    """A client-facing error: its status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# --- Prometheus text format -------------------------------------------------------------------------------


def _number(x: float) -> str:
    return "+Inf" if x == math.inf else repr(float(x))


class Histogram:
    def __init__(self, name: str, help: str, bounds):
        self.name, self.help, self.bounds = name, help, tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        return lines + [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]


def _no_stop_iteration(fn):
    """fn(), in the worker thread. A StopIteration it raises becomes a RuntimeError: asyncio cannot set one on the
    awaiting future (it raises a TypeError in the event loop instead), which would leave the batcher waiting for
    ever and every later request to time out."""
    try:
        return fn()
    except StopIteration as e:
        raise RuntimeError(f"StopIteration: {e}") from e


class Metrics:
    """Everything is updated on the event loop's thread, so nothing needs a lock."""

    # Error statuses this server gives, shown from zero so that rates work before the first one.
    ERROR_CODES = (400, 403, 404, 405, 408, 413, 415, 499, 500, 503, 504)

    def __init__(self):
        self.latency = Histogram(
            "bertqa_request_duration_seconds",
            "Time to answer POST / and /v1/answer requests, errors included.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "bertqa_batch_size", "Questions per model call.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.batch_seconds = Histogram(
            "bertqa_batch_duration_seconds",
            "Time of one model call (tokenising, forward passes, ranking).",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.responses: dict[int, int] = {}
        self.errors: dict[int, int] = dict.fromkeys(self.ERROR_CODES, 0)

    def count_response(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        if status >= 400:
            self.errors[status] = self.errors.get(status, 0) + 1

    def render(self, queue_depth: int, queue_limit: int, ready: bool) -> str:
        lines = self.latency.render() + self.batch_size.render() + self.batch_seconds.render()
        for name, help, value in (
            ("bertqa_queue_depth", "Questions waiting for the model.", queue_depth),
            ("bertqa_queue_limit", "Most questions allowed to wait (beyond it: 503).", queue_limit),
            ("bertqa_ready", "1 once the model is loaded and warmed up.", int(ready)),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help, counts in (
            ("bertqa_requests_total", "HTTP responses, by status code.", self.responses),
            ("bertqa_errors_total", "Error responses (4xx and 5xx), by status code.", self.errors),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter"]
            lines += [f'{name}{{code="{code}"}} {n}' for code, n in sorted(counts.items())]
        return "\n".join(lines) + "\n"


# --- Batching ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    pairs: list
    params: tuple  # the answering parameters, in DEFAULTS order: jobs batch together only when they agree
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    queued: bool = True  # waiting in the queue: not yet taken into a batch, withdrawn or refused


SHUTTING_DOWN = "server shutting down; retry"
RETRY_ELSEWHERE = {"Retry-After": "1", "Connection": "close"}  # another instance, or this one restarted, may answer


class Batcher:
    """Runs queued questions through the model in batches, in one dedicated worker thread."""

    def __init__(self, max_batch_size: int, max_wait_s: float, max_queue: int, metrics: Metrics):
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.metrics = metrics
        self.qa = None
        self.queue: deque[_Job] = deque()
        self.waiting = self.jobs_waiting = 0  # the questions and the requests of the queue still waiting
        self.wake = asyncio.Event()
        # One thread: the model is never run twice at once, and loading happens there too, off the loop.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="bertqa-model")
        self.seconds_per_batch = 1.0  # running estimate, for Retry-After
        self.taken: list[_Job] = []  # the requests of the batch being answered now (all its parameter groups)
        self.refusing = False  # shutting down, out of time: no request is taken any more
        self.refused = asyncio.Event()  # set with `refusing`: requests still sending their bodies stop waiting

    def depth(self) -> int:
        """Questions waiting (a request that timed out stops counting at once)."""
        return self.waiting

    def _leave(self, job: _Job) -> bool:
        """`job` stops waiting (taken, withdrawn or refused); whether it was."""
        if not job.queued:
            return False
        job.queued = False
        self.waiting -= len(job.pairs)
        self.jobs_waiting -= 1
        return True

    def withdraw(self, job: _Job) -> None:
        """A request that no longer waits (answered, timed out, its client gone): out of the count at once, its text
        let go, and the queue rid of such requests once they outnumber the live ones. They stayed until the front
        reached them, while every submit counted them again: a client hanging up 1 MB requests during a long batch
        grew the server by that much each, and each submit's cost with it."""
        if self._leave(job):
            job.pairs = []
            if len(self.queue) > 2 * self.jobs_waiting + 32:
                self.queue = deque(j for j in self.queue if j.queued)

    def retry_after(self) -> int:
        batches = math.ceil(self.depth() / self.max_batch_size) + 1
        return max(1, math.ceil(batches * self.seconds_per_batch))

    def submit(self, pairs: list, params: tuple) -> _Job:
        if self.refusing:
            raise ApiError(503, SHUTTING_DOWN, RETRY_ELSEWHERE)
        if self.depth() + len(pairs) > self.max_queue:
            raise ApiError(
                503,
                f"server busy: {self.depth()} questions already waiting (limit {self.max_queue}); retry later",
                {"Retry-After": str(self.retry_after())},
            )
        job = _Job(pairs, params, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.waiting += len(pairs)
        self.jobs_waiting += 1
        self.wake.set()
        return job

    async def _wait(self, timeout: float | None = None) -> None:
        self.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)

    async def run(self) -> None:
        while True:
            while not self._drop_done():
                await self._wait()
            # The oldest question's wait is what max_wait bounds: after a long batch, those that queued
            # behind it go at once.
            deadline = self.queue[0].arrived + self.max_wait_s
            while self.depth() < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                await self._wait(left)
            groups: dict[tuple, list[_Job]] = {}
            self.taken = self._take()
            for job in self.taken:
                groups.setdefault(job.params, []).append(job)
            for params, jobs in groups.items():
                await self._run(params, jobs)

    def _drop_done(self) -> bool:
        """Drop the requests that no longer wait from the front; whether any request is left."""
        while self.queue and (not self.queue[0].queued or self.queue[0].future.done()):
            self._leave(self.queue.popleft())
        return bool(self.queue)

    def _take(self) -> list[_Job]:
        """The oldest requests, up to max_batch_size questions (a bigger request goes alone)."""
        jobs, n = [], 0
        while self._drop_done():
            size = len(self.queue[0].pairs)
            if jobs and n + size > self.max_batch_size:
                break
            jobs.append(self.queue.popleft())
            self._leave(jobs[-1])
            n += size
        return jobs

    async def _run(self, params: tuple, jobs: list[_Job]) -> None:
        # Timed out, refused or hung up while waiting (for an earlier group of the batch, say): nobody to answer.
        jobs = [job for job in jobs if not job.future.done()]
        if not jobs:
            return
        pairs = [p for job in jobs for p in job.pairs]
        answer = functools.partial(self.qa.answer_pairs, pairs, *params)
        if "should_stop" in inspect.signature(self.qa.answer_pairs).parameters:
            # Once every request in the batch has timed out, the rest of its windows would answer nobody while
            # the requests queued behind them time out too.
            answer = functools.partial(answer, should_stop=lambda: all(job.future.done() for job in jobs))
        start = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self.worker, _no_stop_iteration, answer)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a Rust panic in the tokenizer is no Exception: the batcher must outlive it
            if not isinstance(e, Exception):
                e = RuntimeError(f"{type(e).__name__}: {e}")
            if not isinstance(e, TooManyWindows):  # (refused by the windowing, before any model call)
                self._observe(len(pairs), time.perf_counter() - start)
            if len(jobs) > 1:  # one bad request must not fail the others it was batched with
                for job in jobs:
                    if not job.future.done():  # timed out meanwhile: nobody waits for it
                        await self._run(params, [job])
            elif not jobs[0].future.done():
                jobs[0].future.set_exception(e)
            return
        self._observe(len(pairs), time.perf_counter() - start)
        at = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(results[at : at + len(job.pairs)])
            at += len(job.pairs)

    def _observe(self, questions: int, seconds: float) -> None:
        self.metrics.batch_size.observe(questions)
        self.metrics.batch_seconds.observe(seconds)
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * seconds

    def fail_waiting(self, message: str, headers: dict | None = None, also=()) -> None:
        """Answer every request still waiting, queued or among `also`, with a 503."""
        for job in [*self.queue, *also]:
            if not job.future.done():
                job.future.set_exception(ApiError(503, message, headers))
        for job in self.queue:
            self._leave(job)
        self.queue.clear()

    def close(self, grace_s: float) -> None:
        """Shutting down: go on answering, and a second before the grace period ends, when uvicorn would cancel
        the requests left into its plain-text 500, refuse them (refuse)."""
        asyncio.get_running_loop().call_later(max(0.0, grace_s - 1.0), self.refuse)

    def refuse(self) -> None:
        """Refuse the requests still unanswered (queued, or in the batch being answered) and any that come after
        (503 with Retry-After)."""
        self.refusing = True
        self.refused.set()
        self.fail_waiting(SHUTTING_DOWN, RETRY_ELSEWHERE, also=self.taken)


# --- Request parsing --------------------------------------------------------------------------------------


async def _first(main: asyncio.Future, timeout: float, stop) -> str | None:
    """Wait for the future `main`, for the coroutine `stop` (cancelled after) or for `timeout` seconds, whichever
    ends first: "main", "stop" or None."""
    stopping = asyncio.ensure_future(stop)
    try:
        await asyncio.wait({main, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if main.done():
        return "main"
    return "stop" if stopping.done() else None


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up. The body has been read: what the connection says next is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


CLIENT_GONE = "client closed the request"


# The Content-Types another site's page may post without a CORS preflight (Fetch's "CORS-safelisted"), or none.
UNPREFLIGHTED = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def _foreign_origin(headers, media: str | None) -> str | None:
    """The Origin of a browser's request from another site's page, which may post here unasked (it cannot read the
    answer: no CORS headers are sent, so no other site can use the server, only load it); else None. The browser
    says which it is (Sec-Fetch-Site), over HTTPS or to localhost: elsewhere (plain HTTP through a reverse proxy)
    it does not. There a JSON body was preflighted (OPTIONS, which this server never approves: another site's never
    arrives); a body another site may send unasked is judged by the host its Origin names, which is this server's own
    unless a reverse proxy rewrote Host (nginx's and Apache's default: then their X-Forwarded-Host, if sent).
    `media`: the body's media type, lower-cased without parameters; None where no Content-Type is given."""
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    if origin is None or site is not None and site.lower() in ("same-origin", "none"):
        return None
    if site is not None:  # cross-site, same-site (another origin of the same site)
        return origin
    if (media or "") not in UNPREFLIGHTED:
        return None
    hosts = {headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0].strip()} - {""}
    return None if urlsplit(origin).netloc.lower() in {h.lower() for h in hosts} else origin


async def _read_json(request: Request, limit: int, timeout_s: float, refused: asyncio.Event) -> dict:
    media = request.headers.get("content-type")  # none is taken for JSON (a bare HTTP client's request)
    media = None if media is None else media.split(";")[0].strip().lower()
    origin = _foreign_origin(request.headers, media)
    if origin is not None:
        raise ApiError(403, f"cross-origin request refused: Origin {origin[:100]!r} is not this server")
    if media is not None and media != "application/json" and not media.endswith("+json"):
        # (curl -d sends a form's type: -H 'Content-Type: application/json' is needed)
        raise ApiError(415, f"Content-Type must be application/json, not {media[:100]!r}")
    too_big = f"request body exceeds the limit of {limit} bytes (--max-body-bytes)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        # uvicorn reads the declared rest and drops it, so the client, still sending, gets this answer (closed at
        # once, with bytes unread, its connection would be reset instead).
        raise ApiError(413, too_big)

    async def read() -> bytearray:
        body = bytearray()
        async for chunk in request.stream():  # counted as it comes: a chunked body has no length up front
            body += chunk
            if len(body) > limit:  # closed: a chunked body has no end to drain it to, as a declared rest is
                raise ApiError(413, too_big, {"Connection": "close"})
        return body

    # A client that sends its body a byte at a time (or never) must not hold a connection for ever, nor past a
    # shutdown (which would cancel it into uvicorn's plain-text 500). Closed after the 408: the rest could trickle in.
    reading = asyncio.ensure_future(read())
    try:
        first = await _first(reading, timeout_s, refused.wait())
    finally:
        reading.cancel()  # (nothing, once it is done)
    if first == "stop":
        raise ApiError(503, SHUTTING_DOWN, RETRY_ELSEWHERE)
    if first is None:
        raise ApiError(408, f"request body not received within {timeout_s:g} s (--timeout)", {"Connection": "close"})
    try:
        body = reading.result()
    except ClientDisconnect:  # the client hung up: nobody to answer, and not a server error
        raise ApiError(499, CLIENT_GONE) from None
    try:
        data = json.loads(bytes(body).decode("utf-8-sig"))  # (bytes would be taken for UTF-16 or -32 too)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON: the body is not UTF-8 text") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"malformed JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {_type(data)}")
    return data


def _json_safe(value):
    """`value` with each NaN or infinite float as the string JavaScript writes for it: a config.json may hold one
    (Python's json reads and writes them), and a JSON reply may not (a browser's JSON.parse refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _only(data: dict, allowed, where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field {where}{unknown[0][:100]!r}; expected {', '.join(sorted(allowed))}")


def _options(raw) -> None:
    """HF's Inference API `options` (which have no use here) checked as that API defines them: booleans."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ApiError(400, f"options must be an object, not {_type(raw)}")
    _only(raw, ("use_cache", "use_gpu", "wait_for_model"), "in options: ")
    for key, value in raw.items():
        if not isinstance(value, bool):
            raise ApiError(400, f"options.{key} must be a boolean, not {_type(value)}")


def _parameters(raw, max_positions: int) -> tuple:
    """The answering parameters of a request, checked, as a tuple in DEFAULTS order."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ApiError(400, f"parameters must be an object, not {_type(raw)}")
    _only(raw, set(DEFAULTS), "in parameters: ")
    params = dict(DEFAULTS)
    for name, value in raw.items():
        if value is None:  # JSON null: the default, as HF's clients send for an unset option
            continue
        if isinstance(DEFAULTS[name], bool):
            if not isinstance(value, bool):
                raise ApiError(400, f"parameters.{name} must be true or false, not {_type(value)}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"parameters.{name} must be a positive integer, got {json.dumps(value)[:40]}")
        params[name] = value
    if params["top_k"] > MAX_TOP_K:
        raise ApiError(400, f"parameters.top_k {params['top_k']} exceeds the limit of {MAX_TOP_K}")
    try:
        params["max_seq_len"], params["doc_stride"], params["max_question_len"] = window_settings(
            params["max_seq_len"], params["doc_stride"], params["max_question_len"], max_positions
        )
    except ValueError as e:
        raise ApiError(400, f"parameters: {e}") from None
    # No span is longer than a window: a larger limit answers as this one does (qa(...) takes it too).
    params["max_answer_len"] = min(params["max_answer_len"], params["max_seq_len"])
    return tuple(params[name] for name in DEFAULTS)


def _hf_pairs(inputs) -> tuple[list, bool]:
    """(question, context) pairs of HF's `inputs`, and whether it was a list."""
    if isinstance(inputs, dict):
        items, batched = [inputs], False
    elif isinstance(inputs, list) and inputs:
        items, batched = inputs, True
    else:
        raise ApiError(400, "inputs must be an object {question, context} or a non-empty array of them")
    pairs = []
    for i, item in enumerate(items):
        where = f"inputs[{i}]" if batched else "inputs"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object {{question, context}}, not {_type(item)}")
        _only(item, ("question", "context"), f"in {where}: ")
        for key in ("question", "context"):
            if key not in item:
                raise ApiError(400, f"{where}.{key} is missing")
            if not isinstance(item[key], str):
                raise ApiError(400, f"{where}.{key} must be a string, not {_type(item[key])}")
        pairs.append((item["question"], item["context"]))
    return pairs, batched


def _v1_pairs(data: dict) -> list:
    """Pairs of the batch form: `question` and `context`, each a string or an array of strings."""
    for key in ("question", "context"):
        value = data.get(key)
        if value is None:
            raise ApiError(400, f"{key} is missing")
        if isinstance(value, list):
            if not value:
                raise ApiError(400, f"{key} is an empty array")
            bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
            if bad is not None:
                raise ApiError(400, f"{key}[{bad}] must be a string, not {_type(value[bad])}")
        elif not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string or an array of strings, not {_type(value)}")
    try:
        return input_pairs(data["question"], data["context"])[0]
    except ValueError as e:
        raise ApiError(400, str(e)) from None


# --- The application --------------------------------------------------------------------------------------


class _Server:
    def __init__(self, qa_or_loader, max_batch_size, max_wait_ms, max_queue, timeout_s, max_body_bytes,
                 max_context_chars, on_load_error):  # fmt: skip
        values = {"max_batch_size": max_batch_size, "max_queue": max_queue, "max_body_bytes": max_body_bytes,
                  "max_context_chars": max_context_chars}  # fmt: skip
        check_positive(**{f"{name} (--{name.replace('_', '-')})": value for name, value in values.items()})
        if not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s (--timeout) must be a positive number of seconds, got {timeout_s!r}")
        if not 0 <= max_wait_ms / 1000 < timeout_s:  # a batch that waits past the timeout answers nobody
            raise ValueError(f"max_wait_ms (--max-wait-ms) must be >= 0 and under the timeout ({timeout_s:g} s), "
                             f"got {max_wait_ms!r}")  # fmt: skip
        if hasattr(qa_or_loader, "answer_pairs"):
            self.qa, self.loader = qa_or_loader, None
        else:
            self.qa, self.loader = None, qa_or_loader
        self.settings = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue": max_queue,
            "timeout_s": timeout_s,
            "max_body_bytes": max_body_bytes,
            "max_context_chars": max_context_chars,
        }
        self.on_load_error = on_load_error
        self.metrics = Metrics()
        self.batcher = Batcher(max_batch_size, max_wait_ms / 1000, max_queue, self.metrics)
        self.ready = False
        self.load_error: str | None = None
        self.page = (resources.files("bertqa") / "static" / "index.html").read_bytes()

    # Lifespan: the model loads in the worker thread while the server already answers /healthz.
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        batcher = asyncio.create_task(self.batcher.run())
        loading = asyncio.create_task(self._load())
        try:
            yield
        finally:
            loading.cancel()
            batcher.cancel()
            self.batcher.fail_waiting(SHUTTING_DOWN)
            self.batcher.worker.shutdown(wait=False, cancel_futures=True)

    def _load_and_warm_up(self):
        qa = self.qa if self.loader is None else self.loader()
        if getattr(qa, "max_windows", 0) is None:
            # A tiny doc_stride over a long context multiplies the windows: bound the work one model call may take.
            qa.max_windows = max(2048, 64 * self.settings["max_batch_size"])
        # First-call costs (allocations, kernels) paid here, with the default parameters.
        qa.answer_pairs([WARMUP], *_parameters({}, qa.config.max_position_embeddings))
        return qa

    async def _load(self) -> None:
        try:
            self.batcher.qa = await asyncio.get_running_loop().run_in_executor(
                self.batcher.worker, self._load_and_warm_up
            )
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a Rust panic in the tokenizer is no Exception: the server must say it failed
            self.load_error = first_line(e)
            if not isinstance(e, Exception):
                e = RuntimeError(f"{type(e).__name__}: {e}")
            if self.on_load_error is not None:
                self.on_load_error(e)
            else:
                log.error("model failed to load: %s", self.load_error, exc_info=not isinstance(e, ValueError))
            return
        self.qa, self.ready = self.batcher.qa, True

    def _require_ready(self) -> None:
        if self.load_error:  # for good: retrying will not help
            raise ApiError(503, f"model failed to load: {self.load_error}")
        if not self.ready:
            raise ApiError(503, "model is loading", {"Retry-After": "1"})

    # Endpoints.
    async def root(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.hf_answer(request)
        return Response(self.page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        self._require_ready()
        return JSONResponse({"status": "ready"})

    async def model_info(self, request: Request) -> Response:
        self._require_ready()
        qa = self.qa
        precision = qa.precision
        return JSONResponse(
            {
                "model": str(qa.name),
                "device": str(qa.device),
                "precision": precision.name,
                "precision_reason": precision.describe(),
                "config": _json_safe(qa.config.to_dict()),
                "parameters": dict(zip(DEFAULTS, _parameters({}, qa.config.max_position_embeddings))),
                "server": self.settings,
            }
        )

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(self.batcher.depth(), self.batcher.max_queue, self.ready)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def hf_answer(self, request: Request) -> Response:
        data = await _read_json(request, self.settings["max_body_bytes"], self.settings["timeout_s"],
                                self.batcher.refused)  # fmt: skip
        _only(data, ("inputs", "parameters", "options"), "")
        _options(data.get("options"))
        if "inputs" not in data:
            raise ApiError(400, "inputs is missing: send {inputs: {question, context}, parameters: {...}}")
        pairs, batched = _hf_pairs(data["inputs"])
        params = self._params(data)
        results = await self._answer(request, pairs, params)
        # The pipeline gives a bare answer for top_k 1, a list of them otherwise.
        if dict(zip(DEFAULTS, params))["top_k"] == 1:
            results = [r[0] for r in results]
        return JSONResponse(results if batched else results[0])

    async def v1_answer(self, request: Request) -> Response:
        data = await _read_json(request, self.settings["max_body_bytes"], self.settings["timeout_s"],
                                self.batcher.refused)  # fmt: skip
        _only(data, ("question", "context", "parameters"), "")
        pairs = _v1_pairs(data)
        results = await self._answer(request, pairs, self._params(data))
        return JSONResponse({"answers": results})

    def _params(self, data: dict) -> tuple:
        self._require_ready()  # the model's position count is needed to check them
        return _parameters(data.get("parameters"), self.qa.config.max_position_embeddings)

    async def _answer(self, request: Request, pairs: list, params: tuple) -> list[list[dict]]:
        try:
            check_pairs(pairs)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        limit = self.settings["max_context_chars"]
        longest = max(len(c) for _, c in pairs)
        if longest > limit:
            raise ApiError(413, f"a context of {longest} characters exceeds the limit of {limit} (--max-context-chars)")
        if len(pairs) > self.batcher.max_queue:
            raise ApiError(
                413, f"{len(pairs)} questions in one request exceed the limit of {self.batcher.max_queue} (--max-queue)"
            )
        job = self.batcher.submit(pairs, params)
        future = job.future
        try:
            first = await _first(future, self.settings["timeout_s"], _disconnected(request))
        finally:
            # Unless answered: timed out, the client hung up, or this task was cancelled. The request stops counting
            # in the queue, and its windows stop running once nobody else waits for them (Batcher._run).
            future.cancel()
            self.batcher.withdraw(job)
        if first == "stop":
            raise ApiError(499, CLIENT_GONE)
        if first is None:
            raise ApiError(504, f"no answer within {self.settings['timeout_s']:g} s; retry later")
        try:
            return future.result()
        except NonFiniteLogits as e:  # the model's fault, not the request's
            log.error("%s", e)
            raise ApiError(500, str(e)) from None
        except TooManyWindows as e:  # the one check of a request that only the windowing can make
            raise ApiError(400, str(e)) from None
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            # Memory is the server's state as much as the request's: this may fit later, or cut smaller.
            log.error("out of memory answering %d question(s): %s", len(pairs), " ".join(str(e).split())[:160])
            raise ApiError(503, "out of memory answering this request; fewer questions or shorter contexts may fit",
                           {"Retry-After": str(self.batcher.retry_after())}) from None  # fmt: skip


async def _error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
    # Starlette's own: 404 for an unknown path, 405 (with Allow) for a wrong method.
    message = {404: f"no such path: {request.url.path[:200]}", 405: f"{request.method} is not allowed here"}
    return JSONResponse({"error": message.get(exc.status_code, exc.detail)}, exc.status_code, headers=exc.headers)


class _Edge:
    """The outermost layer: counts every response, times answering requests, and turns any exception that
    got this far (a bug) into a 500 with a fixed message, its traceback going to the log only."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            if status is None:
                await JSONResponse({"error": "internal error"}, 500)(scope, receive, send_and_note)
        finally:
            self.metrics.count_response(status or 500)
            if scope["method"] == "POST" and scope["path"] in ANSWER_PATHS:
                self.metrics.latency.observe(time.perf_counter() - start)


def _url(host: str, port: int) -> str:
    """The URL of a server listening on `host` (an IPv6 address in brackets) and `port`."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def create_app(qa_or_loader, max_batch_size: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
               timeout_s: float = 30.0, max_body_bytes: int = 1 << 20, max_context_chars: int = 100_000,
               on_load_error=None) -> Starlette:  # fmt: skip
    """The server as an ASGI app. `qa_or_loader`: a `QuestionAnswerer` (anything with `answer_pairs`,
    `config`, `device`, `precision`, `name`), or a function returning one, called in the worker thread at
    startup; one whose `max_windows` is None gets the server's limit on the windows of one model call (set on
    the object). `/readyz` answers 200 once it is loaded and has answered one warm-up question. A failed load
    goes to `on_load_error(exception)` when given, else to the log (the server stays up, not ready)."""
    server = _Server(qa_or_loader, max_batch_size, max_wait_ms, max_queue, timeout_s, max_body_bytes,
                     max_context_chars, on_load_error)  # fmt: skip
    routes = [
        Route("/", server.root, methods=["GET", "POST"]),  # one route, so a wrong method's 405 lists both
        Route("/v1/answer", server.v1_answer, methods=["POST"]),
        Route("/v1/model", server.model_info, methods=["GET"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/readyz", server.readyz, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Edge, metrics=server.metrics)],
        exception_handlers={ApiError: _error_response, HTTPException: _error_response},
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app


def uvicorn_server(app, grace_s: float = 5.0):
    """uvicorn's server for `app` (from create_app), which on SIGTERM or Ctrl-C stops taking connections, answers
    the requests it holds for up to `grace_s`, and those it will not finish with a JSON 503 (see Batcher.close)."""
    import uvicorn

    class Server(uvicorn.Server):
        loop = None

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            self.loop.set_exception_handler(_loop_errors(self))
            await super().startup(sockets)

        async def shutdown(self, sockets=None):
            app.state.server.batcher.close(grace_s)
            await super().shutdown(sockets)
            if self.force_exit:  # (uvicorn skips it then: the lifespan task, cancelled at exit, logged a traceback)
                await self.lifespan.shutdown()

        def handle_exit(self, sig, frame):
            # A second Ctrl-C forces the exit at once: the requests held were cancelled into uvicorn's plain-text
            # 500s, each with a traceback. They are refused with the JSON 503 first, then the exit is forced.
            if self.should_exit and sig == signal.SIGINT and not self.force_exit and self.loop is not None:
                self._captured_signals.append(sig)  # (re-raised at the end: exit status 130)
                self.loop.call_soon_threadsafe(self._force_exit_soon)
            else:
                super().handle_exit(sig, frame)

        def _force_exit_soon(self):
            app.state.server.batcher.refuse()
            self.loop.call_later(0.25, setattr, self, "force_exit", True)  # the 503s sent meanwhile

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=grace_s))


def _loop_errors(server):
    """asyncio's handler for errors no task awaits, where one says the same thing thousands of times: a listening
    socket out of file descriptors (EMFILE) logs a traceback for every connection of its backlog (asyncio loops
    over all 2,048 of uvicorn's, CPython issue 151615) and retries each, and once the socket is closed (SIGTERM)
    every retry logs one more. Said in one line instead, at most every 10 s; the rest as asyncio says them."""
    said = [-math.inf]

    def handle(loop, context) -> None:
        error, message = context.get("exception"), context.get("message", "")
        if isinstance(error, OSError) and message.startswith("socket.accept()"):
            if time.monotonic() - said[0] >= 10:
                said[0] = time.monotonic()
                limit = f" (open files limit, ulimit -n: {_open_files_limit()})" if error.errno == errno.EMFILE else ""
                log.warning("new connections wait: %s%s", error.strerror, limit)
        elif not (server.should_exit and isinstance(error, ValueError) and "_start_serving" in message):
            loop.default_exception_handler(context)

    return handle


def _open_files_limit() -> str:
    soft = soft_limit("RLIMIT_NOFILE")
    return "unknown" if soft is None else "none" if soft == math.inf else str(soft)


# A port a closed server's connections still wait on (TIME_WAIT) is taken again at once; not on Windows, where the
# option lets a second server take a port another one listens on (asyncio's rule too).
REUSE_ADDRESS = os.name == "posix"


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts (port 0: a free port, reported in the startup line)."""
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # an unknown host name fails here
        sock = socket.socket(family, socket.SOCK_STREAM)
        if REUSE_ADDRESS:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16, max_wait_ms: float = 5.0,
          max_queue: int = 256, timeout_s: float = 30.0, max_body_bytes: int = 1 << 20,
          max_context_chars: int = 100_000, device=None, precision: str | None = None, config=None,
          trust_pickle: bool = False) -> None:  # fmt: skip
    """Serve `model` (a fine-tuned checkpoint; `config` and `trust_pickle` as for `load_model`) until interrupted.
    Binds to loopback unless `host` says otherwise. A model that fails to load stops the server and raises its
    error."""
    from .distributed import resolve_device
    from .runtime import Precision

    if not str(model):  # (Path("") is the current folder)
        raise ValueError("model path '': empty; name the checkpoint file or folder")
    if not Path(model).exists():  # the one load error worth catching before the startup line
        raise ValueError(f"{model}: no such checkpoint file or folder")
    device = resolve_device(None if device is None else str(device))
    resolved = Precision.resolve(precision, device)
    failed: list[Exception] = []

    def load():
        return QuestionAnswerer.from_pretrained(model, device=device, precision=resolved, config=config,
                                                trust_pickle=trust_pickle)  # fmt: skip

    def stop(error: Exception) -> None:
        failed.append(error)
        server.should_exit = True

    app = create_app(load, max_batch_size, max_wait_ms, max_queue, timeout_s, max_body_bytes, max_context_chars, stop)
    sock = _listen(host, port)
    server = uvicorn_server(app)
    url = _url(host, sock.getsockname()[1])
    note(
        f"bertqa: serving {model} on {url} (device {device}, precision {resolved.name}, "
        f"max batch {max_batch_size}, max wait {max_wait_ms:g} ms)"
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]
