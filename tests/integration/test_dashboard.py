"""The /dashboard page in a real headless Chromium (Debian's `chromium`, driven by playwright): the
page and its script come from the package, it asks for the API key the browser way (HTTP Basic),
renders both models, and keeps updating its arena chart and table while requests run. The last
frame is saved as a screenshot (to $ONEIROS_DASHBOARD_SCREENSHOT as well when set, which is how
docs/dashboard.png is made)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from oneiros.config import EngineConfig
from oneiros.engine.engine import LLMEngine
from oneiros.server.app import build_app
from oneiros.server.async_engine import AsyncLLMEngine
from tests.helpers import ServerThread, tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "dash-key"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (Debian package `chromium`; `make test` installs it "
                "with apt-get where it can)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = str(tiny_llama_dir(tmp_path_factory.mktemp("tiny")))
    e = LLMEngine(EngineConfig(models={"chat": path, "code": path}, memory_budget="256MiB",
                               max_model_len=256))
    ae = AsyncLLMEngine(e)
    with ServerThread(build_app(ae, api_key=KEY)) as s:
        yield s
    asyncio.run(ae.shutdown(0))


def load(url: str, stop: threading.Event) -> None:
    """A small steady load on both models until `stop`."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        k = 0
        while not stop.is_set():
            h.post("/v1/completions", json={"model": ("chat", "code")[k % 2], "prompt": "Hi",
                                            "max_tokens": 40, "ignore_eos": True, "n": 3})
            k += 1


def test_dashboard_renders_models_and_updates(server: ServerThread, tmp_path: Path) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=load, args=(server.url, stop), daemon=True)
    worker.start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                r = httpx.get(server.url + "/dashboard")  # a browser is asked for the key
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
                context = browser.new_context(
                    http_credentials={"username": "me", "password": KEY},
                    viewport={"width": 1280, "height": 900},
                )
                page = context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                assert page.goto(server.url + "/dashboard?interval=250").status == 200
                page.wait_for_function(
                    "Number(document.getElementById('polls').textContent) >= 3", timeout=30_000
                )
                rows = page.locator("#models tbody tr")
                assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.model)")) == [
                    "chat", "code"]
                assert page.locator("#status").text_content() == "ok"
                first = int(page.locator("canvas#arena").get_attribute("data-samples"))
                page.wait_for_function(
                    f"Number(document.getElementById('arena').dataset.samples) >= {first + 4}",
                    timeout=30_000,
                )
                legend = page.locator("#legend").text_content() or ""
                assert "chat kv" in legend and "code slab" in legend and "free" in legend
                # The chart has pixels of more than one owner colour (it drew the areas).
                colours = page.evaluate("""() => {
                    const c = document.getElementById('arena');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    const seen = new Set();
                    for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] + ',' + d[i+1]);
                    return seen.size; }""")
                assert colours >= 3
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                target = os.environ.get("ONEIROS_DASHBOARD_SCREENSHOT")
                if target:
                    shutil.copy(shot, target)
                assert errors == []
            finally:
                browser.close()
    finally:
        stop.set()
        worker.join(120)
