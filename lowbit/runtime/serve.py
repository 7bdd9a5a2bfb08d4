"""``lowbit serve ARTIFACT``: an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions`` with
server-sent events, ``/v1/models``, ``/health``) over one engine and its continuous batcher (``runtime.batcher``).

Built on Starlette/FastAPI and uvicorn (``pip install 'lowbit[serve]'``); no HTTP is parsed here. The event loop
never runs the model: requests are tokenized, validated and queued, and the batcher's thread hands each request's
text back through ``loop.call_soon_threadsafe``. Bad requests get HTTP 4xx with OpenAI's error body. A client that
goes away mid-stream frees its row at the next step; shutdown finishes the running requests first.
"""


import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.runtime.batcher import DONE, MAX_LOGPROBS, Batcher
from lowbit.runtime.chat import check_messages
from lowbit.runtime.sampling import GenerationSettings

MAX_BODY = 4 << 20            # bytes of request JSON
MAX_CHOICES = 16


@dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 16               # sequences decoded together
    max_waiting: int = 256            # sequences queued beyond the batch before requests get HTTP 503
    request_timeout: float = 600.0    # seconds a request may run (then HTTP 504, or an error event mid-stream)
    default_max_tokens: int = 256     # when a request names none (within the context)
    max_prefill_tokens: int = 256     # prompt tokens prefilled per decode step while sequences decode


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def settings_from(body: dict, limits: ServeLimits, max_positions: int, prompt_tokens: int) -> GenerationSettings:
    """OpenAI's request fields (and vLLM's top_k, min_p, repetition_penalty, ignore_eos) as GenerationSettings.
    OpenAI's temperature 0 is greedy decoding; its default, 1, samples."""
    known = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "stop", "seed", "ignore_eos"}
    given = {k: body[k] for k in known if body.get(k) is not None}
    ignore_eos = given.pop("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be true or false", "ignore_eos")
    max_tokens = given.pop("max_completion_tokens", given.pop("max_tokens", None))
    if max_tokens is None:
        max_tokens = max(1, min(limits.default_max_tokens, max_positions - prompt_tokens))
    temperature = given.pop("temperature", 1.0)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be in 0..2, got {temperature!r}", "temperature")
    stop = given.pop("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    try:
        return GenerationSettings(max_new_tokens=max_tokens, do_sample=bool(temperature), temperature=temperature,
                                  stop=tuple(stop), seed=given.pop("seed", secrets.randbits(63)),
                                  stop_at_eos=not ignore_eos, **given)
    except LowbitError as e:
        raise BadRequest(str(e), str(e).split(" ", 1)[0]) from None


class Server:
    """The app's state: the engine, its batcher, the model's name and the limits."""

    def __init__(self, engine, name: str, limits: ServeLimits = ServeLimits()):
        if engine._text is None:
            raise LowbitError(f"artifact '{engine.path}' has no tokenizer; lowbit serve takes text")
        self.engine, self.name, self.limits = engine, name, limits
        self.batcher = Batcher(engine, limits.max_batch, limits.max_prefill_tokens)
        self.created = int(time.time())

    # ---- requests -> sequences ---------------------------------------------------------------
    def _prompts(self, body: dict, chat: bool) -> list[list[int]]:
        tok = self.engine._text
        if chat:
            try:
                text = self.engine.chat_template().render(check_messages(body.get("messages")))
            except LowbitError as e:
                raise BadRequest(str(e), "messages") from None
            return tok.encode([text], add_special_tokens=False)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return [prompt]                                # one prompt as token ids
        else:
            raise BadRequest("prompt must be a string, a list of strings or a list of token ids", "prompt")
        return tok.encode(prompts)

    def submit(self, body: dict, chat: bool, sink_for) -> list:
        """Validate ``body`` and queue its sequences (prompts x n); returns their Requests (index order)."""
        if body.get("model") not in (None, self.name):
            raise BadRequest(f"model '{body.get('model')}' is not served here; this server serves '{self.name}'",
                             "model", 404)
        for field in ("tools", "functions", "suffix", "logit_bias"):
            if body.get(field) not in (None, False, 0, {}, []):
                raise BadRequest(f"{field} is not supported by lowbit serve", field)
        logprobs = requested_logprobs(body, chat)
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                    or not isinstance(options.get("include_usage", False), bool)):
            raise BadRequest("stream_options takes only include_usage (true or false)", "stream_options")
        if options is not None and not body.get("stream"):
            raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
        if body.get("echo"):
            raise BadRequest("echo is not supported by lowbit serve", "echo")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
            raise BadRequest(f"n must be an integer in 1..{MAX_CHOICES}", "n")
        rows = self._prompts(body, chat)
        vocab = self.engine._text.vocab_size
        for r in rows:
            if not r:
                raise BadRequest("empty prompt", "prompt")
            if not all(0 <= t < vocab for t in r):
                raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}", "prompt")
            if len(r) >= self.engine.max_positions:
                raise BadRequest(f"the prompt has {len(r)} tokens; this model's context is "
                                 f"{self.engine.max_positions}", "messages" if chat else "prompt")
        settings = [settings_from(body, self.limits, self.engine.max_positions, len(r)) for r in rows]
        if len(self.batcher.waiting) + len(rows) * n > self.limits.max_waiting:
            raise BadRequest("the server is at its queue limit; retry later", None, 503)
        reqs = []
        try:
            for r, s in zip(rows, settings):
                for i in range(n):
                    reqs.append(self.batcher.submit(r, s, index=i, sink=sink_for(len(reqs)), logprobs=logprobs))
        except LowbitError as e:
            for q in reqs:
                q.cancel()
            raise BadRequest(str(e)) from None
        return reqs


def requested_logprobs(body: dict, chat: bool) -> Optional[int]:
    """Alternatives per token the request wants log-probabilities of (None: no logprobs): chat's ``logprobs``
    (true / false) and ``top_logprobs``, completions' ``logprobs`` (a count)."""
    if chat:
        on, top = body.get("logprobs"), body.get("top_logprobs")
        if on not in (None, True, False):
            raise BadRequest("logprobs must be true or false", "logprobs")
        if top is not None and not on:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        if top is not None and not (type(top) is int and 0 <= top <= MAX_LOGPROBS):
            raise BadRequest(f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}", "top_logprobs")
        return (top or 0) if on else None
    count = body.get("logprobs")
    if count is not None and not (type(count) is int and 0 <= count <= MAX_LOGPROBS):
        raise BadRequest(f"logprobs must be an integer in 0..{MAX_LOGPROBS}", "logprobs")
    return count


class Logprobs:
    """One choice's token log-probabilities in OpenAI's shapes: ``chat()`` ({"content": [{"token", "logprob",
    "bytes", "top_logprobs"}]}) or ``completion()`` (tokens, token_logprobs, top_logprobs, text_offset); each
    call takes the entries added since the last, so a stream sends each token's once."""

    def __init__(self, token_text):
        self.text, self.pending, self.offset = token_text, [], 0

    def add(self, entry) -> None:
        if entry is not None:
            self.pending.append(entry)

    def _take(self) -> list:
        out, self.pending = self.pending, []
        return out

    def chat(self) -> dict:
        def one(token, lp):
            text = self.text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]}
                            for t, lp, top in self._take()]}

    def completion(self) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in self._take():
            text = self.text(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.text(i): v for i, v in top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def usage(reqs, n: int) -> dict:
    prompt = sum(r.prompt_tokens for r in reqs[::n])
    completion = sum(r.completion_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(server: Server):
    """The FastAPI app over ``server``. (No ``from __future__ import annotations`` in this module: FastAPI reads
    the handlers' annotations, here ``Request`` imported below, as objects.)"""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        await asyncio.to_thread(server.batcher.close)       # the running requests finish first

    app = FastAPI(title="lowbit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def fail(e: BadRequest) -> JSONResponse:
        kind = {404: "not_found_error", 503: "server_overloaded", 504: "timeout"}.get(e.status,
                                                                                       "invalid_request_error")
        return JSONResponse(error_body(e.message, kind, e.param), status_code=e.status)

    async def read_body(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", None, 413)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", None, 413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        b = server.batcher
        return {"status": "ok", "running": len(b.running), "prefilling": len(b.prefilling), "waiting": len(b.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "lowbit"}]}

    async def complete(request: Request, chat: bool):
        try:
            body = await read_body(request)
            loop = asyncio.get_running_loop()
            queues: list[asyncio.Queue] = []

            def sink_for(i):
                queues.append(asyncio.Queue())

                def sink(item, q=queues[i]):
                    try:
                        loop.call_soon_threadsafe(q.put_nowait, item)
                    except RuntimeError:          # the loop has closed: nobody is listening
                        pass
                return sink

            reqs = server.submit(body, chat, sink_for)
        except BadRequest as e:
            return fail(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.name}
        if body.get("stream"):
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(reqs, queues, head, chat, body.get("n", 1) if with_usage else 0),
                                     media_type="text/event-stream")
        logprobs = [Logprobs(token_text) for _ in reqs]
        try:
            texts = await asyncio.wait_for(asyncio.gather(*(collect(q, lp) for q, lp in zip(queues, logprobs))),
                                           server.limits.request_timeout)
        except asyncio.TimeoutError:
            return fail(BadRequest(f"the request ran past {server.limits.request_timeout:g} s", None, 504))
        except LowbitError as e:
            return JSONResponse(error_body(str(e), "server_error"), status_code=500)
        finally:
            for r in reqs:
                r.cancel()
        wants = reqs[0].logprobs is not None
        choices = [{"index": i, "finish_reason": r.finish_reason,
                    "logprobs": (lp.chat() if chat else lp.completion()) if wants else None,
                    **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                   for i, (r, t, lp) in enumerate(zip(reqs, texts, logprobs))]
        return {**head, "choices": choices, "usage": usage(reqs, body.get("n", 1))}

    def token_text(token: int) -> str:
        return server.engine._text.decode([token])

    async def collect(q: asyncio.Queue, logprobs: Logprobs) -> str:
        text = ""
        while True:
            item = await q.get()
            if item is DONE:
                return text
            if isinstance(item, BaseException):
                raise item
            text += item[0]
            logprobs.add(item[2])

    async def stream(reqs, queues, head, chat: bool, usage_n: int):
        """Server-sent chunks; with ``usage_n`` (the request's n, when it asked for stream_options.include_usage)
        every chunk carries ``usage`` null and a last one, without choices, the usage."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                **({"usage": None} if usage_n else {})}
        wants = reqs[0].logprobs is not None
        logprobs = [Logprobs(token_text) for _ in reqs]
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(i, q):
            while True:
                item = await q.get()
                await merged.put((i, item))
                if item is DONE or isinstance(item, BaseException):
                    return

        tasks = [asyncio.create_task(forward(i, q)) for i, q in enumerate(queues)]
        deadline = time.monotonic() + server.limits.request_timeout
        try:
            if chat:
                for i in range(len(reqs)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]})
            open_ = len(reqs)
            while open_:
                try:
                    i, item = await asyncio.wait_for(merged.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield sse(error_body(f"the request ran past {server.limits.request_timeout:g} s", "timeout"))
                    break
                if item is DONE:
                    open_ -= 1
                    continue
                if isinstance(item, BaseException):
                    yield sse(error_body(str(item), "server_error"))
                    break
                text, finish, lp = item
                logprobs[i].add(lp)
                if not text and finish is None:
                    continue
                choice = {"index": i, "finish_reason": finish,
                          "logprobs": (logprobs[i].chat() if chat else logprobs[i].completion()) if wants else None}
                choice.update({"delta": {"content": text} if text else {}} if chat else {"text": text})
                yield sse({**head, "choices": [choice]})
            else:                                   # every choice finished (no timeout, no error)
                if usage_n:
                    yield sse({**head, "choices": [], "usage": usage(reqs, usage_n)})
            yield "data: [DONE]\n\n"
        finally:
            # Reached on completion and when the client goes away (Starlette cancels this generator): the rows
            # of unfinished sequences are freed at the batcher's next step.
            for r in reqs:
                r.cancel()
            for t in tasks:
                t.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def serve(artifact, host: str = "127.0.0.1", port: int = 8000, name: Optional[str] = None,
          limits: ServeLimits = ServeLimits(), log_level: str = "info", **load) -> None:
    """Load ``artifact`` and serve it until interrupted (SIGINT / SIGTERM: running requests finish first)."""
    try:
        import uvicorn
    except ImportError:
        raise LowbitError("lowbit serve needs fastapi and uvicorn: pip install 'lowbit[serve]'") from None
    import lowbit

    engine = lowbit.load(artifact, **load)
    server = Server(engine, name or engine.path.name, limits)
    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
