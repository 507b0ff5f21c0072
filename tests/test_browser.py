"""The bundle explorer (``/ui``) in a real headless Chromium, against the API over a worker on the real sample.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them where it can) and selenium;
skipped with the reason where either is missing. Set ``UI_SCREENSHOTS`` to a folder (``docs``) to keep
the two screenshots it takes.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from graph.events import Order, OrderLine
from graph.store import GraphConfig, GraphStore
from tests.conftest import DATA, retail_events
from tests.kafka_helpers import CliProcess, WorkerProcess, replay, stream_env
from tests.test_end_to_end import most_co_purchased
from tests.test_streaming import producer_for

pytestmark = pytest.mark.broker
SAMPLE = DATA / "online_retail_ii_sample.csv.gz"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
if not (CHROMIUM and DRIVER):
    pytest.skip("no Chromium here: apt-get install chromium chromium-driver (make test does where it can)",
                allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def browser() -> "webdriver.Chrome":
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)


def never_bought_with(anchor: str) -> str:
    """An item of the sample that was never bought with ``anchor`` (it will be, by the test)."""
    store = GraphStore(GraphConfig())
    store.apply_all(retail_events(SAMPLE))
    row = store.items.index[anchor]
    together = set(store.co_neighbours(row)[0].tolist()) | {row}
    counts = store.item_order_counts()
    return next(store.items.ids[r] for r in sorted(range(store.num_items), key=lambda r: (-counts[r], r))
                if r not in together and store.catalog[r].has_text)


def test_explorer_search_bundles_live_update_and_cart(broker: str, tmp_path: Path) -> None:
    anchor, partner, _ = most_co_purchased()
    newcomer = never_bought_with(anchor)
    env = stream_env(broker, tmp_path / "state")
    env["BUNDLEGNN_STREAM__ENCODE_TEXT"] = "false"
    worker = WorkerProcess(env, tmp_path / "worker.log", "--model", "none").start()
    api = CliProcess(env, tmp_path / "api.log", "serve", "--model", "none", "--port", "0", ready="bundle API on")
    driver = None
    shots = Path(os.environ["UI_SCREENSHOTS"]) if os.environ.get("UI_SCREENSHOTS") else tmp_path
    try:
        assert replay(env, SAMPLE) > 200
        api.start()
        url = (tmp_path / "state" / "api.addr").read_text()
        deadline = time.monotonic() + 90
        while True:  # the worker has published the anchor's list, and the API has read it
            r = httpx.get(f"{url}/items/{anchor}/complements", params={"k": 50})
            if (r.is_success and partner in r.text) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.is_success and partner in r.text, r.text[:300]
        title = r.json()["item"]["title"]
        driver = browser()
        # the page re-renders a panel on each poll: an element found just before may be gone when read
        wait = WebDriverWait(driver, 60, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(f"{url}/ui")
        wait.until(lambda d: " lists " in d.find_element(By.ID, "status").text)

        # search by title words, open the anchor
        driver.find_element(By.ID, "q").send_keys(" ".join(title.split()[:2]).lower())
        hit = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#results li[data-id='{anchor}']"))
        hit[0].click()
        wait.until(lambda d: partner in d.find_element(By.ID, "complements").text
                   and d.find_elements(By.CSS_SELECTOR, "#bundles .bundle"))
        assert title in driver.find_element(By.ID, "item-title").text
        bundles = driver.find_element(By.ID, "bundles").text
        assert "bought together with" in bundles and "score" in bundles  # reasons and scores shown
        assert "refreshed" in driver.find_element(By.ID, "freshness").text
        assert newcomer not in driver.find_element(By.ID, "complements").text
        driver.save_screenshot(str(shots / "explorer-item.png"))

        # orders through Kafka: the open page changes by itself (it polls)
        now = datetime.now(timezone.utc)
        with producer_for(env, broker) as producer:
            for n in range(40):
                producer.send(Order(order_id=f"ui-{n}", user_id="ui-shopper", ts=now,
                                    items=[OrderLine(item_id=anchor), OrderLine(item_id=newcomer)]))
        wait.until(lambda d: newcomer in d.find_element(By.ID, "complements").text)

        # the cart: add the anchor, see bundles that complete it
        driver.find_element(By.CSS_SELECTOR, f"#item-title button[data-add='{anchor}']").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cart-bundles .bundle"))
        assert anchor in driver.find_element(By.ID, "cart").text
        driver.save_screenshot(str(shots / "explorer-cart.png"))
        # script errors only: the network log holds the 503s of /healthz while the view was starting
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
        assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        api.stop() if api.process else None
        worker.stop()
