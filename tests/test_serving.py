"""Bundle construction rules and the HTTP API contract, on a hand-built view (no broker)."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from graph.events import ItemUpserted
from serving.api import create_app
from serving.bundles import BundleRules, build_bundles
from serving.view import BundleView, relevance
from tests.conftest import at
from training.complements import BundleUpdate, Complement

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def publish(view: BundleView, anchor: str, ranked: list[tuple[str, float, int]], substitutes: tuple[str, ...] = (),
            source: str = "co-purchase") -> None:
    """Publish ``anchor``'s complement list as the worker would: (item, score, orders), best first."""
    comps = [Complement(item_id=i, score=s, orders=n, source=source, model_score=s if source == "model" else None)
             for i, s, n in ranked]
    view.apply_update(BundleUpdate(item_id=anchor, complements=comps, model_version=None, graph_version=1,
                                   updated_at=NOW, substitutes=list(substitutes)))


def catalog(view: BundleView, item_id: str, title: str, price: float | None = 1.0, category: str | None = None,
            in_stock: bool = True) -> None:
    view.upsert_item(ItemUpserted(item_id=item_id, title=title, ts=at(0), price=price, category=category,
                                  in_stock=in_stock))


@pytest.fixture
def view() -> BundleView:
    """Anchor A: B is its best complement; B goes with D but never with C; E is a twin of B."""
    v = BundleView()
    for k, title in [("A", "tea pot"), ("B", "tea cups"), ("C", "garden hose"), ("D", "saucers"),
                     ("E", "tea cups set"), ("F", "sugar bowl")]:
        catalog(v, k, title, price=10.0)
    publish(v, "A", [("B", 0.9, 30), ("C", 0.8, 25), ("E", 0.7, 20), ("D", 0.6, 12), ("F", 0.3, 4)])
    publish(v, "B", [("A", 0.9, 30), ("D", 0.8, 15), ("F", 0.2, 3)], substitutes=("E",))
    publish(v, "C", [("A", 0.8, 25)])
    publish(v, "D", [("B", 0.8, 15), ("A", 0.6, 12), ("F", 0.4, 5)])
    publish(v, "E", [("A", 0.7, 20), ("F", 0.3, 2)], substitutes=("B",))
    publish(v, "F", [("D", 0.4, 5), ("A", 0.3, 4)])
    return v


def members(bundle) -> list[str]:
    return [m.item_id for m in bundle.items]


def test_relevance_is_a_ratio_for_statistics_and_a_softmax_ratio_for_models() -> None:
    stats = [Complement(item_id="x", score=0.5, orders=1, source="co-purchase"),
             Complement(item_id="y", score=0.25, orders=1, source="co-purchase")]
    assert relevance(stats) == {"x": 1.0, "y": 0.5}
    model = [Complement(item_id="x", score=3.0, orders=0, source="model"),
             Complement(item_id="y", score=1.0, orders=0, source="model")]
    assert relevance(model) == pytest.approx({"x": 1.0, "y": np.exp(-2.0)})


def test_members_must_fit_each_other_not_only_the_anchor(view: BundleView) -> None:
    best = build_bundles(view, ["A"], k=1, size=2, rules=BundleRules())[0]
    # C is A's second-best complement but is never bought with B; D is, so {B, D} wins.
    assert members(best) == ["A", "B", "D"]
    # score = mean of rel(A→B)=1, rel(A→D)=0.6/0.9, pair(B, D)=max(0.8/0.9, 0.8/0.8)=1
    assert best.score == pytest.approx((1 + 0.6 / 0.9 + 1) / 3, abs=1e-4)
    assert any("bought together" in w and "30 orders" in w for w in best.why)
    assert any("'tea cups' and 'saucers' were bought together in 15 orders" == w for w in best.why)


def test_substitutes_never_share_a_bundle(view: BundleView) -> None:
    for bundle in build_bundles(view, ["A"], k=5, size=3, rules=BundleRules()):
        assert not {"B", "E"} <= set(members(bundle)), members(bundle)
    # and a substitute of the anchor is never offered at all
    for bundle in build_bundles(view, ["B"], k=5, size=2, rules=BundleRules()):
        assert "E" not in members(bundle)


def test_stock_price_and_category_rules(view: BundleView) -> None:
    catalog(view, "D", "saucers", price=10.0, in_stock=False)
    bundles = build_bundles(view, ["A"], k=5, size=2, rules=BundleRules())
    assert bundles and all("D" not in members(b) for b in bundles)
    capped = build_bundles(view, ["A"], k=5, size=2, rules=BundleRules(), max_price=25.0)
    # anchor 10 + one member 10 fits, two members do not: bundles shrink to what the cap allows
    assert capped and all(b.total_price <= 25.0 and len(b.items) == 2 for b in capped)
    for k in "BCEF":
        catalog(view, k, view.items[k].title, price=10.0, category="kitchen")
    single = build_bundles(view, ["A"], k=5, size=2, rules=BundleRules(max_per_category=1))
    assert all(len(b.items) == 2 for b in single)
    assert build_bundles(view, ["A"], k=1, size=2, rules=BundleRules(in_stock_only=False))[0].items[2].item_id == "D"


def test_bundles_are_deterministic_distinct_and_ranked(view: BundleView) -> None:
    first = build_bundles(view, ["A"], k=4, size=2, rules=BundleRules())
    again = build_bundles(view, ["A"], k=4, size=2, rules=BundleRules())
    assert [b.model_dump() for b in first] == [b.model_dump() for b in again]
    sets = [frozenset(members(b)) for b in first]
    assert len(set(sets)) == len(sets) == 4
    assert [b.score for b in first] == sorted((b.score for b in first), reverse=True)


def test_cart_completion_uses_all_cart_items_and_the_user_history(view: BundleView) -> None:
    bundles = build_bundles(view, ["B", "C"], k=2, size=1, rules=BundleRules(), include_anchor=False)
    assert [members(b) for b in bundles] == [["A"], ["D"]]
    view.add_user_items("u1", ["F"])
    boosted = build_bundles(view, ["D"], k=3, size=1, rules=BundleRules(history_boost=0.6), user_id="u1",
                            include_anchor=False)
    assert members(boosted[0]) == ["F"] and "you bought it before" in boosted[0].why[0]


def test_a_cart_ranks_candidates_by_the_mean_relevance_over_its_items() -> None:
    """Every cart item votes: y, listed by both, beats x and z, each first in one list only (the best anchor's
    relevance alone ties all three and picks x by id)."""
    v = BundleView()
    for k in "abxyz":
        catalog(v, k, f"item {k}")
    publish(v, "a", [("x", 1.0, 5), ("y", 0.8, 4)])
    publish(v, "b", [("z", 1.0, 5), ("y", 1.0, 5)])
    bundles = build_bundles(v, ["a", "b"], k=3, size=1, rules=BundleRules(), include_anchor=False)
    assert [members(b) for b in bundles] == [["y"], ["x"], ["z"]]
    assert bundles[0].items[0].relevance == pytest.approx(0.9)


def test_bundle_labels_name_the_shared_category_and_title_word() -> None:
    from serving.bundles import label
    from serving.view import ItemInfo

    nikon = [ItemInfo("a", "Nikon EN-EL15 Battery", "Batteries"), ItemInfo("b", "Nikon D7000 strap", "Straps"),
             ItemInfo("c", "Charger for Nikon EN-EL15", "Batteries")]
    assert label(nikon) == "Nikon Batteries"
    assert label([ItemInfo("a", "Cable", "Cables"), ItemInfo("b", "Router", "Routers"),
                  ItemInfo("c", "Switch", "Switches")]) == "Cables & Routers"
    assert label([ItemInfo("a", "Black Medium Tee", "Tops"), ItemInfo("b", "Black Medium Skirt", "Skirts")]) == \
        "Tops & Skirts"  # colours and sizes name nothing
    assert label([ItemInfo("a", "x"), ItemInfo("b", "y")]) is None


def test_bundle_labels_without_categories_name_the_words_most_items_share() -> None:
    from serving.bundles import label
    from serving.view import ItemInfo

    lunch = [ItemInfo("a", "LUNCH BAG WOODLAND"), ItemInfo("b", "LUNCH BAG SPACEBOY DESIGN"),
             ItemInfo("c", "LUNCH BAG RED RETROSPOT")]
    assert label(lunch) == "LUNCH BAG"  # RED is a colour, SPACEBOY in one item only
    assert label([ItemInfo("a", "ROUND SNACK BOXES SET OF4 WOODLAND"), ItemInfo("b", "ROUND SNACK BOXES SET OF 4 FRUITS"),
                  ItemInfo("c", "SPACEBOY BIRTHDAY CARD")]) == "ROUND SNACK BOXES"
    assert label([*lunch, ItemInfo("d", "SPACEBOY LUNCH BOX")]) == "LUNCH BAG"  # SPACEBOY: two of four, not more
    assert label([ItemInfo("a", "SPACEBOY LUNCH BOX"), ItemInfo("b", "PARTY BUNTING"),
                  ItemInfo("c", "SPACEBOY BIRTHDAY CARD"), ItemInfo("d", "JUMBO BAG")]) == "SPACEBOY"  # no majority
    assert label([ItemInfo("a", "PLASTERS IN TIN WOODLAND ANIMALS"), ItemInfo("b", "PLASTERS IN TIN CIRCUS PARADE"),
                  ItemInfo("c", "PLASTERS IN TIN SPACEBOY")]) == "PLASTERS IN TIN"  # as the titles write it
    assert label([ItemInfo("a", "Earth's Best Organic Fruit"), ItemInfo("b", "Earth's Best Organic Dinner")]) == \
        "Earth's Best Organic"
    assert label([ItemInfo("a", "Nikon strap", "Straps"), ItemInfo("b", "Nikon lens cap")]) == "Nikon Straps"


@pytest.fixture
def client(view: BundleView) -> TestClient:
    state = {"ready": True}
    app = create_app(view, BundleRules(), health=lambda: (state["ready"], None))
    app.state.health_flag = state
    return TestClient(app, raise_server_exceptions=False)


def test_search_finds_items_by_id_and_title_words(client: TestClient) -> None:
    r = client.get("/items", params={"q": "TEA cups"})
    assert r.status_code == 200
    assert [i["item_id"] for i in r.json()["items"]] == ["B", "E"]  # both words, any case; by title
    assert [i["item_id"] for i in client.get("/items", params={"q": "A"}).json()["items"]][0] == "A"  # the id first
    few = client.get("/items", params={"q": "t", "limit": 1}).json()
    assert len(few["items"]) == 1 and few["truncated"] is True
    assert client.get("/items", params={"q": ""}).status_code == 422
    assert client.get("/items", params={"q": "  "}).json()["items"] == []


def test_the_title_index_finds_what_a_test_of_every_title_finds() -> None:
    """TitleIndex against a plain scan on the real catalog, with titles added and changed between searches
    (the joined titles catch up by appending, and are rebuilt after a change)."""
    from serving.view import TitleIndex
    from tests.conftest import retail_events

    titles = list({e.item_id: e.title for e in retail_events() if isinstance(e, ItemUpserted)}.items())
    index, current = TitleIndex(), {}
    queries = [["bag"], ["lunch", "bag"], ["heart", "t-light"], ["retrospot"], ["zzz"], ["a"], ["c+"], ["."]]

    def check() -> None:
        for words in queries:
            assert index.search(words) == [k for k, t in current.items() if all(w in t.lower() for w in words)]

    for part in (titles[:100], titles[100:len(titles) // 2], titles[len(titles) // 2:]):
        for k, t in part:
            index.set(k, t)
            current[k] = t
        check()
    assert len(index.search(["bag"])) > 50 and index.search(["lunch", "bag"])
    for k, t in titles[::7]:  # retitled: found by the new title only
        index.set(k, f"zzz {t}")
        current[k] = f"zzz {t}"
    check()
    assert index.search(["zzz"]) == [k for k, _ in titles[::7]]


def test_search_follows_retitled_items_and_leaves_the_event_loop_free() -> None:
    """The search scans lowercased titles kept beside the catalog: a retitled item is found by its new title
    only. The route is a plain function, run in the threadpool: as a coroutine its scan (130 ms at 212k items)
    held every lookup on the event loop."""
    import inspect

    view = BundleView()
    catalog(view, "A", "Blue Mug")
    catalog(view, "B", "Red mug")
    catalog(view, "A", "Green Bowl")
    assert view.search(["mug"]) == ["B"] and view.search(["green", "bowl"]) == ["A"] and view.search([]) == []
    app = create_app(view)
    client = TestClient(app)
    assert [i["item_id"] for i in client.get("/items", params={"q": "BOWL gre"}).json()["items"]] == ["A"]
    (route,) = [r for r in app.routes if getattr(r, "path", None) == "/items"]
    assert not inspect.iscoroutinefunction(route.endpoint)


def test_the_explorer_page_is_served_from_the_package(client: TestClient) -> None:
    r = client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "bundle explorer" in r.text and "http://" not in r.text and "https://" not in r.text  # nothing from a CDN


def test_item_bundles_contract(client: TestClient) -> None:
    r = client.get("/items/A/bundles", params={"k": 2, "size": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["anchor"] == {"item_id": "A", "title": "tea pot", "price": 10.0, "category": None, "in_stock": True}
    assert [m["item_id"] for m in body["bundles"][0]["items"]] == ["A", "B", "D"]
    assert body["bundles"][0]["total_price"] == 30.0 and body["personalized"] is False
    assert set(body["bundles"][0]) == {"items", "score", "total_price", "why", "label"}
    assert body["bundles"][0]["label"] == "tea"  # the word two of its titles share; the items have no category


def test_item_ids_with_slashes_spaces_and_url_characters_are_served() -> None:
    """Any id an event may carry can be looked up, URL-encoded: a shop's SKUs hold '/' ("SKU/12"), which the
    server decodes before routing, and '?', '#', spaces or letters beyond ASCII."""
    v = BundleView()
    ids = ["SKU/12", "a b", "x?y#z", "über-1", "cups/bundles"]
    for k in ids:
        catalog(v, k, f"item {k}")
    publish(v, "SKU/12", [(k, 0.9 - 0.1 * n, 5) for n, k in enumerate(ids[1:])])
    publish(v, "cups/bundles", [("SKU/12", 0.5, 2)])
    client = TestClient(create_app(v, BundleRules(), health=lambda: (True, None)), raise_server_exceptions=False)
    body = client.get(f"/items/{quote('SKU/12', safe='')}/complements").json()
    assert [c["item_id"] for c in body["complements"]] == ids[1:] and body["item"]["item_id"] == "SKU/12"
    assert client.get("/items/SKU/12/complements").json()["item"]["item_id"] == "SKU/12"  # unencoded, the same
    bundles = client.get(f"/items/{quote('cups/bundles', safe='')}/bundles", params={"size": 2}).json()["bundles"]
    assert [m["item_id"] for m in bundles[0]["items"]] == ["cups/bundles", "SKU/12"]
    for k in ids[1:4]:
        assert client.get(f"/items/{quote(k, safe='')}/complements").json()["item"]["item_id"] == k
    r = client.get(f"/items/{quote('SKU/13', safe='')}/bundles")
    assert r.status_code == 404 and r.json() == {"detail": "unknown item 'SKU/13'"}


def test_bad_input_gets_4xx_with_a_json_body(client: TestClient) -> None:
    r = client.get("/items/nope/bundles")
    assert r.status_code == 404 and r.json() == {"detail": "unknown item 'nope'"}
    for params in ({"k": 0}, {"k": 21}, {"size": 1}, {"size": 6}, {"k": "x"}, {"max_price": -1}):
        r = client.get("/items/A/bundles", params=params)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query", params
    assert client.get("/items/A/complements", params={"k": 0}).status_code == 422
    for body in ({"items": []}, {"items": ["A"], "size": 9}, {"items": ["A"], "extra": 1}, {"cart": ["A"]}, [1]):
        r = client.post("/bundles/complete", json=body)
        assert r.status_code == 422 and "detail" in r.json(), body
    r = client.post("/bundles/complete", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/bundles/complete", json={"items": ["x", "y"]})
    assert r.status_code == 404 and "none of the cart's items is known" in r.json()["detail"]


def test_a_storefront_on_a_listed_origin_may_call_the_api_from_the_browser(view: BundleView) -> None:
    """A shop's product pages fetch bundles from the browser: the listed origin gets CORS headers (preflight
    and lookups, cached ones too); another origin, and every origin by default, gets none."""
    shop, other = "https://shop.example", "https://elsewhere.example"
    client = TestClient(create_app(view, BundleRules(), cors_origins=[shop]))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = client.options("/bundles/complete", headers={"Origin": shop, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == shop
    assert "POST" in r.headers["access-control-allow-methods"]
    for _ in range(2):  # built, then from the response cache
        r = client.get("/items/A/bundles", headers={"Origin": shop})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == shop
    assert client.options("/bundles/complete", headers={"Origin": other, **preflight}).status_code == 400
    assert "access-control-allow-origin" not in client.get("/items/A/bundles", headers={"Origin": other}).headers
    plain = TestClient(create_app(view, BundleRules()))
    assert "access-control-allow-origin" not in plain.get("/items/A/bundles", headers={"Origin": shop}).headers


def test_hostile_clients_get_4xx_and_memory_stays_bounded(view: BundleView) -> None:
    """Non-finite numbers are 422 (JSON has no NaN: the error body must still serialise), bodies over the
    limit are 413 before they are parsed, and the response cache stays inside its byte budget."""
    app = create_app(view, BundleRules(), cache_bytes=4000, body_limit=1000)
    client = TestClient(app, raise_server_exceptions=False)
    for raw in (b'{"items": ["A"], "max_price": NaN}', b'{"items": ["A"], "max_price": Infinity}',
                b'{"items": ["A"], "k": -Infinity}'):
        r = client.post("/bundles/complete", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"], raw
    assert client.get("/items/A/bundles", params={"max_price": "nan"}).status_code == 422
    r = client.post("/bundles/complete", content=b'{"items": ["' + b"A" * 5000 + b'"]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 1,000 bytes" in r.json()["detail"]

    def chunks():
        yield b'{"items": ["A"], "user_id": "'
        for _ in range(20):
            yield b"u" * 100
        yield b'"}'

    r = client.post("/bundles/complete", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413  # streamed without a length: counted as it arrives
    built = 0
    for price in range(1, 200):  # every price a new cache key
        r = client.get("/items/A/bundles", params={"max_price": price})
        assert r.status_code == 200
        built += len(r.content)
    held = sum(len(body) for _, body in app.state.cache.values())
    assert held == app.state.cached_bytes[0] <= 4000 < built and len(app.state.cache) >= 1
    assert client.post("/bundles/complete", json={"items": ["A"]}).status_code == 200  # still serving


def test_cart_completion_endpoint(client: TestClient) -> None:
    r = client.post("/bundles/complete", json={"items": ["B", "C", "zzz"], "k": 2, "size": 1})
    assert r.status_code == 200
    body = r.json()
    assert [c["item_id"] for c in body["cart"]] == ["B", "C"] and body["unknown_items"] == ["zzz"]
    assert [[m["item_id"] for m in b["items"]] for b in body["bundles"]] == [["A"], ["D"]]


def test_complements_and_live_updates_invalidate_the_cache(client: TestClient, view: BundleView) -> None:
    first = client.get("/items/A/complements", params={"k": 2}).json()
    assert [(c["item_id"], c["orders"]) for c in first["complements"]] == [("B", 30), ("C", 25)]
    assert first["complements"][0]["why"] == "bought together with 'tea pot' in 30 orders"
    assert client.get("/items/A/bundles").json()["bundles"][0]["items"][1]["item_id"] == "B"
    publish(view, "A", [("F", 0.95, 40), ("B", 0.9, 30)])  # a new list arrives from the stream
    assert client.get("/items/A/complements", params={"k": 1}).json()["complements"][0]["item_id"] == "F"
    assert client.get("/items/A/bundles").json()["bundles"][0]["items"][1]["item_id"] == "F"
    catalog(view, "F", "sugar bowl", in_stock=False)  # and a catalog change to a listed item
    assert client.get("/items/A/bundles").json()["bundles"][0]["items"][1]["item_id"] == "B"


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    client.app.state.health_flag["ready"] = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "starting" and r.json()["items"] == 6
    client.get("/items/A/bundles")
    client.get("/items/nope/bundles")
    text = client.get("/metrics").text
    assert 'bundlegnn_api_request_seconds_count{route="/items/{item_id}/bundles",status="200"} 1.0' in text
    assert 'bundlegnn_api_request_seconds_count{route="/items/{item_id}/bundles",status="404"} 1.0' in text
    assert "bundlegnn_view_complement_lists 6.0" in text
    assert client.get("/docs").status_code == 200 and "/bundles/complete" in client.get("/openapi.json").text


def test_seeding_from_model_views_gives_lists_to_items_without_updates() -> None:
    v = BundleView()
    publish(v, "a", [("b", 0.5, 3)])
    src = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    dst = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1]], np.float32)
    seeded = v.seed_from_model("m1", ["a", "b", "c"], src, dst, np.zeros(3, np.float32), 0.5, top_k=2)
    assert seeded == 2 and v.entries["a"].complements[0].item_id == "b"  # a published list is kept
    assert [c.item_id for c in v.entries["b"].complements] == ["a", "c"]  # cos(b.src, a.dst) = 1 ranks first
    assert v.entries["b"].model_version == "m1" and v.model_version == "m1"


def test_seeding_from_a_decoder_uses_its_rows() -> None:
    v = BundleView()
    ids = ["a", "b", "c"]
    index = np.array([[2, 1], [0, 1], [1, 0]], np.int32)
    weight = np.array([[0.4, 0.1], [0.3, 0.0], [0.2, -0.1]], np.float32)
    views = np.zeros((3, 2), np.float32)
    assert v.seed_from_model("m2", ids, views, views, np.zeros(3, np.float32), 0.5, 5, (ids, index, weight)) == 3
    assert [(c.item_id, c.score, c.source) for c in v.entries["a"].complements] == [("c", 0.4, "decoder"),
                                                                                     ("b", 0.1, "decoder")]
    assert v.entries["a"].relevance == pytest.approx({"c": 1.0, "b": 0.25})  # weights: a ratio scale
    assert [c.item_id for c in v.entries["b"].complements] == ["a"]  # itself and non-positive weights dropped
    assert [c.item_id for c in v.entries["c"].complements] == ["b"]


def test_user_history_personalizes_and_unknown_users_do_not(client: TestClient, view: BundleView) -> None:
    plain = client.get("/items/A/bundles", params={"user_id": "nobody"}).json()
    assert plain["personalized"] is False
    view.add_user_items("u7", ["F"])
    body = client.get("/items/A/bundles", params={"user_id": "u7", "k": 5, "size": 2}).json()
    assert body["personalized"] is True
    f = [m for b in body["bundles"] for m in b["items"] if m["item_id"] == "F"]
    assert f and "you bought it before" in f[0]["why"]


def test_the_feed_is_stale_when_behind_and_not_advancing_or_when_offsets_go_back() -> None:
    """What /healthz reports (serving.feed.ViewFeed.stale), from the feed's periodic look at end offsets."""
    from kafka import TopicPartition
    from kafka.errors import KafkaConnectionError

    from serving.feed import FeedTopics, ViewFeed

    tp = TopicPartition("catalog", 0)

    class Consumer:
        def __init__(self) -> None:
            self.end, self.at, self.down = 10, 10, False

        def end_offsets(self, parts):
            if self.down:
                raise KafkaConnectionError("no broker")
            return {tp: self.end}

        def position(self, part):
            return self.at

    feed = ViewFeed(BundleView(), "unused", FeedTopics("catalog", "updates"), stale_after=60)
    feed.ready.set()
    consumer, t = Consumer(), 1000.0
    feed.check(consumer, [tp], t)
    feed.beat = t + 100
    assert feed.stale(t + 100) is None  # caught up: fine however long nothing happens
    consumer.end = 50
    feed.check(consumer, [tp], t + 101)
    consumer.at = 20
    feed.check(consumer, [tp], t + 150)  # behind but advancing
    feed.beat = t + 200
    assert feed.stale(t + 200) is None
    feed.check(consumer, [tp], t + 200)  # not advancing since t + 150
    feed.beat = t + 211
    assert feed.stale(t + 211) == "view 30 messages behind its topics, not advancing for 61 s"
    consumer.at, consumer.end = 60, 59  # an end reported a record short of the position (tansu): not a loss
    feed.check(consumer, [tp], t + 212)
    assert feed.stale(t + 212) is None
    consumer.end = 5  # the broker came back empty
    feed.check(consumer, [tp], t + 213)
    assert "catalog[0]: the broker's end offset went back" in feed.stale(t + 213)
    feed.went_back = None  # (say it was a false alarm)
    consumer.end = consumer.at = 70
    consumer.down = True
    feed.check(consumer, [tp], t + 220)
    feed.beat = t + 281
    assert feed.stale(t + 281) == "broker unreachable for 61 s"
    assert feed.stale(t + 400) == "view feed stuck: no poll for 119 s"
    consumer.down = False
    feed.check(consumer, [tp], t + 401)
    feed.beat = t + 401
    assert feed.stale(t + 401) is None


def test_healthz_and_metrics_say_how_far_the_view_is_behind_its_topics() -> None:
    behind: list[int | None] = [None]
    client = TestClient(create_app(BundleView(), view_behind=lambda: behind[0]))
    assert client.get("/healthz").json()["view_behind"] is None  # the feed has not looked yet
    assert "bundlegnn_view_behind_messages NaN" in client.get("/metrics").text
    behind[0] = 42
    assert client.get("/healthz").json()["view_behind"] == 42
    assert "bundlegnn_view_behind_messages 42.0" in client.get("/metrics").text
    behind[0] = 0
    assert client.get("/healthz").json()["view_behind"] == 0
