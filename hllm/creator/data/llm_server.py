"""A small OpenAI-compatible chat server over a local model: `hllm creator serve-llm`.

Enough of the protocol for the `openai` client and the teacher pipeline (`POST /v1/chat/completions`
without streaming, `GET /v1/models`, `GET /health`), so the same pipeline that runs against vLLM, TGI
or llama.cpp runs offline against a `transformers` model. Requests that arrive together are
generated as one batch (`Batcher`). With an API key set, other keys get the 401 the client expects.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from hllm.creator.data.llm import ChatModel, Conversation
from hllm.serving.batcher import Batcher

Job = tuple[Conversation, float | None, int | None]  # messages, temperature, max_tokens


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status)


def create_llm_app(chat: ChatModel, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="hllm chat", version="1")
    # Jobs sharing temperature and length run as one batch; the others run in their own pass.
    batcher: Batcher[Job, str] = Batcher(lambda jobs: _generate(chat, jobs), max_batch=32)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given, api_key):
                return _error(401, "invalid API key", "invalid_request_error")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": chat.model, "batches": batcher.batches, "requests": batcher.jobs}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": chat.model, "object": "model", "owned_by": "hllm"}]}

    @app.post("/v1/chat/completions")
    def complete(request: ChatRequest):
        if request.model != chat.model:
            return _error(
                404, f"model {request.model!r} not found; this server has {chat.model!r}", "not_found"
            )
        if request.stream:
            return _error(400, "streaming is not supported", "invalid_request_error")
        conversation = [message.model_dump() for message in request.messages]
        text = batcher((conversation, request.temperature, request.max_tokens))
        return {
            "id": f"chatcmpl-{secrets.token_hex(8)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }

    return app


def _generate(chat: ChatModel, jobs: list[Job]) -> list[str]:
    answers = [""] * len(jobs)
    settings = {(temperature, length) for _, temperature, length in jobs}
    for temperature, length in settings:
        group = [i for i, job in enumerate(jobs) if job[1:] == (temperature, length)]
        texts = chat.chat([jobs[i][0] for i in group], temperature=temperature, max_new_tokens=length)
        for i, text in zip(group, texts, strict=True):
            answers[i] = text
    return answers


def run_llm_server(chat: ChatModel, *, host: str, port: int, api_key: str | None = None) -> None:
    """Serve `chat` until interrupted."""
    uvicorn.run(create_llm_app(chat, api_key=api_key), host=host, port=port, log_level="warning")
