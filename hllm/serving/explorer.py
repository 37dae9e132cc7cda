"""The explorer page at `/` and the read routes it needs beyond the JSON API: sample users, title
search, a user's Creator title for an item.

The page (static/explorer.html + explorer.js, no build step) only calls HTTP routes, the same ones
any client can call. Creator titles come with an artifact exported with `hllm export --creator
INFER_DIR`; without them /health says `creator_titles: false`, which hides the page's panel, and
their route answers 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from hllm.errors import UserError
from hllm.serving.export import Artifact

if TYPE_CHECKING:  # app.py builds the catalogue and includes this router
    from hllm.serving.app import Catalogue

STATIC = Path(__file__).parent / "static"
SEARCH_LIMIT = 20


def explorer_router(artifact: Artifact, catalogue: Catalogue) -> APIRouter:
    """The page, its script, and the read routes it calls."""
    router = APIRouter()
    samples = dict(zip(artifact.users, artifact.histories))

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "explorer.html")

    @router.get("/explorer.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(STATIC / "explorer.js", media_type="text/javascript")

    @router.get("/samples")
    def sample_users(limit: int = Query(100, ge=1, le=10_000)) -> dict:
        """Users of the artifact's held-out sample histories, with their history lengths."""
        return {"users": [{"user": u, "length": len(h)} for u, h in list(samples.items())[:limit]]}

    @router.get("/samples/{user}")
    def sample_history(user: str) -> dict:
        """A sample user's history (oldest first) with titles."""
        if user not in samples:
            raise HTTPException(404, f"user {user!r} is not among the artifact's sample users (GET /samples)")
        rows = [row for row in map(catalogue.row, samples[user]) if row is not None]
        return {
            "user": user,
            "history": [{"id": catalogue.ids[r], "title": catalogue.titles[r]} for r in rows],
        }

    @router.get("/search")
    def search_titles(title: str = Query(min_length=1), limit: int = Query(5, ge=1, le=SEARCH_LIMIT)) -> dict:
        """Items whose title contains `title` (case-insensitive), exact matches first."""
        wanted = title.casefold()
        found = [r for r in range(1, len(catalogue.ids)) if wanted in catalogue.titles[r].casefold()]
        found.sort(key=lambda r: catalogue.titles[r].casefold() != wanted)  # stable: catalogue order
        return {"items": [{"id": catalogue.ids[r], "title": catalogue.titles[r]} for r in found[:limit]]}

    @router.get("/users/{user}/titles/{item_id:path}")
    def creator_title(user: str, item_id: str) -> dict:
        """The title to show `user` for an item: their cluster's title when it passed the hallucination
        filter, else the original (`source` says which)."""
        if (creator := artifact.creator) is None:
            raise HTTPException(404, "this artifact carries no Creator titles (hllm export --creator)")
        try:
            title, source = creator.title(user, item_id)
        except UserError as err:
            raise HTTPException(404, err.message) from None  # the message, not the artifact's path
        original = creator.originals[item_id]
        return {"user": user, "item": item_id, "title": title, "source": source, "original_title": original}

    return router
