"""HTTP API over an artifact (FastAPI): recommend, cold-start items, health, metrics, explorer page.

`create_app(artifact)` builds the app; `run_server` runs it with uvicorn. Bad input is a 4xx with a
`detail` saying what to fix; cold-start items are persisted in the artifact's `added.npz`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from hllm.errors import UserError
from hllm.files import atomic_write
from hllm.serving.auth import check_host, read_write_key, write_guard
from hllm.serving.batcher import Batcher
from hllm.serving.explorer import explorer_router
from hllm.serving.export import Artifact, encode_histories, encode_texts, render_text
from hllm.serving.index import ItemIndex, open_index, settings_of

Value = str | int | float
MAX_LIST = 10_000  # the body limit (serve.max_body_bytes) bounds requests too; this names the field


class RecommendRequest(BaseModel):
    history: list[str | int] | None = Field(
        None, min_length=1, max_length=MAX_LIST, description="Item ids of the user's history, oldest first."
    )
    history_text: list[dict[str, Value]] | None = Field(
        None, min_length=1, max_length=MAX_LIST, description="Unknown items as their fields, oldest first."
    )
    k: int = Field(10, ge=1, description="How many items (at most the catalogue size and serve.max_k).")
    exclude_history: bool = Field(True, description="Never recommend an item of the history.")


class NewItem(BaseModel):
    id: str = Field(min_length=1, max_length=1000, description="A new item id.")
    fields: dict[str, Value] = Field(min_length=1, description="Text fields, e.g. title, description.")


class Catalogue:
    """The artifact's items plus cold-start items added while serving, persisted in `added.npz`."""

    def __init__(self, artifact: Artifact, index: ItemIndex) -> None:
        self.artifact = artifact
        self.index = index
        self.ids, self.titles, self.texts = (
            list(artifact.item_ids),
            list(artifact.titles),
            list(artifact.texts),
        )
        self.fields: dict[int, dict] = {}
        self._added: list[np.ndarray] = []  # (D,) each, rows len(embeddings).. in order
        self._lookup = {raw: row for row, raw in enumerate(self.ids) if row}
        self._write_lock = threading.Lock()
        self._path = artifact.folder / "added.npz"
        self._origin = artifact.manifest["files"]["embeddings.npy"]["sha256"]
        for item, vector in self._read_added():
            self._append(item, vector)

    @property
    def size(self) -> int:
        return len(self.ids) - 1

    def row(self, raw_id: str) -> int | None:
        return self._lookup.get(raw_id)

    def vectors(self, rows: list[int]) -> np.ndarray:
        """Embeddings (L, D) of catalogue rows, cold-start rows included."""
        base = len(self.artifact.embeddings)
        return np.stack([self.artifact.embeddings[r] if r < base else self._added[r - base] for r in rows])

    def add(self, raw_id: str, fields: dict[str, Value], text: str, vector: np.ndarray) -> None:
        """Persist first (a failed write changes nothing), then make the item searchable."""
        with self._write_lock:
            if raw_id in self._lookup or raw_id == self.ids[0]:  # ids[0] is the padding row's
                raise HTTPException(409, f"item {raw_id!r} already exists; use a new id")
            title = str(next((fields[k] for k in ("title", "movie_title", "name") if k in fields), raw_id))
            item = {"id": raw_id, "title": title, "text": text, "fields": fields}
            items = [self.describe(row) for row in range(len(self.artifact.embeddings), len(self.ids))]
            self._write_added([*items, item], np.stack([*self._added, vector]))
            self._append(item, vector)

    def _append(self, item: dict, vector: np.ndarray) -> None:
        # Lists before the lookup before the index: whatever a reader can reach is already complete.
        self._added.append(vector.astype(np.float32))
        self.ids.append(item["id"])
        self.titles.append(item["title"])
        self.texts.append(item["text"])
        self.fields[len(self.ids) - 1] = item["fields"]
        self._lookup[item["id"]] = len(self.ids) - 1
        self.index.add(vector[None])

    def describe(self, row: int) -> dict:
        return {
            "id": self.ids[row],
            "title": self.titles[row],
            "text": self.texts[row],
            "fields": self.fields.get(row),
        }

    def _write_added(self, items: list[dict], vectors: np.ndarray) -> None:
        meta = np.array(json.dumps({"artifact": self._origin, "items": items}))

        def write(tmp):
            with open(tmp, "wb") as f:  # np.savez adds ".npz" to a name, not to an open file
                np.savez(f, embeddings=vectors, meta=meta)

        atomic_write(self._path, write)

    def _read_added(self) -> list[tuple[dict, np.ndarray]]:
        if not self._path.is_file():
            return []
        try:
            with np.load(self._path) as saved:
                meta, vectors = json.loads(str(saved["meta"])), saved["embeddings"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(
                f"damaged cold-start items ({err}); move the file away", where=str(self._path)
            ) from None
        if meta.get("artifact") != self._origin or vectors.shape != (
            len(meta["items"]),
            self.artifact.embeddings.shape[1],
        ):
            raise UserError("cold-start items of another artifact; move the file away", where=str(self._path))
        return list(zip(meta["items"], vectors))


class Metrics:
    """Request counts per (route, status) and latency quantiles over each route's recent requests."""

    WINDOW = 10_000
    QUANTILES = (0.5, 0.95, 0.99)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._seconds: dict[str, deque[float]] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[route, status] += 1
            self._seconds.setdefault(route, deque(maxlen=self.WINDOW)).append(seconds)

    def prometheus(self, gauges: dict[str, float]) -> str:
        lines = ["# TYPE hllm_requests_total counter"]
        with self._lock:
            counts, seconds = dict(self._counts), {route: np.array(d) for route, d in self._seconds.items()}
        for (route, status), count in sorted(counts.items()):
            lines.append(f'hllm_requests_total{{route="{route}",status="{status}"}} {count}')
        lines.append("# TYPE hllm_request_seconds summary")
        for route, values in sorted(seconds.items()):
            for q in self.QUANTILES:
                lines.append(
                    f'hllm_request_seconds{{route="{route}",quantile="{q}"}} {np.quantile(values, q):.6f}'
                )
            lines.append(f'hllm_request_seconds_count{{route="{route}"}} {len(values)}')
        lines += [f"# TYPE {name} gauge\n{name} {value}" for name, value in gauges.items()]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Times every HTTP request to its last byte; labels it by route template, not raw path."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.record(route, status[0], time.perf_counter() - start)


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before the app parses any of it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # a chunked body declares no length: count it as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        body, replayed = b"".join(chunks), [False]

        async def replay():
            if replayed[0]:
                return await receive()
            replayed[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        detail = f"request body over {self.max_bytes} bytes (serve.max_body_bytes); send less"
        await JSONResponse({"detail": detail}, 413)(scope, receive, send)


def create_app(artifact: Artifact) -> FastAPI:
    """The HTTP API over `artifact`, its index built (or read) as `artifact.config.serve` says."""
    serve = artifact.config.serve
    catalogue = Catalogue(artifact, ItemIndex(open_index(artifact, settings_of(serve))))
    metrics = Metrics()
    app = FastAPI(title="hllm", description=__doc__, version=artifact.manifest["hllm"])
    app.add_middleware(BodyLimit, max_bytes=serve.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(UserError, lambda _, err: JSONResponse({"detail": str(err)}, 422))
    max_history = serve.history_window or artifact.config.data.max_history
    if serve.precision == "int8":
        _int8_user_llm(artifact.model)
    artifact.model.user_encoder.last_position_only &= serve.last_position_only
    write_key = read_write_key(serve.write_key_env)
    needs_key = [Depends(write_guard(write_key))]

    def answer(jobs: list[tuple[np.ndarray, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One User LLM pass and one index search for every waiting (history vectors (L, D), k, items
        to filter out): k + filtered rows each, best first."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=serve.precision == "bf16"):
            queries = encode_histories(artifact, [vectors for vectors, _, _ in jobs])  # (B, D)
        depth = max(k + filtered for _, k, filtered in jobs)
        scores, found = catalogue.index.search(queries, depth, kept=max(k for _, k, _ in jobs))  # (B, depth)
        return [(scores[i, : k + f], found[i, : k + f]) for i, (_, k, f) in enumerate(jobs)]

    batcher = Batcher(answer, max_batch=serve.max_batch)

    @app.post("/recommend")
    async def recommend(request: RecommendRequest) -> JSONResponse:
        """Top-k items for a history of known ids (`history`) or of unknown items' fields (`history_text`).

        Unknown ids are skipped and listed in `unknown` (404 when none is known); a history longer than
        the model reads is cut to its most recent items (`truncated` counts the dropped ones).
        """
        # Async: a request of known ids costs the event loop a dict lookup and a gather, and then
        # awaits the micro-batch without holding a worker thread; text encoding goes to a thread.
        if (request.history is None) == (request.history_text is None):
            raise HTTPException(422, "give exactly one of history (item ids) or history_text (item fields)")
        if request.k > min(catalogue.size, serve.max_k):
            limits = f"the catalogue size ({catalogue.size}) and serve.max_k ({serve.max_k})"
            raise HTTPException(422, f"k={request.k} is above {limits}; ask for fewer")
        rows, unknown, used = _resolve(catalogue, request.history or [])
        if request.history is not None:
            vectors = catalogue.vectors(rows[-max_history:])
        else:
            used = len(request.history_text)
            texts = [_item_text(artifact, fields) for fields in request.history_text[-max_history:]]
            vectors = await run_in_threadpool(encode_texts, artifact, texts)
        excluded = set(rows) if request.exclude_history else set()
        scores, found = await asyncio.wrap_future(batcher.submit((vectors, request.k, len(excluded))))
        items = [
            {"id": catalogue.ids[r], "title": catalogue.titles[r], "score": float(s)}
            for s, r in zip(scores, found)
            if r > 0 and r not in excluded
        ][: request.k]
        # A ready response: FastAPI would otherwise walk the answer through jsonable_encoder first.
        return JSONResponse({"items": items, "unknown": unknown, "truncated": max(0, used - max_history)})

    @app.post("/items", status_code=201, dependencies=needs_key)
    def add_item(item: NewItem) -> dict:
        """Cold start: encode a new item's text with the Item LLM and make it recommendable at once."""
        text = _item_text(artifact, item.fields)
        catalogue.add(item.id, item.fields, text, encode_texts(artifact, [text])[0])
        return {"id": item.id, "items": catalogue.size}

    @app.get("/items/{item_id:path}")  # ids may hold "/" (sent as %2F)
    def get_item(item_id: str) -> dict:
        """An item's title, rendered text and (for cold-start items) the fields it was added with."""
        if (row := catalogue.row(item_id)) is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return {**catalogue.describe(row), "added": row >= len(artifact.embeddings)}

    @app.get("/health")
    def health() -> dict:
        model = artifact.manifest["model"]
        return {
            "status": "ok",
            "items": catalogue.size,
            "index": serve.index,
            "write_key": write_key is not None,
            "max_k": serve.max_k,
            "text_fields": artifact.text_fields,
            "creator_titles": artifact.creator is not None,
            "model": {k: model[k] for k in ("item_backbone", "user_backbone", "dim")},
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        """Request counts and latency quantiles per route, in Prometheus text format."""
        gauges = {"hllm_catalogue_items": catalogue.size, "hllm_model_passes": batcher.batches}
        return metrics.prometheus(gauges | {"hllm_model_pass_requests": batcher.jobs})

    app.include_router(explorer_router(artifact, catalogue))
    return app


def _int8_user_llm(model: torch.nn.Module) -> None:
    """Dynamic int8 weights for the User LLM's linear layers, in place (activations are quantised per
    pass); the Item LLM, which encodes cold-start items, stays fp32."""
    linear = {torch.nn.Linear}
    model.user_encoder = torch.ao.quantization.quantize_dynamic(model.user_encoder, linear, dtype=torch.qint8)


def _resolve(catalogue: Catalogue, history: list[str | int]) -> tuple[list[int], list[str], int]:
    """Catalogue rows of the known ids, the unknown ids, and how many were known; 404 if none was."""
    rows, unknown = [], []
    for raw in map(str, history):
        row = catalogue.row(raw)
        (unknown if row is None else rows).append(raw if row is None else row)
    if history and not rows:
        hint = "add them with POST /items or send history_text"
        raise HTTPException(404, f"no item of the history is known: {unknown[:20]}; {hint}")
    return rows, unknown, len(rows)


def _item_text(artifact: Artifact, fields: dict[str, Value]) -> str:
    known = artifact.text_fields
    if unknown := [name for name in fields if known and name not in known]:
        raise HTTPException(422, f"unknown field(s) {unknown}; this model reads {known}")
    if not any(str(value).strip() for value in fields.values()):
        raise HTTPException(422, "every field is empty; give the item some text")
    return render_text(artifact, {name: str(value) for name, value in fields.items()})


async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    """One line per problem, `where: what`; malformed JSON is 400, a well-formed wrong request 422."""
    problems = [
        f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}"
        if e["type"] == "json_invalid"
        else f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}"
        for e in err.errors()
    ]
    status = 400 if any(e["type"] == "json_invalid" for e in err.errors()) else 422
    return JSONResponse({"detail": "; ".join(problems)}, status)


def run_server(artifact: Artifact, *, host: str, port: int) -> None:
    """Serve `artifact` until interrupted; beyond loopback only with a write key."""
    check_host(host, artifact.config.serve.write_key_env)
    if artifact.config.serve.torch_threads:
        torch.set_num_threads(artifact.config.serve.torch_threads)
    uvicorn.run(create_app(artifact), host=host, port=port, log_level="warning", access_log=False)


def recommend_remote(url: str, history: list[str], k: int) -> dict:
    """Ask a running `hllm serve` for the top-k of a history."""
    try:
        response = httpx.post(url.rstrip("/") + "/recommend", json={"history": history, "k": k}, timeout=60)
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the server ({type(err).__name__})", where=url) from None
    if response.status_code >= 400:
        raise UserError(f"server answered {response.status_code}: {response.json().get('detail')}", where=url)
    return response.json()
