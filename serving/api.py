"""The HTTP bundle API (FastAPI): lookups are reads of an in-memory :class:`BundleView`.

Built bundles are cached per request and revalidated on every hit against the
versions of the items they were built from (the anchors and the anchors'
listed complements), so a bundle update or a catalog change is visible on the
next request while repeated lookups cost a few dictionary reads.
"""

from __future__ import annotations

import heapq
import logging
import math
import pathlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.bundle_fit import PairModel
from serving.bundles import Bundle, BundleRules, build_bundles, describe
from serving.view import BundleView, ItemInfo

log = logging.getLogger(__name__)

_UI = pathlib.Path(__file__).parent / "static" / "ui.html"

ItemId = Annotated[str, Path(min_length=1, max_length=256, description="catalog item id, URL-encoded ('SKU%2F12' "
                                                                       "for 'SKU/12')")]
"""Routes take it as ``{item_id:path}``: a shop's ids may hold '/', which the server decodes before routing."""


class ItemRef(BaseModel):
    item_id: str
    title: str
    price: float | None = None
    category: str | None = None
    in_stock: bool = True


class BundlesResponse(BaseModel):
    anchor: ItemRef
    bundles: list[Bundle]
    model_version: str | None = Field(description="model that scored the anchor's complements; null: statistics")
    updated_at: datetime | None = Field(description="when the anchor's complement list was computed")
    personalized: bool = Field(description="the user's earlier purchases were taken into account")


class ComplementOut(BaseModel):
    item_id: str
    title: str
    score: float
    orders: int
    model_score: float | None
    source: str
    why: str


class ComplementsResponse(BaseModel):
    item: ItemRef
    complements: list[ComplementOut]
    model_version: str | None
    updated_at: datetime | None


class CartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=100)
    user_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    k: int = Field(3, ge=1, le=20, description="bundles to return")
    size: int = Field(2, ge=1, le=4, description="items each bundle adds to the cart")
    max_price: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="cap on the total price of the added items")


class CartResponse(BaseModel):
    cart: list[ItemRef]
    unknown_items: list[str] = Field(description="cart items the catalog does not know (ignored)")
    bundles: list[Bundle]
    personalized: bool


class ModelInfo(BaseModel):
    """What the model loaded at start is made of (from its artifact's manifest)."""

    version: str
    decoder: str | None = Field(description="'dense' or 'neighbourhood' closed-form decoder; null: the GNN's head")
    gnn_weight: float | None = Field(description="weight validation gave the GNN's embeddings in the decoder; 0: "
                                                 "the lists come from co-purchase counts and text alone")
    user_weight: float = Field(0.0, description="weight of a known user's own history")
    head_weight: float = Field(0.0, description="weight validation gave the GNN's user → item score for a known user "
                               "(scored in evaluation and the promotion window, not served yet)")
    pair_model: bool = Field(False, description="bundles are ranked by the pair model fitted on the model's "
                                                "validation orders (false: by relevance)")
    gnn_steps: str | None = Field(None, description="'full' or 'sampled': the GNN's training steps over the whole "
                                  "graph or a sampled neighbourhood of each batch (null: not recorded)")

    @classmethod
    def of(cls, version: str, manifest: dict, pair_model: bool) -> ModelInfo:
        """The model info of an artifact from its manifest (the train summary)."""
        decoder = manifest.get("decoder")
        return cls(version=version, decoder=decoder.get("method", "dense") if decoder else None,
                   gnn_weight=decoder["gnn_weight"] if decoder else None, user_weight=manifest.get("user_weight", 0.0),
                   head_weight=manifest.get("head_weight", 0.0), pair_model=pair_model,
                   gnn_steps=manifest.get("gnn_steps"))


class SearchResponse(BaseModel):
    query: str
    items: list[ItemRef] = Field(description="the item with this id, then items whose title holds every word of the "
                                             "query, those with a complement list first, by title")
    truncated: bool = Field(description="more items matched than were returned")


class Health(BaseModel):
    status: str = Field(description="'ok', 'starting' (still reading the topics) or 'failing'")
    items: int
    complement_lists: int
    model_version: str | None
    model: ModelInfo | None = Field(None, description="the model loaded at start, if any")
    last_update_age_s: float | None
    view_behind: int | None = Field(None, description="messages on the view's topics after its positions, at the "
                                    "feed's last look (every 5 s; None before the first). On Apache Kafka 0 means "
                                    "caught up; tansu reports end offsets short after batches, so it can read low")
    error: str | None = None


def _ref(info: ItemInfo) -> ItemRef:
    return ItemRef(item_id=info.item_id, title=info.title, price=info.price, category=info.category,
                   in_stock=info.in_stock)


class _Metrics:
    def __init__(self, view: BundleView) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("bundlegnn_api_request_seconds", "request latency", ["route", "status"],
                                 buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .5), registry=self.registry)
        self.update_age = Histogram("bundlegnn_bundle_update_age_seconds",
                                    "event produced → its bundle update visible in this API",
                                    buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 300), registry=self.registry)
        age = Gauge("bundlegnn_view_last_update_age_seconds", "seconds since the newest bundle update arrived",
                    registry=self.registry)
        age.set_function(lambda: time.time() - view.last_update if view.last_update else float("nan"))
        for name, what, fn in [("items", "catalog items in the view", lambda: len(view.items)),
                               ("complement_lists", "items with a complement list", lambda: len(view.entries)),
                               ("rejected_messages", "topic messages the view skipped",
                                lambda: view.counters["rejected"])]:
            Gauge(f"bundlegnn_view_{name}", what, registry=self.registry).set_function(fn)
        self.model = Gauge("bundlegnn_model_info", "the model version in use (value 1)", ["version"],
                           registry=self.registry)


class _Timing:
    """Request latency per route template and status (a plain ASGI middleware: no per-request task)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other").replace(":path}", "}")
            self.histogram.labels(route, str(status[0])).observe(time.perf_counter() - started)


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before it is parsed: by its declared length, or,
    sent without one (chunked), by reading at most ``limit`` bytes of it first."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(send)
                return
        replayed = [False]

        async def replay() -> Message:
            if replayed[0]:
                return await receive()
            replayed[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit:,} bytes"}, status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def _json_safe(value: object) -> object:
    """Validation error details with non-finite numbers as strings (JSON has no NaN: the 422 would be a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def create_app(view: BundleView, rules: BundleRules | None = None, health: Callable[[], tuple[bool, str | None]] |
               None = None, cache_size: int = 100_000, model: ModelInfo | None = None,
               cache_bytes: int = 64 << 20, body_limit: int = 64 << 10,
               view_behind: Callable[[], int | None] | None = None, pair_model: PairModel | None = None,
               cors_origins: list[str] | None = None) -> FastAPI:
    """The API over ``view``; ``health`` says (ready, error) for /healthz (default: always ready);
    ``view_behind``: how many messages the view's feed is behind its topics (/healthz and /metrics);
    ``pair_model``: the builder's fitted pair score (:mod:`serving.bundle_fit`; None: rank by relevance);
    ``cors_origins``: origins whose pages may call it from the browser (CORS; none by default).

    Built responses are cached up to ``cache_size`` entries and ``cache_bytes`` bytes (oldest out first), so
    memory stays bounded whatever the requests; request bodies over ``body_limit`` bytes get 413.
    """
    rules = rules or BundleRules()
    app = FastAPI(title="bundlegnn", version="0.1.0",
                  description="Frequently-bought-together bundles, kept fresh from Kafka.")
    metrics = _Metrics(view)
    app.state.metrics, app.state.view = metrics, view
    behind = view_behind or (lambda: None)
    Gauge("bundlegnn_view_behind_messages", "messages on the view's topics after its positions, at the feed's last "
          "look (NaN before it)", registry=metrics.registry).set_function(
        lambda: float("nan") if (n := behind()) is None else n)
    cache: dict[tuple, tuple[tuple[tuple[str, int], ...], bytes]] = {}
    seen_model: list[str | None] = [None]

    app.add_middleware(_BodyLimit, limit=body_limit)
    app.add_middleware(_Timing, histogram=metrics.latency)
    if cors_origins:  # outermost: a browser's preflight is answered before anything else looks at it
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"], max_age=600)
    cached_bytes = [0]
    app.state.cache, app.state.cached_bytes = cache, cached_bytes  # for /metrics and tests

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _json_safe(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def deps(anchors: list[str]) -> tuple[tuple[str, int], ...]:
        ids = list(anchors)
        for a in anchors:
            entry = view.entries.get(a)
            if entry is not None:
                ids += [c.item_id for c in entry.complements] + [c.via for c in entry.complements if c.via]
        return tuple((i, view.versions.get(i, 0)) for i in dict.fromkeys(ids))

    def cached(key: tuple, anchors: list[str], build: Callable[[], BaseModel]) -> Response:
        hit = cache.get(key)
        if hit is not None and all(view.versions.get(i, 0) == v for i, v in hit[0]):
            return Response(hit[1], media_type="application/json")
        before = deps(anchors)
        body = build().model_dump_json().encode()
        if cache_size and len(body) <= cache_bytes:
            old = cache.pop(key, None)
            cached_bytes[0] += len(body) - (len(old[1]) if old else 0)
            while cache and (len(cache) >= cache_size or cached_bytes[0] > cache_bytes):
                cached_bytes[0] -= len(cache.pop(next(iter(cache)))[1])
            cache[key] = (before, body)
        return Response(body, media_type="application/json")

    def known(item_id: str) -> None:
        if not view.knows(item_id):
            raise HTTPException(404, f"unknown item {item_id!r}")

    def model_gauge() -> None:
        if view.model_version != seen_model[0]:
            if seen_model[0] is not None:
                metrics.model.remove(seen_model[0])
            seen_model[0] = view.model_version
            if view.model_version is not None:
                metrics.model.labels(view.model_version).set(1)

    @app.get("/items/{item_id:path}/bundles", response_model=BundlesResponse,
             responses={404: {"description": "unknown item"}})
    async def item_bundles(item_id: ItemId, k: Annotated[int, Query(ge=1, le=20)] = 3,
                     size: Annotated[int, Query(ge=2, le=5, description="items per bundle, anchor included")] = 3,
                     user_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
                     max_price: Annotated[float | None, Query(gt=0, description="cap on the bundle's total")] = None,
                     ) -> Response:
        """Bundles around one item: the anchor first, then ``size - 1`` complements that fit together."""
        known(item_id)
        personalized = bool(view.history(user_id))

        def build() -> BundlesResponse:
            entry = view.entries.get(item_id)
            bundles = build_bundles(view, [item_id], k, size - 1, rules, max_price, user_id if personalized else None,
                                    fit=pair_model)
            return BundlesResponse(anchor=_ref(view.info(item_id)), bundles=bundles,
                                   model_version=entry.model_version if entry else None,
                                   updated_at=entry.updated_at if entry else None, personalized=personalized)

        if personalized:  # user histories change often and are per user: not cached
            return Response(build().model_dump_json().encode(), media_type="application/json")
        return cached(("bundles", item_id, k, size, max_price), [item_id], build)

    @app.get("/items/{item_id:path}/complements", response_model=ComplementsResponse,
             responses={404: {"description": "unknown item"}})
    async def item_complements(item_id: ItemId, k: Annotated[int, Query(ge=1, le=100)] = 10) -> Response:
        """The item's ranked complements as the stream worker last published them."""
        known(item_id)

        def build() -> ComplementsResponse:
            entry = view.entries.get(item_id)
            comps = entry.complements[:k] if entry else ()
            return ComplementsResponse(
                item=_ref(view.info(item_id)), model_version=entry.model_version if entry else None,
                updated_at=entry.updated_at if entry else None,
                complements=[ComplementOut(item_id=c.item_id, title=view.info(c.item_id).title, score=c.score,
                                           orders=c.orders, model_score=c.model_score, source=c.source,
                                           why=describe(view, item_id, c)) for c in comps])

        return cached(("complements", item_id, k), [item_id], build)

    @app.post("/bundles/complete", response_model=CartResponse, responses={404: {"description": "no known item"}})
    async def complete(cart: Annotated[CartRequest, Body()]) -> Response:
        """Bundles that complete a cart: ``size`` new items that fit the cart and each other."""
        items = list(dict.fromkeys(cart.items))
        known_items = [i for i in items if view.knows(i)]
        if not known_items:
            raise HTTPException(404, f"none of the cart's items is known: {items[:10]}")
        personalized = bool(view.history(cart.user_id))

        def build() -> CartResponse:
            bundles = build_bundles(view, known_items, cart.k, cart.size, rules, cart.max_price,
                                    cart.user_id if personalized else None, include_anchor=False, fit=pair_model)
            return CartResponse(cart=[_ref(view.info(i)) for i in known_items],
                                unknown_items=[i for i in items if i not in known_items], bundles=bundles,
                                personalized=personalized)

        if personalized:
            return Response(build().model_dump_json().encode(), media_type="application/json")
        return cached(("cart", tuple(items), cart.k, cart.size, cart.max_price), known_items, build)

    @app.get("/items", response_model=SearchResponse)
    def search(q: Annotated[str, Query(min_length=1, max_length=200, description="an item id or title words")],
               limit: Annotated[int, Query(ge=1, le=100)] = 20) -> SearchResponse:
        """Items by id or title words (case-insensitive), for people looking for an item: the bundle explorer
        at ``/ui``. A scan of the catalog's titles (:class:`serving.view.TitleIndex`), not a lookup path: a
        plain ``def``, so it runs in the threadpool and lookups on the event loop go on meanwhile (as an
        ``async def`` each search at 212k items held every lookup for 130 ms)."""
        exact = [view.info(q)] if view.knows(q) else []
        ids = [i for i in view.search(q.lower().split()) if i != q]
        items, entries = view.items, view.entries  # (every id found is in the catalog)
        found = heapq.nsmallest(limit, ids, key=lambda i: (i not in entries, items[i].title, i))  # listed first
        hits = exact + [view.info(i) for i in found]
        return SearchResponse(query=q, items=[_ref(i) for i in hits[:limit]], truncated=len(exact) + len(ids) > limit)

    page = _UI.read_text(encoding="utf-8")  # read once, not per request

    @app.get("/ui", include_in_schema=False)
    async def explorer() -> HTMLResponse:
        """The bundle explorer: one HTML page (no build step, nothing from a CDN) over this API."""
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        """200 once the view has read its topics; 503 while starting or when the feed failed."""
        ready, error = health() if health else (True, None)
        model_gauge()
        body = Health(status="failing" if error else "ok" if ready else "starting", items=len(view.items),
                      complement_lists=len(view.entries), model_version=view.model_version, model=model,
                      last_update_age_s=round(time.time() - view.last_update, 3) if view.last_update else None,
                      view_behind=behind(), error=error)
        return JSONResponse(body.model_dump(), status_code=200 if ready and not error else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        model_gauge()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
