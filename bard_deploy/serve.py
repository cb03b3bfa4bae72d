"""`bard-deploy serve`: an OpenAI-compatible HTTP server over one Pipeline (FastAPI on uvicorn).

    POST /v1/chat/completions   OpenAI's chat schema: text and image_url parts (data: URLs; file paths only
                                under --image-root), stream (SSE, one chunk per decoded block, then [DONE]),
                                max_tokens, temperature, top_p, seed, stop; BARD options (threshold, block_size,
                                min_commit, max_steps, edit_threshold, max_edits, top_k, speculative) as extra
                                fields
    GET  /v1/models, /health, /metrics (Prometheus text)

Dynamic batching: one worker thread decodes. It takes the oldest waiting request and every other waiting one
with the same decode options (up to --max-batch) and decodes them as one batch through the runtime's batch path
(`Pipeline.stream_batch`; each row decodes exactly as it would alone, on every backend and variant); requests
that arrive meanwhile wait for the next batch. A sampled request (temperature > 0) runs alone: its random draws
would otherwise depend on its batch mates. max_tokens and stop strings are applied per row. The wait queue is
bounded (--max-queue; a full queue answers 429), a request has a deadline (--request-timeout; 504), a client that
disconnects frees its place in the queue (and its row is dropped from a running batch).

Every error is an OpenAI-style JSON body: 400 with the one-line message of a BardError or a bad field, 404 for
another model name, 413 for a body over --max-request-bytes, 429, 504; never a traceback.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at definition
import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from bard_deploy.errors import BardError, RuntimeInputError
from bard_deploy.prompting import resolve_image_path
from bard_deploy.runtimes.api import Pipeline, ready_text
from bard_deploy.runtimes.decode import DecodeOptions, Stats

log = logging.getLogger("bard_deploy.serve")

BARD_FIELDS = ("threshold", "block_size", "min_commit", "max_steps", "edit_threshold", "max_edits", "top_k",
               "speculative")
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")   # accepted, no effect
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logprobs": False,
               "top_logprobs": None, "logit_bias": None, "audio": None, "modalities": None, "prediction": None,
               "presence_penalty": 0, "frequency_penalty": 0, "reasoning_effort": None, "web_search_options": None}
KNOWN_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "seed", "stop", "n", "response_format", *BARD_FIELDS, *IGNORED_FIELDS,
                *UNSUPPORTED}
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ServeOptions:
    """How `serve` runs (the CLI's options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8                  # requests decoded together at most
    max_queue: int = 64                 # requests waiting at most (a full queue answers 429)
    image_root: str | None = None       # file paths in image_url parts resolve under it (None: refused)
    request_timeout: float = 300.0      # seconds from arrival to the last token (504 after)
    max_request_bytes: int = 32 << 20   # request bodies above this answer 413
    max_tokens_limit: int = 4096        # the largest max_tokens a request may ask for
    model_name: str | None = None       # the id /v1/models lists (default: the model directory's name)

    def check(self) -> "ServeOptions":
        """The options, or a RuntimeInputError naming the first bad one."""
        for name in ("max_batch", "max_queue", "max_request_bytes", "max_tokens_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RuntimeInputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}", value)
        if not self.request_timeout > 0:
            raise RuntimeInputError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}",
                                    self.request_timeout)
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise RuntimeInputError(f"--image-root {self.image_root} is not a directory", self.image_root)
        return self


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- requests ------------------------------------------------------------------------------------------


@dataclass(eq=False)                   # a request is itself: the queue finds and removes it by identity
class Job:
    """One request on its way through the queue and a batch; events go to `queue` on the server's event loop."""

    messages: list[dict]
    options: DecodeOptions              # the batch-shared decode options (no stop strings, max_new_tokens 1)
    max_tokens: int
    stop: tuple[str, ...]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    deadline: float
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def solo(self) -> bool:
        """A sampled request decodes alone (shared random draws would tie it to its batch mates)."""
        return self.options.temperature > 0

    def emit(self, *event) -> None:
        """Hand an event to the request's handler (thread-safe)."""
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", param=name)
    return value


def chat_messages(raw: object, image_root: str | None) -> list[dict]:
    """OpenAI chat messages -> the Pipeline's messages (image_url parts become image parts); APIError 400 naming
    the first bad message or part."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}",
                           param=f"messages[{i}].role")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise APIError(400, f"messages[{i}].content must be a string or a non-empty list of parts",
                           param=f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                parts.append({"type": "image", "image": image_source(url, image_root, where)})
            else:
                raise APIError(400, f"{where} must be a text part {{type: text, text}} or an image_url part, got "
                               f"{kind!r}", param=where)
        out.append({"role": role, "content": parts})
    return out


def image_source(url: object, image_root: str | None, where: str) -> str:
    """An image_url's url as the Pipeline takes it: a data: URL as it is, a file path resolved under the image
    root; anything else (http, no root, a path out of the root) is an APIError 400."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}.image_url.url must be a non-empty string", param=where)
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: image URLs are not fetched (the server makes no network requests): send "
                       "the image as a data: URL", param=where)
    if image_root is None:
        raise APIError(400, f"{where}: file paths are refused unless the server runs with --image-root",
                       param=where)
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        return str(resolve_image_path(path, image_root))
    except BardError as e:
        raise APIError(400, f"{where}: {e}", param=where) from e


def parse_request(body: object, pipe: Pipeline, o: ServeOptions, model_name: str) -> dict:
    """A chat-completions body -> messages, decode options, max_tokens, stop, stream flags; APIError for every
    bad field (unknown ones included)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                       param=unknown[0])
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in (neutral, None):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"model {body.get('model')!r} is not served here (this server serves {model_name!r})",
                       param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise APIError(400, f"'n' must be 1, got {body.get('n')!r}", param="n")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "'response_format' must be {\"type\": \"text\"}", param="response_format")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not set(so) <= {"include_usage"}:
        raise APIError(400, "'stream_options' may hold include_usage only", param="stream_options")
    max_tokens = _number(body, "max_completion_tokens", 1, o.max_tokens_limit, None, integer=True)
    max_tokens = _number(body, "max_tokens", 1, o.max_tokens_limit, max_tokens or DecodeOptions.max_new_tokens,
                         integer=True)
    options = {"temperature": _number(body, "temperature", 0, 2, 0.0),
               "top_p": _number(body, "top_p", 0, 1, 1.0), "seed": body.get("seed")}
    if options["seed"] is not None and (isinstance(options["seed"], bool) or not isinstance(options["seed"], int)):
        raise APIError(400, f"'seed' must be an integer, got {options['seed']!r}", param="seed")
    options.update({k: body[k] for k in BARD_FIELDS if body.get(k) is not None})
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, f"'stop' must be a string or up to 4 non-empty strings, got {body.get('stop')!r}",
                       param="stop")
    ar = pipe.config.bard is None
    try:
        decode = DecodeOptions.of({**options, "max_new_tokens": 1})
        decode.resolved(pipe.config, ar=ar)                     # every option checked before queueing
    except BardError as e:
        raise APIError(400, str(e)) from e
    return {"messages": chat_messages(body.get("messages"), o.image_root), "options": decode,
            "max_tokens": max_tokens, "stop": tuple(stop), "stream": stream,
            "include_usage": bool(so.get("include_usage"))}


# ---- metrics -------------------------------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        """Its exposition lines."""
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """What /metrics exposes; updated by the handlers and the worker under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.queue_depth = 0
        self.running = 0
        self.tokens = 0
        self.forwards = 0
        self.decode_seconds = 0.0
        self.last_tokens_per_s = 0.0
        self.last_tokens_per_forward = 0.0
        self.batch = Histogram(BATCH_BUCKETS)
        self.step = Histogram(STEP_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def answered(self, status: int, seconds: float | None = None) -> None:
        """Count a finished request by its HTTP status (and its latency)."""
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_done(self, size: int, stats: Stats, tokens: int, seconds: float) -> None:
        """Count a decoded batch."""
        with self.lock:
            self.batch.observe(size)
            for s in stats.step_s:
                self.step.observe(s)
            self.tokens += tokens
            self.forwards += stats.nfe
            self.decode_seconds += seconds
            self.last_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
            self.last_tokens_per_forward = tokens / size / stats.nfe if stats.nfe else 0.0

    def render(self) -> str:
        """The Prometheus text exposition."""
        with self.lock:
            lines = ["# HELP bard_requests_total Chat completion requests answered, by HTTP status.",
                     "# TYPE bard_requests_total counter"]
            lines += [f'bard_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, kind, help_, value in (
                    ("bard_queue_depth", "gauge", "Requests waiting for a batch.", self.queue_depth),
                    ("bard_running_requests", "gauge", "Requests in the batch being decoded.", self.running),
                    ("bard_generated_tokens_total", "counter", "Completion tokens decoded.", self.tokens),
                    ("bard_forwards_total", "counter", "Decoder forwards run (prefill included).", self.forwards),
                    ("bard_decode_seconds_total", "counter", "Seconds spent decoding batches.", self.decode_seconds),
                    ("bard_tokens_per_second", "gauge", "Completion tokens per second of the last batch.",
                     self.last_tokens_per_s),
                    ("bard_tokens_per_forward", "gauge", "Tokens per forward per row of the last batch.",
                     self.last_tokens_per_forward)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
            for name, help_, h in (("bard_batch_size", "Requests per decoded batch.", self.batch),
                                   ("bard_step_seconds", "Wall time of one decoder step.", self.step),
                                   ("bard_request_seconds", "Seconds from arrival to the last token.", self.latency)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + h.lines(name)
            return "\n".join(lines) + "\n"


# ---- the worker ----------------------------------------------------------------------------------------


class Row:
    """One request's row of a running batch: its text so far, what it has sent, when it is done."""

    def __init__(self, job: Job, pipe: Pipeline):
        self.job, self.pipe = job, pipe
        self.sent = ""
        self.done = False
        self.ids: list[int] = []
        self.eos = set(pipe.eos_ids)

    def update(self, ids: list[int], nfe: int) -> None:
        """The row's answer ids so far: send the new text (holding back what could begin a stop string); finish
        at EOS, a stop string or max_tokens."""
        if self.done:
            return
        if self.job.cancelled.is_set() or time.perf_counter() > self.job.deadline:
            self.done = True                       # its handler answers (a disconnect, or 504)
            return
        text, ids, stopped = self.pipe.answer_text(ids[:self.job.max_tokens], self.job.stop)
        # "stop" is OpenAI's name for a stop string and for a natural end (EOS) alike
        reason = ("stop" if stopped or (ids and ids[-1] in self.eos) else
                  "length" if len(ids) >= self.job.max_tokens else None)
        self.ids = ids
        ready = ready_text(text, self.sent, self.job.stop, reason is not None)
        if ready != self.sent and ready.startswith(self.sent):
            self.job.emit("delta", ready[len(self.sent):])
            self.sent = ready
        if reason:
            self.finish(reason, nfe)

    def finish(self, reason: str, nfe: int) -> None:
        """End the row: its last event carries the finish reason and usage (tokens per forward over the `nfe`
        forwards of its batch so far)."""
        if self.done:
            return
        self.done = True
        n = len(self.ids)
        self.job.emit("done", reason, {"prompt_tokens": self.job.prompt_tokens, "completion_tokens": n,
                                       "total_tokens": self.job.prompt_tokens + n,
                                       "tokens_per_forward": round(n / nfe, 4) if nfe else 0.0})


class Worker:
    """The one decoding thread: a bounded wait queue, batches of compatible requests, events per row."""

    def __init__(self, pipe: Pipeline, o: ServeOptions, metrics: Metrics):
        self.pipe, self.o, self.metrics = pipe, o, metrics
        self.ar = pipe.config.bard is None
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="bard-serve-worker", daemon=True)

    def start(self) -> None:
        """Start decoding."""
        self.thread.start()

    def stop(self) -> None:
        """Stop after the batch in progress."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=60)

    def submit(self, job: Job) -> None:
        """Queue a request; APIError 429 when the queue is full."""
        with self.cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.o.max_queue:
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                               f"{self.o.max_queue}); retry later", kind="rate_limit_error", code="queue_full")
            self.waiting.append(job)
            self.metrics.queue_depth = len(self.waiting)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """A client went away (or timed out): its place in the queue is freed now; a running row is dropped."""
        job.cancelled.set()
        with self.cond:
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        now, kept = time.perf_counter(), deque()
        for j in self.waiting:
            if j.cancelled.is_set():
                continue
            if now > j.deadline:
                j.emit("error", 504, "the request timed out waiting for a batch")
                continue
            kept.append(j)
        self.waiting = kept
        self.metrics.queue_depth = len(self.waiting)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest waiting request and the waiting ones it can share a batch with."""
        with self.cond:
            while True:
                self._drop_cancelled()
                if self.waiting or self.stopped:
                    break
                self.cond.wait(timeout=0.5)
            if self.stopped:
                return None
            first = self.waiting.popleft()
            jobs = [first]
            if not first.solo:
                for j in list(self.waiting):
                    if len(jobs) >= self.o.max_batch:
                        break
                    if not j.solo and j.options == first.options:
                        jobs.append(j)
                        self.waiting.remove(j)
            self.metrics.queue_depth = len(self.waiting)
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self.metrics.running = len(jobs)
            try:
                self._run(jobs)
            finally:
                self.metrics.running = 0

    def _run(self, jobs: list[Job]) -> None:
        rows = [Row(j, self.pipe) for j in jobs]
        stats = Stats()
        t0 = time.perf_counter()
        options = replace(jobs[0].options, max_new_tokens=max(j.max_tokens for j in jobs))
        try:
            chunks = self.pipe.stream_batch([j.messages for j in jobs], ar=self.ar, stats=stats,
                                            **{f.name: getattr(options, f.name) for f in fields(options)})
            for kept in chunks:
                for row, ids in zip(rows, kept, strict=True):
                    row.update(ids, stats.nfe)
                if all(r.done for r in rows):
                    break
            chunks.close()
            for row in rows:
                row.finish("stop" if row.ids and row.ids[-1] in row.eos else "length", stats.nfe)
        except BardError as e:
            for row in rows:
                row.job.emit("error", 400, str(e))
            return
        except Exception as e:         # a defect: logged here with its traceback, the client gets one line
            log.exception("batch of %d failed", len(jobs))
            for row in rows:
                row.job.emit("error", 500, f"internal error ({type(e).__name__}); see the server log")
            return
        self.metrics.batch_done(len(jobs), stats, sum(len(r.ids) for r in rows), time.perf_counter() - t0)


# ---- the app -------------------------------------------------------------------------------------------


def build_app(pipe: Pipeline, o: ServeOptions, model_name: str):
    """The FastAPI app over `pipe` (its worker starts with the app and stops with it)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = Metrics()
    worker = Worker(pipe, o, metrics)

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="bard-deploy", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.answered(e.status)
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        metrics.answered(400)
        return error(APIError(400, f"invalid request: {e.errors()[0].get('msg', 'bad value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error(APIError(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404
                              else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        metrics.answered(500)
        return error(APIError(500, f"internal error ({type(e).__name__}); see the server log", kind="server_error"))

    @app.middleware("http")
    async def _limit_size(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > o.max_request_bytes):
            metrics.answered(413)
            return error(APIError(413, f"the request body is larger than --max-request-bytes {o.max_request_bytes}",
                                  code="request_too_large"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": metrics.queue_depth}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "bard-deploy"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        if len(raw) > o.max_request_bytes:
            raise APIError(413, f"the request body is larger than --max-request-bytes {o.max_request_bytes}",
                           code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not JSON ({e})") from e
        req = parse_request(body, pipe, o, model_name)
        try:
            encoded = await asyncio.to_thread(pipe.encode, req["messages"])     # images checked now, not later
        except BardError as e:
            raise APIError(400, str(e)) from e
        loop = asyncio.get_running_loop()
        job = Job(req["messages"], req["options"], req["max_tokens"], req["stop"], len(encoded.input_ids), loop,
                  asyncio.Queue(), time.perf_counter() + o.request_timeout)
        worker.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req["stream"]:
            return StreamingResponse(_sse(request, job, rid, created, req["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, reason, usage = [], None, None
        async for kind, *payload in _events(request, job):
            if kind == "delta":
                text.append(payload[0])
            else:
                reason, usage = payload
        if reason is None:
            metrics.answered(499)                       # the client closed the connection
            return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
        metrics.answered(200, time.perf_counter() - job.arrived)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": reason}], "usage": usage}

    async def _events(request: Request, job: Job):
        """The job's events up to its "done" (an error is raised as APIError); a disconnect or the deadline
        cancels it."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.queue.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(job)
                        return
                    if time.perf_counter() > job.deadline:
                        worker.cancel(job)
                        raise APIError(504, f"the request did not finish within --request-timeout "
                                       f"{o.request_timeout:g} s", kind="timeout_error", code="timeout") from None
                    continue
                if event[0] == "error":
                    raise APIError(event[1], event[2], kind="server_error" if event[1] >= 500 else
                                   "invalid_request_error")
                yield event
                if event[0] == "done":
                    return
        except asyncio.CancelledError:
            worker.cancel(job)
            raise

    async def _sse(request: Request, job: Job, rid: str, created: int, include_usage: bool):
        def chunk(delta: dict, reason: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}] if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        reason, usage = None, None
        try:
            async for kind, *payload in _events(request, job):
                if kind == "delta":
                    yield chunk({"content": payload[0]})
                else:
                    reason, usage = payload
                    yield chunk({}, reason)
        except APIError as e:
            metrics.answered(e.status)
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if reason is None:            # the client went away: nothing more to send
            return
        if include_usage:
            yield chunk({}, usage=usage, choices=False)
        metrics.answered(200, time.perf_counter() - job.arrived)
        yield "data: [DONE]\n\n"

    return app


def model_id(directory: str | Path, o: ServeOptions) -> str:
    """The model id /v1/models lists: --model-name, else the model directory's name."""
    return o.model_name or Path(directory).resolve().name


class Server:
    """A uvicorn server over `build_app` in a background thread (tests, the load benchmark); `url` once up."""

    def __init__(self, pipe: Pipeline, o: ServeOptions, model_name: str):
        import uvicorn

        config = uvicorn.Config(build_app(pipe, o, model_name), host=o.host, port=o.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeInputError("the server did not start", None)
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        """http://host:port of the running server (the real port when 0 was asked for)."""
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def serve(model: str | Path, o: ServeOptions, **load) -> None:
    """`bard-deploy serve`: load the model, then serve until interrupted."""
    import uvicorn

    o = o.check()
    pipe = Pipeline.load(model, **load)
    name = model_id(model, o)
    log.info("serving %s as %r on http://%s:%d", model, name, o.host, o.port)
    uvicorn.run(build_app(pipe, o, name), host=o.host, port=o.port, log_level="info")
