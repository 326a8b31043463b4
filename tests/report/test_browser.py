"""The report as a reader sees it: a small end-to-end run rendered in headless Chromium.

Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/run``) are driven through Selenium.
Without them the tests skip and say why. Pages are checked when opened from disk and from a plain HTTP
server: HTML tables present, no Markdown table syntax left, every image loaded, every link pointing at
a file (and anchor) that exists, no console errors.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from tests.helpers import save_tiny_model, snakemake

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

PROMPTS = {"prompts": [
    {"id": "s1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "s2", "category": "story", "text": "The dog ran to the"},
    {"id": "a1", "category": "animals", "text": "A big cat"},
    {"id": "p1", "category": "park", "text": "Tom and Sue went to the park."},
]}


def _driver():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does this where it can)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir):
    """A two-model run with a prompt experiment, a weights experiment and the cross-model pair."""
    workdir = tmp_path_factory.mktemp("report_run")
    tiny = save_tiny_model("llama", workdir / "tinyllama", stories_dir)
    (workdir / "prompts.json").write_text(json.dumps(PROMPTS))
    config = {
        "models": {"stories": {"source": {"type": "local", "path": str(stories_dir)}},
                   "tinyllama": {"source": {"type": "local", "path": str(tiny)}}},
        "prompt_sets": {"tiny": {"path": "prompts.json"}},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "activations": {"batch_size": 4},
        "experiments": {"logit_lens": {"topk": 5, "max_phases": 2},
                        "weight_spectra": {},
                        "cross_model": {}},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture(scope="module")
def browser():
    driver = _driver()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(run):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(run))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _check_page(browser, url: str, root: Path, page: Path, screenshot: Path) -> dict:
    browser.get(url)
    browser.save_screenshot(str(screenshot))
    facts = browser.execute_script("""
        const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
        const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
        const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
        return {tables: document.querySelectorAll('table').length, text: document.body.innerText,
                imgs, links, ids, svgs: document.querySelectorAll('svg.spark').length,
                figcaptions: [...document.querySelectorAll('figcaption')].map(f => f.innerText)};
    """)
    assert facts["tables"] > 0, f"{url}: no HTML table"
    text = facts["text"]
    assert "|---|" not in text and not any(line.lstrip().startswith("| ") for line in text.splitlines()), \
        f"{url}: Markdown table syntax left in the page"
    broken = [i["src"] for i in facts["imgs"] if not i["ok"]]
    assert not broken, f"{url}: images that did not load: {broken}"
    for href in facts["links"]:
        target, _, fragment = href.partition("#")
        if not target:
            assert fragment in facts["ids"], f"{url}: link to a missing anchor #{fragment}"
            continue
        assert not urlparse(target).scheme, f"{url}: link leaves the report: {href}"
        file = (page.parent / unquote(target)).resolve()
        assert file.is_file() and root.resolve() in file.parents, f"{url}: link to a missing file {href}"
        if fragment and file.suffix == ".html":
            assert f'id="{fragment}"' in file.read_text(), f"{url}: {href}: no element with id {fragment!r}"
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"{url}: console errors: {errors}"
    return facts


@pytest.mark.parametrize("via", ["file", "http"])
def test_index_and_model_pages_render_cleanly(run, browser, server, via, tmp_path):
    report = run / "results" / "report"
    for name in ("index.html", "stories.html", "provenance.html"):
        page = report / name
        url = page.as_uri() if via == "file" else f"{server}/results/report/{name}"
        facts = _check_page(browser, url, run / "results", page, tmp_path / f"{page.stem}.png")
        assert (tmp_path / f"{page.stem}.png").stat().st_size > 10_000
        if name == "index.html":
            # a row per model, key numbers with intervals, the CKA heat map of the pair
            assert "stories" in facts["text"] and "tinyllama" in facts["text"]
            assert "crystallization_mean" in facts["text"] and "[" in facts["text"]
            assert any("cka" in i["src"] for i in facts["imgs"])
        if name == "stories.html":
            # lists are never dumped; figures are captioned from their caption files
            assert not any(line.count(",") > 10 and line.strip().startswith("[") for line in facts["text"].splitlines())
            assert facts["figcaptions"] and all(len(c) > 40 for c in facts["figcaptions"])
            assert "Notes" in facts["text"] or "Intervals:" in facts["text"]
        if name == "provenance.html":
            for needle in ("torch", "transformers", "snakemake", "logit_lens", "peak RSS", "max_new_tokens"):
                assert needle in facts["text"], needle
