"""The HTTP side: an ASGI app (FastAPI) with OpenAI's routes.

- `POST /v1/chat/completions`: JSON answer, or server-sent events with `stream: true`;
- `GET /v1/models`, `GET /health`;
- `GET /`: a browser chat page (`static/index.html`: streamed answers, images, multi-turn, stop).
Every request is checked (`protocol`, `media`, `prompt_check`) before it is queued; any failure is a
4xx with OpenAI's error body, and nothing a request sends can stop the server.
"""
import asyncio
import contextlib
import json
import os
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constants import default_context
from .errors import APIError, bad_request
from .jobs import Job
from .media import MediaPolicy, resolve
from .prompt_check import prepare
from .protocol import parse_chat_request
from .text_stream import AnswerText


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(model, engine, served_model: str, media_policy: Optional[MediaPolicy] = None,
               timeout: Optional[float] = None, cache_len: Optional[int] = None,
               max_body_bytes: int = 100 * 1024 * 1024) -> FastAPI:
    """`engine` runs the jobs (`SerialEngine` or `BatchEngine`); `cache_len` bounds prompt + max_tokens
    (default: the engine's, or the model's max_length plus chat's default max_new_tokens);
    `max_body_bytes` bounds a request body (base64 images included)."""
    policy = media_policy or MediaPolicy()
    created = int(time.time())
    eos_ids = model.eos_token_ids(model.tokenizer)
    context = cache_len or getattr(engine, "cache_len", None) or default_context(model.config)
    state = {"http": None}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import httpx

        async with httpx.AsyncClient() as client:  # fetches http(s) images
            state["http"] = client
            yield

    app = FastAPI(title="mindxcomposer", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else None
        return _error(APIError(str(exc.detail), exc.status_code, "invalid_request_error", None, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error(bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        return _error(APIError(f"internal error: {type(exc).__name__}", 500, "server_error"))

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(os.path.join(os.path.dirname(__file__), "static", "index.html"),
                            media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": created,
                                            "owned_by": "mindxcomposer"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != served_model:
            return _error(APIError(f"The model {model_id!r} does not exist", 404, "invalid_request_error", "model",
                                   "model_not_found"))
        return {"id": served_model, "object": "model", "created": created, "owned_by": "mindxcomposer"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        loop = asyncio.get_running_loop()
        try:
            raw = await _read_body(request, max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
                raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json")
            req = parse_chat_request(body, served_model, max_beams=engine.max_beams)
            media = [await resolve(p.url, p.where, policy, state["http"]) for p in req.images]
            pixels, n_prompt = await run_in_threadpool(prepare, req, media, model.tokenizer, model.config, context)
            news = asyncio.Event()
            job = Job(req, pixels, n_prompt, AnswerText(model.tokenizer, eos_ids, req.stop), timeout,
                      notify=lambda: loop.call_soon_threadsafe(news.set))
            engine.submit(job)
        except APIError as e:
            return _error(e)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            return StreamingResponse(_events(job, news, rid, now, served_model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not job.done.is_set():
                try:
                    await asyncio.wait_for(news.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return _error(APIError("client disconnected", 499))
                news.clear()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.error is not None:
            return _error(job.error)
        a = job.answer
        return {"id": rid, "object": "chat.completion", "created": now, "model": served_model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": a.finish_reason, "logprobs": None}],
                "usage": _usage(job)}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes before it is all in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is larger than {limit} bytes", 413, "invalid_request_error", None,
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"the request body is larger than {limit} bytes", 413, "invalid_request_error", None,
                           "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(job: Job) -> dict:
    c = job.answer.completion_tokens
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": c, "total_tokens": job.prompt_tokens + c}


def _chunk(rid, created, model, delta, finish_reason=None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _events(job: Job, news: asyncio.Event, rid: str, created: int, model: str):
    """OpenAI's chunk sequence: the role, content deltas, the finish reason, usage if asked, [DONE].
    Leaving early (the client went away) cancels the job, which frees its place in the batch."""
    try:
        yield _chunk(rid, created, model, {"role": "assistant", "content": ""})
        while True:
            await news.wait()
            news.clear()
            done = job.done.is_set()  # before `take`: all text is out before a job is done
            text = job.answer.take()
            if text:
                yield _chunk(rid, created, model, {"content": text})
            if done:
                break
        if job.error is not None:
            yield f"data: {json.dumps(job.error.body())}\n\n"
        else:
            yield _chunk(rid, created, model, {}, job.answer.finish_reason)
            if job.request.include_usage:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(job)}
                yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no effect on a finished job
