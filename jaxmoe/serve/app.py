"""The HTTP side: OpenAI routes over the batcher, bearer-token auth, error objects.

Handlers validate, tokenize and submit; the batcher thread does the rest and hands
events back through an asyncio queue bound to the handler's loop. A handler whose
client goes away (a closed stream, a dropped connection while waiting) cancels its
request, and the batcher frees the row before its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxmoe.serve.batcher import Batcher, Closed, QueueFull
from jaxmoe.serve.chat import ChatTemplate
from jaxmoe.serve.metrics import ServerMetrics
from jaxmoe.serve.request import SLO, Chunk, Done, Failed, Request
from jaxmoe.serve.responses import ResponseBodies
from jaxmoe.serve.rows.sampling import RequestSampling
from jaxmoe.serve.schemas import ChatRequest, CompletionRequest, ServeError, error_body, error_response
from jaxmoe.serve.text import TextTracker

CHAT_DEFAULT_MAX_TOKENS = 256  # chat requests without max_tokens: this, or what the context has left
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclasses.dataclass
class ServerState:
    batcher: Batcher
    metrics: ServerMetrics
    model_id: str
    context: int  # max_position_embeddings
    vocab_size: int
    tokenizer: object | None
    eos_ids: frozenset
    chat_template: ChatTemplate
    slo: SLO
    api_key: str | None = None
    skip_below: float = 0.0  # > 0: the engine's approximate decode (--skip-below); every response says so
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxmoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ServeError)
    async def serve_error(_, e: ServeError):
        state.metrics.rejected(e.status)
        return error_response(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            param = _field(first["loc"])
            message = f"{param}: {first['msg']}" + (f" ({len(errors) - 1} more)" if len(errors) > 1 else "")
        state.metrics.rejected(400)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        state.metrics.rejected(e.status_code)
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message)

    @app.middleware("http")
    async def auth(request: HTTPRequest, call_next):
        if state.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), state.api_key.encode()):
                state.metrics.rejected(401)
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                      headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health():
        b = state.batcher
        return {"status": "ok", "running": b.running, "queued": b.queue_depth, "steps": b.steps}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = _completion_prompt(state, body.prompt)
        return await _serve(state, body, prompt, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = state.chat_template.render(messages)
        except Exception as e:  # a template's own raise_exception or a Jinja error
            raise ServeError(400, f"messages: the chat template refused them: {e}", "messages") from None
        return await _serve(state, body, _encode(state, text, "messages"), http, chat=True)

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "jaxmoe"}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_id:
        raise ServeError(404, f"model '{model}' does not exist; this server serves '{state.model_id}'", "model")


def _encode(state: ServerState, text: str, param: str) -> list[int]:
    if state.tokenizer is None:
        raise ServeError(400, f"{param}: this model has no tokenizer; send the prompt as token ids", param)
    return state.tokenizer.encode(text).ids


def _completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        return _encode(state, prompt, "prompt")
    if prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ServeError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", "prompt")
        return _completion_prompt(state, prompt[0])
    bad = [t for t in prompt if not 0 <= t < state.vocab_size]
    if bad:
        raise ServeError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                         "prompt")  # fmt: skip
    return list(prompt)


def _make_request(state: ServerState, body, prompt: list[int], chat: bool, emit) -> Request:
    _check_model(state, body.model)
    refused = body.unsupported()
    if refused:
        raise ServeError(400, refused[1], refused[0])
    if not prompt:
        raise ServeError(400, "prompt: empty (at least one token is needed)", "messages" if chat else "prompt")
    room = state.context - len(prompt)
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = min(CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS, max(room, 1))
    if len(prompt) + max_tokens > state.context:
        raise ServeError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {len(prompt) + max_tokens}"
                         f" exceeds the model's context of {state.context} tokens", "max_tokens")  # fmt: skip
    slo = state.slo
    if body.slo is not None:
        slo = SLO(body.slo.ttft_ms / 1e3 if body.slo.ttft_ms else slo.ttft_s,
                  body.slo.tpot_ms / 1e3 if body.slo.tpot_ms else slo.tpot_s, body.slo.name)  # fmt: skip
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    sampling = RequestSampling(temperature=float(body.temperature), top_p=float(body.top_p), top_k=body.top_k,
                               seed=seed & 0xFFFFFFFF)  # fmt: skip
    return Request(prompt, max_tokens, sampling, slo, TextTracker(state.tokenizer, body.stop_list()), emit,
                   state.eos_ids)  # fmt: skip


async def _serve(state: ServerState, body, prompt: list[int], http: HTTPRequest, chat: bool):
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event) -> None:  # from the batcher thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is listening
            pass

    request = _make_request(state, body, prompt, chat, emit)
    try:
        state.batcher.submit(request)
    except QueueFull as e:
        raise ServeError(429, f"{e} (the queue holds {state.batcher.max_queue} requests)",
                         headers={"Retry-After": str(e.retry_after_s)}) from None
    except Closed as e:
        raise ServeError(503, str(e)) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    bodies = ResponseBodies(rid, state.model_id, chat, int(time.time()), state.skip_below > 0)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, request, events, bodies, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    text, token_ids = [], []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    state.batcher.cancel(request)
                    return Response(status_code=499)
                continue
            if isinstance(event, Chunk):
                text.append(event.text)
                token_ids.extend(event.token_ids)
            elif isinstance(event, Failed):
                return error_response(event.status, event.message, None, "server_error")
            elif isinstance(event, Done):
                text.append(event.text)
                return JSONResponse(bodies.whole("".join(text), token_ids, event))
    except asyncio.CancelledError:
        state.batcher.cancel(request)
        raise


async def _stream(state: ServerState, request: Request, events: asyncio.Queue, bodies: ResponseBodies,
                  include_usage: bool):  # fmt: skip
    done = False
    try:
        if bodies.chat:
            yield _sse(bodies.chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if isinstance(event, Chunk):
                if event.text or not bodies.chat:
                    yield _sse(bodies.chunk(event.text, None, event.token_ids))
            elif isinstance(event, Failed):
                yield _sse(error_body(event.message, None, "server_error"))
                break
            elif isinstance(event, Done):
                yield _sse(bodies.chunk(event.text, event.finish_reason))
                if include_usage:
                    yield _sse(bodies.usage_chunk(event))
                break
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away mid-stream (or the server is stopping)
            state.batcher.cancel(request)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
