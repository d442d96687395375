"""Deployment: chapter "serving" (the trained chat model answers the clients people already have).

A chat checkpoint becomes an HTTP server that speaks the OpenAI API, so the official `openai` client, curl, and
the tools built on them talk to it unchanged; a web chat page is served beside the API. For engines that batch
many users on big machines (vLLM, TGI, llama.cpp), the checkpoint is exported to a Hugging Face folder instead.
One file, top to bottom:

    config     ServeConfig; argparse is built from its fields
    wire       the OpenAI error body, the response and chunk objects
    requests   a request body -> a validated Job (prompt ids and sampling parameters), or a 400 that names the field
    text       token bytes -> text that never splits a UTF-8 character and never shows a stop string
    engine     one model, one worker thread decoding every request together (continuous batching), a bounded
               queue; a client that hangs up leaves the batch at the next step
    http       ThreadingHTTPServer routes: /v1/models, /v1/chat/completions, /v1/completions, /health, / (the page)
    export     a Hugging Face folder: config.json, model.safetensors (written here), tokenizer.json, chat template
    main       serve a checkpoint, or --export it

Run it:

    python serve.py out/sft                          # http://127.0.0.1:8000: the chat page, and the API under /v1
    python serve.py out/sft --host 0.0.0.0 --api-key SECRET   # reachable from other machines: set a key
    python serve.py --export out/sft hf/forge-sft    # a folder that transformers and vLLM load
    vllm serve hf/forge-sft --served-model-name forge    # on a GPU machine: the same API, many users batched
    python -m pytest -q tests/test_serve.py

From Python, with the official client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")   # any key unless --api-key is set
    for chunk in client.chat.completions.create(model="sft", stream=True,
                                                messages=[{"role": "user", "content": "reverse: abc"}]):
        print(chunk.choices[0].delta.content or "", end="")

## Why the standard library

Everything the OpenAI wire format needs is JSON in and out, status codes, and Server-Sent Events: lines of
`data: {json}` and a blank line, sent as they are ready. http.server's ThreadingHTTPServer gives one thread per
connection; here it speaks HTTP/1.1, and a stream goes out in chunked encoding, whose empty last chunk marks the
end, so a stream cut short by a dying server is an error for the client, never an answer that looks complete.
FastAPI and uvicorn would add validation and async plumbing, not capability, and four dependencies a reader
must learn first. What the standard library leaves to us (a deadline for a whole request, the listen backlog,
which hosts and origins may ask) is in the http section. The Python docs call http.server "not recommended for
production"; what makes a server production-grade for a model is mostly the engine, and the engine here batches
as vLLM's does (below), on a far smaller scale. For big models and many users the path is still the export,
served by vLLM (above).

## One model, one worker, every request at once: continuous batching

Each connection gets a thread, but only one thread (the worker) runs the model. A decode step of a model this
size costs about as much for sixteen sequences as for one: the time goes to reading the weights and to Python,
not to arithmetic (model.DecodeBatch; figures in BENCHMARKS.md). So the worker decodes every active request in
one batch, one forward per step, and requests join and leave between two steps: continuous batching (Yu et al.
2022, "Orca"), the idea the engines people deploy on (vLLM, TGI, llama.cpp's server) are built around. Rows of
the batch over time, one column per step, with requests A to E:

    step      1      2      3      4      5      6      7
    place 0   A pre  A      A      A end  C pre  C      C       pre: the prompt is run (prefill) and gives the
    place 1   B pre  B      B      B      B      B end  -            first token; end: a stop token, a stop
    place 2          D pre  D end  E pre  E      E      E            string, max_tokens, or a hang-up; -: free

Each step first admits waiting requests, in order, while their n choices fit in --max-batch rows (each prompt is
prefilled alone into a free row), then runs one forward for all rows, hands each choice its token, and retires
the choices that ended: their rows are free for the next request at the next step. A short answer never waits
for a long one, and a request waits in the queue only while every row is taken. An answer does not depend on
what else is running: each sequence's keys sit in its own row of the KV cache and its attention sees only them,
and a seeded request samples from its own generators (choice j from seed + j), so greedy answers equal the same
request alone (tests/test_serve.py). --max-batch 1 is the one-at-a-time design this server had before, kept
for comparison: `python bench.py serve` measures the two side by side.

The queue is bounded (--max-queue): when it is full a request is refused at once with 429 and a Retry-After of
about the time the waiting requests will take, which the official client honours by retrying later.

A client that hangs up is noticed by the worker itself between two tokens: it polls the connection's socket, which
reads as "readable with zero bytes" once the peer has closed. So generation stops within a token or two of the
hang-up, not at the next failed write, and not at all for a non-streaming request, which writes nothing until the
end. Its rows leave the batch at once, free for the next request.
"""
import codecs
import hmac
import io
import json
import math
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import data
import sft
import train
from model import DecodeBatch


# --- config ---

@dataclass
class ServeConfig:
    host: str = "127.0.0.1"             # address to bind; 127.0.0.1 = this machine only
    port: int = 8000                    # TCP port; 0 = any free port
    api_key: str | None = None          # clients must send "Authorization: Bearer KEY"; None = no key asked
    model_name: str | None = None       # the model id clients name; None = the checkpoint's run folder name
    data_dir: str | None = None         # tokenizer folder; None = the one the checkpoint was trained on
    max_queue: int = 32                 # requests waiting for the worker; one more is refused with 429
    max_batch: int = 16                 # sequences decoded together (continuous batching); 1 = one at a time
    max_body_bytes: int = 1 << 20       # largest request body, in bytes; larger is refused with 413
    request_timeout: float = 30.0       # seconds to receive a whole request (line, headers, body); then 408
    max_tokens: int | None = None       # new tokens when a request gives no max_tokens; None = up to the context
    max_n: int = 16                     # most choices one request may ask for (n)
    device: str | None = None           # cpu or cuda; None = cuda when available
    dtype: str | None = None            # float32 or bfloat16; None = bfloat16 on CUDA, float32 on CPU
    threads: int | None = None          # torch CPU threads; None = torch's default
    log_requests: bool = True           # one stderr line per request


CHOICES = {"device": ("cpu", "cuda"), "dtype": ("float32", "bfloat16")}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CHAT_STAGES_NOT = (None, "pretrain", "hf")  # checkpoint stages that are base models (train.py writes no stage)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


class ServeError(train.TrainError):
    """Bad input on the command line: one line, exit status 2."""


# --- wire: the OpenAI objects ---
# The official client maps a status to an exception class and reads body["error"]["message"]; it retries 408,
# 409, 429 and every 5xx twice unless the answer carries `x-should-retry: false`. A 5xx here means a generation
# failed, and silently rerunning a long generation twice is worse than reporting it, hence the header on every 5xx.

class APIError(Exception):
    """An OpenAI-style error: status, and the body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {429: "rate_limit_error"}  # the rest by class: 4xx invalid_request_error, 5xx server_error

    def __init__(self, status, message, code=None, param=None, retry_after=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after  # seconds, for a 429: how long the queue ahead should take

    def body(self):
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message, param=None, code="invalid_value"):
    return APIError(400, message, code, param)


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj):
    """One Server-Sent Event: a `data:` line and the blank line that ends it."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


# --- requests: body -> Job ---

class Job:
    """One request for the worker: the prompt ids, the sampling parameters, and the channel back.

    events receives ("delta", [(choice, text, finish_reason or None), ...]) as tokens arrive (streaming only),
    then one ("done", [{"text", "finish_reason", "tokens"} per choice]) or ("error", APIError). cancelled is set
    by the connection's thread when a write fails; conn is the client socket the worker polls for a hang-up."""

    def __init__(self, kind, prompt, n, max_tokens, temperature, top_p, top_k, seed, stop, stop_ids, stream,
                 include_usage, conn=None):
        self.kind, self.prompt, self.n, self.max_tokens = kind, prompt, n, max_tokens
        self.temperature, self.top_p, self.top_k, self.seed = temperature, top_p, top_k, seed
        self.stop, self.stop_ids, self.stream, self.include_usage = stop, stop_ids, stream, include_usage
        self.conn = conn
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())


def field(body, name, kinds, default=None, ok=None, need=""):
    """body[name] checked to be of `kinds` (a JSON bool is never a number here) and to pass `ok`; null = default."""
    value = body.get(name)
    if value is None:
        return default
    wrong_bool = isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
    if wrong_bool or not isinstance(value, kinds) or (ok is not None and not ok(value)):
        raise bad(f"'{name}' must be {need}; got {json.dumps(value)[:60]}", name)
    return value


def message_text(content, where):
    """A message's content: a string, or OpenAI's list of parts of which only {"type": "text"} is understood."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"'{where}.content' must be a string or a list of text parts; got {json.dumps(content)[:60]}",
              f"{where}.content")


def chat_prompt(body, tokenizer):
    """messages -> prompt ids, rendered by sft.py's template (so the model sees what it was trained on)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                  "missing_field" if messages is None else "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system turn
        if role not in sft.ROLES:
            raise bad(f"'messages[{i}].role' is {json.dumps(role)}: use one of {', '.join(sft.ROLES)}",
                      f"messages[{i}].role")
        clean.append({"role": role, "content": message_text(m.get("content"), f"messages[{i}]")})
    return sft.render_prompt(clean, tokenizer)


def completion_prompt(body, tokenizer):
    """prompt (a string, one string in a list, or a list of token ids) -> ids. A string is a new document, so it
    follows <|endoftext|> exactly as every pretraining document did (data.py starts each one with it)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [tokenizer.eot_id] + tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in prompt):
        return list(prompt)
    raise bad(f"'prompt' must be a string or a non-empty list of token ids below {tokenizer.vocab_size}; "
              f"got {json.dumps(prompt)[:60]}", "prompt", "missing_field" if prompt is None else "invalid_value")


UNSUPPORTED = {"chat": ("logprobs", "top_logprobs", "tools", "functions", "audio"),
               "completion": ("logprobs", "echo", "suffix")}


def parse_job(kind, body, tokenizer, block_size, cfg, model_id):
    """A request body -> Job, or an APIError (400 naming the field, 404 for another model's name)."""
    model = field(body, "model", str, model_id, need="a string")
    if model != model_id:
        raise APIError(404, f"the model {model!r} is not served here; this server serves {model_id!r} "
                            f"(GET /v1/models)", "model_not_found", "model")
    for name in UNSUPPORTED[kind]:
        if body.get(name) not in (None, False, 0, [], ""):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if kind == "chat" and body.get("response_format") not in (None, {"type": "text"}):
        raise bad("'response_format' other than text is not supported by this server", "response_format",
                  "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' is not supported by this server", "best_of", "unsupported_parameter")
    prompt = chat_prompt(body, tokenizer) if kind == "chat" else completion_prompt(body, tokenizer)
    room = block_size - len(prompt)
    if room < 1:
        raise bad(f"the prompt is {len(prompt)} tokens; the model's context is {block_size} tokens, with at least "
                  f"one left for the answer: shorten the prompt", "messages" if kind == "chat" else "prompt",
                  "context_length_exceeded")
    count = dict(ok=lambda v: v >= 1, need="an integer of at least 1")
    max_tokens = field(body, "max_completion_tokens", int, **count) if kind == "chat" else None
    max_tokens = max_tokens or field(body, "max_tokens", int, **count)
    if max_tokens is not None and max_tokens > room:
        raise bad(f"max_tokens {max_tokens} plus the prompt's {len(prompt)} tokens is more than the model's context "
                  f"of {block_size} tokens: ask for at most {room}", "max_tokens", "context_length_exceeded")
    max_tokens = max_tokens or min(room, cfg.max_tokens or room)
    number = (int, float)
    temperature = field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2")
    top_p = field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number above 0, at most 1")
    top_k = field(body, "top_k", int, 0, lambda v: v >= 0, "an integer of at least 0 (0 = off)")
    seed = field(body, "seed", int, None, lambda v: 0 <= v < 2**63, "an integer from 0 to 2^63-1")
    n = field(body, "n", int, 1, lambda v: 1 <= v <= cfg.max_n, f"an integer from 1 to {cfg.max_n}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
        raise bad(f"'stop' must be a string or a list of at most 4 non-empty strings; got {json.dumps(stop)[:60]}",
                  "stop")
    stream = field(body, "stream", bool, False, need="true or false")
    options = field(body, "stream_options", dict, {}, need="an object")
    include_usage = field(options, "include_usage", bool, False, need="true or false")
    ignore_eos = field(body, "ignore_eos", bool, False, need="true or false")  # vLLM's extension, for benchmarks
    # Every special token ends an answer: <|end|> closes the assistant's turn, and a chat model that writes
    # <|user|> or <|endoftext|> has left its turn too.
    stop_ids = [] if ignore_eos else sorted(tokenizer.special_ids.values())
    return Job(kind, prompt, n, max_tokens, float(temperature), float(top_p), top_k or None, seed, stop, stop_ids,
               stream, include_usage)


# --- text: tokens -> what may be shown ---

class TextStream:
    """One choice's answer as text, handed out as it grows.

    A token is a run of bytes, and a character of several bytes can be split across two tokens; an incremental
    UTF-8 decoder keeps the first half until the rest arrives, so no chunk ever carries half a character (which a
    client would show as U+FFFD). A stop string may also arrive split across tokens: the tail that could be the
    start of one is held back until it is ruled out, and when a stop string completes the text is cut before
    it, so the client never sees it (llama.cpp's partial-stop rule)."""

    def __init__(self, stop):
        self.stop = stop
        self.text, self.sent, self.tokens, self.finish_reason = "", 0, 0, None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_bytes, final=False):
        """Add a token's bytes; return the text that can be sent now (possibly empty)."""
        start = len(self.text)
        self.text += self._utf8.decode(token_bytes, final)
        if not self.stop:  # the common case, once per token: nothing to search or hold back
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        found = [at for s in self.stop if (at := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        hold = 0
        if found:
            self.text, self.finish_reason = self.text[:min(found)], "stop"
        elif not final:  # the longest tail that is a proper prefix of some stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent:len(self.text) - hold]
        self.sent += len(out)
        return out

    def finish(self, reason):
        """The rest of the text (nothing held back any more); the finish reason is `reason` unless a stop string
        already ended the answer."""
        out = self.push(b"", final=True)
        self.finish_reason = self.finish_reason or reason
        return out


# --- engine: one model, one worker, continuous batching ---

def client_gone(sock):
    """True when the peer of sock has closed the connection: readable, with zero bytes to read. Never blocks."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


# Seconds between two hand-overs of new text to a connection's thread, per request in the batch. Each hand-over
# wakes that thread, which then competes with the worker for the GIL: once per token, at the mini preset's ~700
# tokens/s on a CPU, that cost up to 18% of the speed. Every 5 ms, an answer arrives in groups of a few tokens
# that no reader can tell apart, and a model slower than 200 tokens/s streams every token as it comes. With k
# requests in the batch each is handed its text every k * 5 ms (at most 50 ms, still smoother than anyone reads),
# so the wake-ups stay about 200 a second however many clients there are. A hang-up is looked for at every step.
TICK = 0.005


class Engine:
    """The model, its tokenizer, and the worker thread that decodes every request: continuous batching.

    The worker's loop, once per step:
      admit    take waiting requests from the queue, in order, while their n choices fit in max_batch rows;
               prefill each prompt (model.DecodeBatch.add) and hand out its first token
      decode   one batched forward for every active choice (DecodeBatch.step): each gets its next token
      hand out each token goes through its choice's TextStream; a choice that hits a stop token, a stop
               string or max_tokens leaves the batch (its row is free for the next request at once)
      retire   a request whose choices have all finished gets its "done" event; one whose client hung up
               leaves the batch with all its choices
    """

    def __init__(self, model, tokenizer, model_id="forge", max_queue=32, autocast=nullcontext, max_batch=16,
                 max_n=16):
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        self.block_size = model.config.block_size
        self.autocast, self.max_batch = autocast, max_batch
        self.rows = max(max_batch, max_n)  # a request with more choices than max_batch runs when it is alone
        self.jobs = queue.Queue(maxsize=max_queue)
        self.stats = {"served": 0, "cancelled": 0, "tokens": 0, "busy": False, "active": 0, "peak_active": 0}
        self.last_tokens = 0  # tokens of the request that left the batch last (tests read it after a hang-up)
        self.seconds = 1.0    # a request's mean time in the batch (moving average), for Retry-After
        self._closing, self._deadline = threading.Event(), None
        self._worker = threading.Thread(target=self._loop, name="forge-worker", daemon=True)
        self._worker.start()

    def submit(self, job):
        if self._closing.is_set():
            raise APIError(503, "the server is shutting down", "shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                                "retry in a moment", "queue_full", retry_after=self.retry_after()) from None

    def retry_after(self):
        """Seconds until the requests waiting now should have been served: max_batch at a time, each taking
        the mean time a request spends in the batch."""
        return max(1, math.ceil(self.jobs.qsize() / self.max_batch * self.seconds))

    def close(self, timeout=10.0):
        """Stop: no new requests; those waiting get a 503; those running finish, or after `timeout` seconds
        end with an error (a stream says so, so a cut answer never looks complete)."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        try:
            self.jobs.put_nowait(None)  # wakes a worker that waits for work
        except queue.Full:
            pass  # then it is not waiting
        self._worker.join(timeout=timeout + 5)

    def _loop(self):
        batch, running, head = DecodeBatch(self.model, self.rows), [], None  # head: next request, waiting for rows
        while True:
            if self._closing.is_set():
                while head is not None or not self.jobs.empty():
                    job, head = head or self.jobs.get_nowait(), None
                    if job is not None:
                        job.events.put(("error", APIError(503, "the server is shutting down", "shutting_down")))
                if not running:
                    return
                if time.monotonic() > self._deadline:
                    self._fail(running, APIError(503, "the server shut down before the answer was finished",
                                                 "shutting_down"))
                    return
            # admit, in arrival order: a request whose choices do not fit waits at the head for rows to free up
            while not self._closing.is_set() and (not running or len(batch) < self.max_batch):
                if head is None:
                    try:
                        head = self.jobs.get(block=not running)  # nothing running: sleep until a request comes
                    except queue.Empty:
                        break
                    if head is None:  # close() woke us
                        break
                if running and len(batch) + head.n > self.max_batch:
                    break
                job, head = head, None
                self._start(job, batch, running)
            if not running:
                continue
            try:
                with self.autocast():
                    batch.step()
            except Exception as e:  # every running request fails: the batch's state is unknown
                self._fail(running, APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
                batch, running = DecodeBatch(self.model, self.rows), []
                continue
            self.stats["peak_active"] = max(self.stats["peak_active"], len(batch))  # rows decoded together
            for job in running[:]:
                self._hand_out(job, batch, running)
            self.stats["active"], self.stats["busy"] = len(batch), bool(running)

    def _start(self, job, batch, running):
        """Prefill a request's prompt into n rows and hand out the first token of each choice."""
        if job.cancelled.is_set() or client_gone(job.conn):  # hung up while waiting: nothing to do
            self.stats["cancelled"] += 1
            return
        job.texts = [TextStream(job.stop) for _ in range(job.n)]
        job.deltas, job.tick, job.started = [], 0.0, time.perf_counter()
        try:
            with self.autocast():
                job.seqs = batch.add(job.prompt, job.n, job.temperature, job.top_k, job.top_p, job.seed)
        except Exception as e:  # this request alone fails (its rows never joined the batch)
            job.events.put(("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")))
            return
        running.append(job)
        self.stats["active"], self.stats["busy"] = len(batch), True
        self._hand_out(job, batch, running)

    def _hand_out(self, job, batch, running):
        """Each unfinished choice's newest token -> text for the client; finished choices leave the batch."""
        token_bytes = self.tokenizer.enc.decode_single_token_bytes
        for i, (seq, text) in enumerate(zip(job.seqs, job.texts)):
            if seq.row is None:  # finished earlier
                continue
            t = seq.tokens[-1]
            text.tokens += 1
            new = text.finish("stop") if t in job.stop_ids else text.push(token_bytes(t))
            if not text.finish_reason and text.tokens >= job.max_tokens:
                new += text.finish("length")
            if new or text.finish_reason:
                job.deltas.append((i, new, text.finish_reason))
            if text.finish_reason:
                batch.remove(seq)
        finished = all(seq.row is None for seq in job.seqs)
        if not finished and (job.cancelled.is_set() or client_gone(job.conn)):
            for seq in job.seqs:  # the client hung up: its rows are free from the next step on
                if seq.row is not None:
                    batch.remove(seq)
            self.stats["cancelled"] += 1
            return self._leave(job, running)
        now = time.perf_counter()
        if job.stream and job.deltas and (finished or now - job.tick >= min(TICK * len(running), 0.05)):
            job.events.put(("delta", job.deltas))
            job.deltas, job.tick = [], now
        if finished:
            self.stats["served"] += 1
            self.stats["tokens"] += sum(t.tokens for t in job.texts)
            self.seconds = 0.9 * self.seconds + 0.1 * (now - job.started)
            job.events.put(("done", [{"text": t.text, "finish_reason": t.finish_reason, "tokens": t.tokens}
                                     for t in job.texts]))
            self._leave(job, running)

    def _leave(self, job, running):
        running.remove(job)
        self.last_tokens = max(t.tokens for t in job.texts)

    def _fail(self, running, err):
        for job in running:
            job.events.put(("error", err))
        running.clear()


# --- http ---
# HTTP/1.1, so a connection carries one request after another (keep-alive), and every answer says where it ends:
# a Content-Length, or for a stream the chunked encoding, whose zero-length last chunk is the end. Under HTTP/1.0 a
# stream ended when the connection closed, so a server killed mid-answer left the client with an answer that
# looked complete; a chunked stream cut short is an error in every client (the openai client's APIConnectionError).
#
# Who may ask. Bound to loopback without a key, the server still gets requests from every web page the user's
# browser opens: a cross-origin POST with a text/plain body needs no CORS preflight, so a page could run
# generations, and a page whose host name is re-pointed at 127.0.0.1 (DNS rebinding) could read the answers too.
# The first carries an Origin header that is not this server's, the second a Host that is not a loopback name.

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as they appear in a Host header, before the port


class RequestReader(io.RawIOBase):
    """A connection's incoming bytes under one deadline for the whole request. The socket's timeout bounds each
    read alone, so a client that sends a byte a minute could hold its thread forever (slowloris); here no read
    waits past the deadline, which the handler sets as each request begins."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout, self.deadline = sock, timeout, 0.0

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(min(left, self.timeout))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # what the writes of the answer wait at most


class Handler(BaseHTTPRequestHandler):
    """One connection: its requests, one after another, each answered in full before the next is read."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # before the request line is parsed; http.server's 0.9 sends no status line
    server_version = "forge-serve"
    timeout = 60  # seconds one read or write may wait (a client that stops reading its stream)

    # --- plumbing ---

    def setup(self):
        super().setup()
        self.rfile.close()  # replaced by one that keeps each request under its deadline
        self.reader = RequestReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.server.cfg.request_timeout  # the wait for it included
        self.body_read = False
        try:
            super().handle_one_request()
        except (ConnectionResetError, BrokenPipeError):  # the client left: nothing to answer, no traceback
            self.close_connection = True

    def parse_request(self):
        try:
            return super().parse_request()
        except TimeoutError:  # the headers trickled in too slowly
            self.send_error(408, f"the request's headers did not arrive within {self.server.cfg.request_timeout} s")
            return False

    def log_message(self, format, *args):
        if self.server.cfg.log_requests:
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request, an unknown method, headers too long) as OpenAI bodies
        too. What follows a request that was not understood cannot be trusted to be a request: close."""
        self._send_json(code, APIError(code, message or self.responses.get(code, ("error",))[0]).body(), close=True)

    def _send(self, status, body=b"", content_type="application/json", headers=(), close=False):
        """A whole answer, its Content-Length saying where it ends; for HEAD the headers alone. The connection
        closes after it when the request's body is still unread and cannot be read away."""
        close = close or not self._body_done()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 500:
            self.send_header("x-should-retry", "false")
        for key, value in headers:
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status, obj, headers=(), close=False):
        self._send(status, json.dumps(obj).encode(), headers=headers, close=close)

    def _send_error(self, err):
        headers = []
        if err.status == 429:
            headers.append(("Retry-After", str(err.retry_after or 1)))
        if err.status == 405:
            headers.append(("Allow", ", ".join(self._allowed(self.path.split("?", 1)[0]))))
        self._send_json(err.status, err.body(), headers)

    def _body_done(self):
        """Whether the request's body is out of the way, reading away one that was not used: left unread it would
        be taken for the next request, and closing a socket on unread bytes resets it under our answer."""
        if self.body_read:
            return True
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not (length.isascii() and length.isdigit()) \
                or int(length) > 16 * self.server.cfg.max_body_bytes:
            return False
        left = int(length)
        try:
            while left and (piece := self.rfile.read(min(left, 1 << 16))):
                left -= len(piece)
        except OSError:  # the deadline passed, or the client reset
            return False
        return left == 0

    def _read_body(self):
        """The request body as JSON (an object), or APIError 411, 413, 408 or 400."""
        length, limit = self.headers.get("Content-Length"), self.server.cfg.max_body_bytes
        if length is None or "Transfer-Encoding" in self.headers:
            raise APIError(411, "send the body with a Content-Length header", "length_required")
        if not (length.isascii() and length.isdigit()):  # str.isdigit() alone passes '²', which int() refuses
            raise bad(f"Content-Length must be a number of bytes; got {length[:20]!r}", code="invalid_content_length")
        if int(length) > limit:
            raise APIError(413, f"the request body is {length} bytes; the limit is {limit}", "request_too_large")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.server.cfg.request_timeout} s",
                           "request_timeout") from None
        self.body_read = True
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad(f"the body must be a JSON object, not {type(body).__name__}", code="invalid_json")
        return body

    def _check_key(self):
        key = self.server.cfg.api_key
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if key is not None and not (scheme.lower() == "bearer"  # the scheme's case does not matter (RFC 9110)
                                    and hmac.compare_digest(given.strip().encode(), key.encode())):  # constant time
            raise APIError(401, "incorrect or missing API key: send the header Authorization: Bearer KEY",
                           "invalid_api_key")

    def _check_origin(self):
        """Bound to loopback: only this machine's names in Host, and no Origin but this server's own (see above)."""
        if self.server.cfg.host not in LOCAL_HOSTS:
            return
        host = self.headers.get("Host", "").lower()
        name = host.rpartition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        if host and name not in LOOPBACK_NAMES:
            raise APIError(403, f"Host {host!r} is not this machine: a server on {self.server.cfg.host} answers "
                                f"{', '.join(LOOPBACK_NAMES)} only", "host_not_allowed")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host}":
            raise APIError(403, f"requests from the web page at {origin!r} are refused: only this server's own "
                                f"page may call it", "origin_not_allowed")

    def _allowed(self, path):
        """The methods path answers to; () for no such path."""
        if path in ("/v1/chat/completions", "/v1/completions"):
            return ("POST", "OPTIONS")
        if path in ("/", "/index.html", "/health", "/v1/models", f"/v1/models/{self.server.engine.model_id}"):
            return ("GET", "HEAD", "OPTIONS")
        return ()

    def _route(self):
        """The request's path once it may be answered, checked in this order: who asks (403), the key on every
        /v1 path before anything else about the request is looked at (401), the path (404), the method (405)."""
        path = self.path.split("?", 1)[0]
        self._check_origin()
        if path == "/v1" or path.startswith("/v1/"):
            self._check_key()
        allowed = self._allowed(path)
        if not allowed:
            raise APIError(404, f"no route {self.command} {path}: the API is GET /v1/models, POST "
                                f"/v1/chat/completions and POST /v1/completions", "not_found")
        if self.command not in allowed:
            raise APIError(405, f"{path} takes {', '.join(allowed)}, not {self.command}", "method_not_allowed")
        return path

    # --- routes ---

    def do_GET(self):
        engine = self.server.engine
        try:
            path = self._route()
            if path in ("/", "/index.html"):
                self._send(200, self.server.page, "text/html; charset=utf-8")
            elif path == "/health":
                self._send_json(200, {"status": "ok", "model": engine.model_id, "queued": engine.jobs.qsize(),
                                      **engine.stats})
            else:
                card = {"id": engine.model_id, "object": "model", "created": self.server.created,
                        "owned_by": "forge", "context_length": engine.block_size}
                self._send_json(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
        except APIError as e:
            self._send_error(e)

    do_HEAD = do_GET  # the same status and headers; _send writes no body for HEAD

    def do_POST(self):
        routes = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        try:
            path = self._route()
            body = self._read_body()
            engine = self.server.engine
            job = parse_job(routes[path], body, engine.tokenizer, engine.block_size, self.server.cfg,
                            engine.model_id)
            job.conn = self.connection
            engine.submit(job)
        except RecursionError:  # JSON nested past Python's recursion limit, in json.loads or in quoting a field
            self._send_error(bad("the body's JSON is nested too deeply", code="invalid_json"))
            return
        except APIError as e:
            self._send_error(e)
            return
        with self.server.answering():
            (self._stream if job.stream else self._answer)(job)

    def do_OPTIONS(self):
        try:
            self._send(200, headers=[("Allow", ", ".join(self._allowed(self._route())))])
        except APIError as e:
            self._send_error(e)

    def do_PUT(self):  # no path takes PUT, DELETE or PATCH: _route answers 405 with the methods it takes, or 404
        try:
            self._route()
        except APIError as e:
            self._send_error(e)

    do_DELETE = do_PATCH = do_PUT

    # --- answers ---

    def _events(self, job):
        """The job's events in batches (all that are ready), up to "done" or "error". Ends early, cancelling the
        job, when the client hangs up while the job waits in the queue."""
        while True:
            try:
                batch = [job.events.get(timeout=0.5)]
            except queue.Empty:
                if client_gone(self.connection):
                    job.cancelled.set()
                    return
                continue
            while True:
                try:
                    batch.append(job.events.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if batch[-1][0] in ("done", "error"):
                return

    def _answer(self, job):
        for batch in self._events(job):
            kind, result = batch[-1]
            if kind == "error":
                self._send_error(result)
            elif kind == "done":
                self._send_json(200, self._response(job, result))

    def _response(self, job, rows):
        if job.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                        "finish_reason": r["finish_reason"]} for i, r in enumerate(rows)]
        else:
            choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                       for i, r in enumerate(rows)]
        return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": self.server.engine.model_id, "choices": choices,
                "usage": usage(len(job.prompt), sum(r["tokens"] for r in rows))}

    def _chunk(self, job, choices, **extra):
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        return sse({"id": job.id, "object": obj, "created": job.created, "model": self.server.engine.model_id,
                    "choices": choices, **extra})

    def _choice(self, job, i, text, finish_reason):
        if job.kind == "chat":
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _stream(self, job):
        """Server-Sent Events: a first chunk per choice (the assistant's role), content chunks, a chunk with each
        choice's finish_reason, the usage chunk when stream_options.include_usage asks, then data: [DONE]. Once
        the 200 has gone out an error can only travel in the stream: data: {"error": {...}}, which the official
        client raises as an APIError. Each write is one chunk, and the zero-length chunk ends a finished stream
        only; an HTTP/1.0 client gets the events unframed, ended by the connection's close."""
        chunked = self.request_version >= "HTTP/1.1"

        def write(data):
            if data:  # (an empty chunk would be the end)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")  # a reverse proxy (nginx) must not hold events back
            self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")))
            self.end_headers()
            if job.kind == "chat":
                write(b"".join(self._chunk(job, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]) for i in range(job.n)))
            ended = False
            for batch in self._events(job):
                out = []
                for kind, payload in batch:
                    if kind == "delta":
                        # Deltas that piled up while this thread waited go out merged: one chunk per choice.
                        merged = {}
                        for i, text, reason in payload:
                            merged.setdefault(i, ["", None])[0] += text
                            merged[i][1] = reason or merged[i][1]
                        for i, (text, reason) in sorted(merged.items()):
                            if text:
                                out.append(self._chunk(job, [self._choice(job, i, text, None)]))
                            if reason:
                                out.append(self._chunk(job, [self._choice(job, i, "", reason)]))
                    elif kind == "error":
                        out.append(sse(payload.body()))
                    else:
                        if job.include_usage:
                            out.append(self._chunk(job, [], usage=usage(len(job.prompt),
                                                                        sum(r["tokens"] for r in payload))))
                ended = batch[-1][0] in ("done", "error")
                if ended:
                    out.append(sse(b"[DONE]"))
                write(b"".join(out))
            if not ended:  # the client left while its request waited
                self.close_connection = True
            elif chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):  # the client left: stop its generation
            job.cancelled.set()
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection's thread never keeps the process alive
    allow_reuse_address = True
    # Connections the kernel completes before they are accepted. socketserver's 5 drops the SYNs of a burst
    # beyond it, and a client resends a dropped SYN after 1 s: 64 clients at once waited a second to connect.
    request_queue_size = 128

    def __init__(self, engine, cfg):
        self.engine, self.cfg, self.created = engine, cfg, int(time.time())
        self.in_flight, self.idle = 0, threading.Condition()  # answers being written; a shutdown waits for them
        with open(PAGE, "rb") as f:
            self.page = f.read()
        super().__init__((cfg.host, cfg.port), Handler)

    @contextmanager
    def answering(self):
        with self.idle:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def drain(self, timeout):
        """Wait up to timeout seconds for the answers being written to be written."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout)


# --- export: a Hugging Face folder ---
# Two families of the transformers library cover forge's useful configs, tensor for tensor:
#   GPT2LMHeadModel   learned positions, LayerNorm with biases, tanh-GELU MLP, multi-head attention
#   LlamaForCausalLM  RoPE, RMSNorm, SwiGLU MLP, no biases, grouped-query attention allowed
# Anything else (ReLU^2, QK-norm, soft-capping, a mix of the two families) has no counterpart in either and is
# refused by name: exporting it anyway would give a model that loads and computes something else.
#
# Weight layouts. GPT-2 stores its linear layers as Conv1D, (in, out): forge's nn.Linear (out, in) is transposed.
# Llama has separate q/k/v projections where forge has one c_attn with [q | k | v] rows, and gate/up where
# forge's SwiGLU c_fc has [value | gate] rows: split by rows. RoPE: forge rotates channel i with channel i + D/2
# (the GPT-NeoX layout), which is HF Llama's rotate_half, so q and k need no permutation (Meta's original
# checkpoints interleave pairs and do); the export test checks the logits to 1e-4.

class ExportError(ServeError):
    """A config or folder that cannot be exported: one line, exit status 2."""


FAMILIES = {
    "GPT2LMHeadModel": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False, logit_softcap=None),
    "LlamaForCausalLM": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=False, logit_softcap=None),
}


def hf_architecture(config):
    """The transformers class a GPTConfig exports to, chosen by its positions; ExportError names the first field
    that the class cannot express."""
    arch = "GPT2LMHeadModel" if config.pos == "learned" else "LlamaForCausalLM"
    for name, want in FAMILIES[arch].items():
        if getattr(config, name) != want:
            raise ExportError(f"GPTConfig.{name}={getattr(config, name)!r} has no counterpart in {arch} (what "
                              f"pos={config.pos!r} exports to, which needs {name}={want!r}); cannot export")
    if arch == "GPT2LMHeadModel" and config.n_kv_head != config.n_head:
        raise ExportError(f"GPTConfig.n_kv_head={config.n_kv_head} (grouped-query) has no counterpart in "
                          f"GPT2LMHeadModel, which needs n_kv_head=n_head={config.n_head}; cannot export")
    return arch


def mlp_hidden(model):
    return model.transformer.h[0].mlp.c_proj.in_features


def hf_eos(special_ids):
    """forge's server stops on every special token; so does the export, in config.json and generation_config."""
    return sorted(special_ids[s] for s in data.SPECIAL_TOKENS)


def hf_config(model, arch, special_ids, chat):
    c = model.config
    common = dict(architectures=[arch], vocab_size=c.n_tokens, tie_word_embeddings=c.tie_embeddings,
                  bos_token_id=special_ids["<|endoftext|>"],
                  eos_token_id=hf_eos(special_ids),  # a list, as Llama 3's config.json has
                  torch_dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."), use_cache=True)
    if arch == "GPT2LMHeadModel":
        return dict(model_type="gpt2", n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=mlp_hidden(model), activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True, **common)
    return dict(model_type="llama", hidden_size=c.n_embd, intermediate_size=mlp_hidden(model),
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                head_dim=c.n_embd // c.n_head, hidden_act="silu", max_position_embeddings=c.block_size,
                rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,  # the 4.x name; 5.x reads rope_parameters
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, rope_scaling=None,
                attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02, **common)


def hf_state_dict(model, arch):
    """forge's tensors under the names and layouts of the transformers class (a tied lm_head is left out: the
    class ties it to the embedding when it loads)."""
    sd, c = model.state_dict(), model.config
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    for name in ("transformer.wte.weight", "lm_head.weight"):  # rows above n_tokens pad the vocabulary on a GPU:
        if name in sd:                                          # no token, so not exported (hf_config's vocab_size)
            sd[name] = sd[name][:c.n_tokens]
    if arch == "GPT2LMHeadModel":
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        return {k: (v.t() if k.endswith(conv1d) else v) for k, v in sd.items()}
    D, H, H_kv, hidden = c.n_embd // c.n_head, c.n_head, c.n_kv_head, mlp_hidden(model)
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.c_attn.weight"].split([H * D, H_kv * D, H_kv * D])
        value, gate = sd[p + "mlp.c_fc.weight"].split([hidden, hidden])  # forge: value * silu(gate)
        out.update({q + "input_layernorm.weight": sd[p + "ln_1.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
                    q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
                    q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                    q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": value,
                    q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"]})
    return out


# safetensors: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape", "data_offsets":
# [begin, end]}} (offsets into the data after the header), then the raw little-endian tensors back to back. The
# format is this small, so it is written here rather than taking the safetensors package as a runtime dependency.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(tensors, path, metadata=None):
    if sys.byteorder != "little":
        raise ExportError("safetensors is little-endian; this writer copies memory as it is, on little-endian hosts")
    header, blobs, offset = {"__metadata__": metadata or {}}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()  # (numel * itemsize,) bytes
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for raw in blobs:
            f.write(raw)


# The tokenizer. forge's BPE is tiktoken's algorithm over bytes: split the text with the pattern, then in each
# piece merge the adjacent pair whose concatenation has the lowest rank, as long as any pair's concatenation is a
# token (and a piece that is a token whole is taken whole). Hugging Face `tokenizers` says the same thing as:
#   pre-tokenizer  Split by the same regex, then ByteLevel (bytes -> printable characters, GPT-2's table)
#   model          BPE with vocab = every token as those characters, and merges ranked by what they make;
#                  ignore_merges = a piece that is a token whole is taken whole, as tiktoken does
# The merges list holds every split of every token into two tokens, ranked by the token they make, not only the
# one pair the token was trained from: tiktoken merges any adjacent pair whose concatenation is a token, and a
# token can be reached by another split than its training pair. (Two different pairs that make the same token
# at overlapping places in one piece, ab|a|ba, are the one case ranks cannot order as tiktoken does, by
# position; it needs a token that is such a palindrome-like overlap and is left as is.)
# The regex: tiktoken's engine reads \x80 and \U0010FFFF; Oniguruma (inside tokenizers) wants \x{80}.

CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)  # sft.render and render_prompt, as Jinja: <|endoftext|>, then <|role|> content <|end|> per turn
# {% generation %} marks what sft.render trains (assistant content and its <|end|>), so transformers'
# return_assistant_tokens_mask, and TRL's assistant_only_loss with it, give sft's loss mask. The template writes
# its own <|endoftext|>: apply_chat_template tokenizes without the BOS post-processor, so it is there once.
# Unlike sft.render, which encodes content as plain text, the template pastes content into the text before it is
# tokenized, so marker text typed by a user ("hi<|end|><|assistant|>") becomes real markers: transformers has no
# setting that keeps added special tokens plain in one part of a string only. Serve untrusted input with forge's
# server, or strip the markers from content first.


def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to printable characters: printable Latin-1 bytes map to
    themselves, the rest to code points from 256 up (so a space is 'Ġ'). ByteLevel in tokenizers uses it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def oniguruma_pattern(pattern):
    r"""tiktoken's regex spelled for Oniguruma: \xHH, \uHHHH and \UHHHHHHHH escapes become \x{...}."""
    return re.sub(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))",
                  lambda m: "\\x{%X}" % int(m.group(1) or m.group(2) or m.group(3), 16), pattern)


def hf_tokenizer_json(tokenizer):
    """The tokenizer.json of the `tokenizers` library for a forge (tiktoken) tokenizer: same ids for every text."""
    enc = tokenizer.enc
    ranks, table = enc._mergeable_ranks, bytes_to_unicode()

    def chars(b):
        return "".join(table[x] for x in b)

    vocab = {chars(b): r for b, r in ranks.items()}
    merges = [f"{chars(b[:i])} {chars(b[i:])}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])
              for i in range(1, len(b)) if b[:i] in ranks and b[i:] in ranks]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])]
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": oniguruma_pattern(enc._pat_str)}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            # forge starts every document, eval row and completion prompt with <|endoftext|>: so does encode().
            "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                        {"Sequence": {"id": "B", "type_id": 0}}],
                               "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [tokenizer.eot_id],
                                                                    "tokens": ["<|endoftext|>"]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def export_hf(model, tokenizer, out_dir, chat=True):
    """Write model and tokenizer as a Hugging Face folder: config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json (with the chat template). Written beside out_dir and renamed into place
    at the end, so a failed export never leaves a folder that looks complete. -> the architecture name.

    The folder encodes, renders chats, greedy-decodes and stops as forge does, with one gap that transformers
    leaves open: marker text inside a message's content becomes real markers through apply_chat_template (see
    CHAT_TEMPLATE); forge's server keeps it plain."""
    arch = hf_architecture(model.config)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ExportError(f"{out_dir} exists and is not an empty folder; remove it or give another")
    special = tokenizer.special_ids
    missing = [s for s in data.SPECIAL_TOKENS if s not in special]
    if missing:
        raise ExportError(f"the tokenizer lacks {', '.join(missing)}; export a model loaded by sft.load_base")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_json(os.path.join(tmp, "config.json"), hf_config(model, arch, special, chat))
        # forge samples from the whole distribution: top_k 0 turns off the top_k 50 that transformers applies
        # when a generation config leaves it out.
        write_json(os.path.join(tmp, "generation_config.json"), {"bos_token_id": special["<|endoftext|>"],
                   "eos_token_id": hf_eos(special), "do_sample": True, "top_k": 0})
        write_safetensors(hf_state_dict(model, arch), os.path.join(tmp, "model.safetensors"), {"format": "pt"})
        write_json(os.path.join(tmp, "tokenizer.json"), hf_tokenizer_json(tokenizer))
        write_json(os.path.join(tmp, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
            "eos_token": "<|end|>" if chat else "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": model.config.block_size, "add_bos_token": True, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE})
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch


# --- main ---

def load(path, data_dir=None):
    """(model, chat tokenizer, checkpoint dict, is it a chat model) for a checkpoint file or run folder."""
    if not os.path.exists(path):
        raise ServeError(f"{path} does not exist: give a checkpoint file or a run folder (out/sft)")
    ckpt_path = sft.find_init(path)
    model, tokenizer, _, ckpt = sft.load_base(ckpt_path, data_dir)
    return model, tokenizer, ckpt_path, ckpt.get("stage") not in CHAT_STAGES_NOT


def startup_warnings(ckpt_path, chat, cfg):
    found = []
    if not chat:
        found.append(f"warning: {ckpt_path} is not a chat model (no SFT stage): /v1/chat/completions will answer "
                     f"in the base model's style; /v1/completions continues text as it was trained to")
    if cfg.host not in LOCAL_HOSTS and cfg.api_key is None:
        found.append(f"warning: listening on {cfg.host} without --api-key: anyone who can reach this port can use "
                     f"the model")
    return found


def serve(path, cfg):
    if min(cfg.max_queue, cfg.max_n, cfg.max_body_bytes, cfg.max_batch) < 1:
        raise ServeError("--max-queue, --max-n, --max-body-bytes and --max-batch must each be at least 1")
    if cfg.request_timeout <= 0:
        raise ServeError(f"--request-timeout must be above 0 seconds; got {cfg.request_timeout}")
    rt = train.setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    model, tokenizer, ckpt_path, chat = load(path, cfg.data_dir)
    model.to(rt.device).eval()
    model_id = cfg.model_name or os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))
    for line in startup_warnings(ckpt_path, chat, cfg):
        print(line, file=sys.stderr)
    engine = Engine(model, tokenizer, model_id, cfg.max_queue, rt.autocast, cfg.max_batch, cfg.max_n)
    try:
        httpd = Server(engine, cfg)
    except OSError as e:
        raise ServeError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    host, port = httpd.server_address[:2]
    print(f"serving {model_id} ({model.num_params():,} parameters, context {model.config.block_size}) from "
          f"{ckpt_path} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    # SIGTERM (kill, docker stop, systemd) ends the server as Ctrl-C does: no new connections, the generations in
    # flight finish (or end with an error at engine.close's deadline), their answers are written, exit status 0.
    # The handler runs on this thread, inside serve_forever, and shutdown() waits for that to return: a thread.
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=httpd.shutdown).start())
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
        httpd.drain(timeout=5)


def export(path, out_dir, data_dir=None):
    model, tokenizer, ckpt_path, chat = load(path, data_dir)
    arch = export_hf(model, tokenizer, out_dir, chat)
    print(f"wrote {out_dir}: {arch} from {ckpt_path} ({model.num_params():,} parameters), tokenizer.json, "
          f"chat template")


def main(argv=None):
    parser = data.config_parser(ServeConfig, __doc__, CHOICES)
    parser.add_argument("ckpt", nargs="?", help="checkpoint file or run folder to serve (out/sft)")
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "DIR"), help="write CKPT as a Hugging Face folder DIR")
    args = parser.parse_args(argv)
    cfg = train.config_from_args(ServeConfig, args)
    try:
        if args.export:
            export(*args.export, cfg.data_dir)
        elif args.ckpt:
            serve(args.ckpt, cfg)
        else:
            parser.error("give a checkpoint to serve (python serve.py out/sft), or --export CKPT DIR")
    except (train.TrainError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 2))
    except KeyboardInterrupt:  # while loading, or exporting (the folder is written whole at the end, or not)
        train.interrupted("serve.py", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
