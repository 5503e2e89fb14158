"""The documentation site, built with warnings as errors and opened in a real
browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The site is built into a temporary folder and served on 127.0.0.1. Every page
must load with no console error and no failed request, and without asking any
other host for anything (every such request is blocked and recorded). The
search finds ``scale_by_amsgrad``; the API pages hold an anchor for every
public name; each notebook page shows its plots, decoded, and its math,
typeset; every link inside the site, and its ``#fragment``, resolves.

Screenshots of the index, an API page, a notebook and a search result go to
``docs/_build/screenshots`` (or ``$OPTAX_AMSGRAD_SCREENSHOTS``).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("OPTAX_AMSGRAD_CHROMIUM", "/usr/bin/chromium")
# No network of its own: no QUIC, no background fetches, no component or sync
# updates, so that every request the test sees comes from the page.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MODULES = ("optax_amsgrad", "optax_amsgrad.checkpoint", "optax_amsgrad.problems",
           "optax_amsgrad.interop")


def _missing(what: str) -> None:
  # In CI a missing browser or driver is a failure, not a skip.
  if os.environ.get("CI"):
    pytest.fail(f"{what} is missing: .ci/run installs it")
  pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The site, built as the README says, with warnings as errors."""
  try:
    import myst_nb  # noqa: F401
    import sphinx  # noqa: F401
  except ImportError:
    _missing("sphinx or myst-nb (the docs extra)")
  out = tmp_path_factory.mktemp("site") / "html"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs",
       str(out)],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format: str, *args: Any) -> None:
    pass


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
  handler = functools.partial(_QuietHandler, directory=str(site))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
  finally:
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    _missing("playwright (the docs extra)")
  if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    _missing(f"chromium ({CHROMIUM})")
  with sync_playwright() as playwright:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      yield chromium
    finally:
      chromium.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
  folder = Path(os.environ.get("OPTAX_AMSGRAD_SCREENSHOTS", ROOT / "docs/_build/screenshots"))
  folder.mkdir(parents=True, exist_ok=True)
  return folder


class Visit:
  """What one page did while it loaded, and what it holds."""

  def __init__(self) -> None:
    self.console_errors: list[str] = []
    self.page_errors: list[str] = []
    self.failed: list[str] = []
    self.outside: list[str] = []
    self.bad_status: list[str] = []
    self.ids: set[str] = set()
    self.links: list[str] = []


class Browser:
  """One page that records, per visit, what the page did while it loaded."""

  def __init__(self, context: Any, origin: str) -> None:
    self.origin = origin
    self.visit = Visit()
    self.page = context.new_page()
    self.page.on("console", self._console)
    self.page.on("pageerror", lambda error: self.visit.page_errors.append(str(error)))
    self.in_flight: set[str] = set()
    self.page.on("request", self._request)
    self.page.on("requestfinished", lambda r: self.in_flight.discard(r.url))
    self.page.on("requestfailed", self._failed)
    self.page.on("response", self._response)

  def _console(self, message: Any) -> None:
    if message.type == "error":
      self.visit.console_errors.append(message.text)

  def _request(self, request: Any) -> None:
    self.in_flight.add(request.url)
    if not request.url.startswith((self.origin, "data:", "blob:", "about:")):
      self.visit.outside.append(request.url)

  def _failed(self, request: Any) -> None:
    self.in_flight.discard(request.url)
    self.visit.failed.append(f"{request.url} ({request.failure})")

  def _response(self, response: Any) -> None:
    if response.status >= 400:
      self.visit.bad_status.append(f"{response.url} ({response.status})")

  def open(self, url: str) -> Visit:
    """Opens ``url``, waits for it, its math and its fonts, and reads its anchors and links."""
    self.visit = visit = Visit()
    self.page.goto(url, wait_until="load")
    self.page.evaluate("""async () => {
      if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
        await MathJax.startup.promise;
      }
      await document.fonts.ready;
    }""")
    # The browser asks for the favicon after the load event; leaving the page
    # before it arrives would abort it and blame the next page. So wait until
    # the network is quiet and every request this page made has ended.
    self.page.wait_for_load_state("networkidle")
    deadline = time.monotonic() + 10
    while self.in_flight and time.monotonic() < deadline:
      self.page.wait_for_timeout(50)
    visit.failed += [f"{url} (never finished)" for url in sorted(self.in_flight)]
    self.in_flight.clear()
    visit.ids = set(self.page.evaluate(
        "() => [...document.querySelectorAll('[id]')].map(e => e.id)"
        ".concat([...document.querySelectorAll('a[name]')].map(e => e.name))"))
    visit.links = self.page.evaluate(
        "() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    return visit


def _pages(site: Path) -> list[str]:
  return sorted(str(path.relative_to(site)) for path in site.rglob("*.html")
                if not str(path.relative_to(site)).startswith("_static/"))


@pytest.fixture(scope="module")
def crawl(site: Path, server: str, browser: Any,
          screenshots: Path) -> dict[str, Visit]:
  """Every page of the site, opened once."""
  context = browser.new_context(viewport={"width": 1280, "height": 900})
  visits: dict[str, Visit] = {}
  try:
    tab = Browser(context, server)
    for relative in _pages(site):
      visits[relative] = tab.open(server + relative)
      if relative in ("index.html", "api/optax_amsgrad.html",
                      "notebooks/01_adam_vs_amsgrad.html"):
        name = relative.replace("/", "_").replace(".html", ".png")
        if relative == "notebooks/01_adam_vs_amsgrad.html":
          tab.page.locator("div.cell_output img").first.scroll_into_view_if_needed()
        tab.page.screenshot(path=str(screenshots / name))
  finally:
    context.close()
  return visits


def test_every_page_loads_cleanly_and_only_from_the_site(crawl: dict[str, Visit]):
  assert len(crawl) >= 20, sorted(crawl)
  problems = {}
  for relative, visit in crawl.items():
    found = {
        "console errors": visit.console_errors, "page errors": visit.page_errors,
        "failed requests": visit.failed, "requests to other hosts": visit.outside,
        "HTTP errors": visit.bad_status,
    }
    found = {kind: items for kind, items in found.items() if items}
    if found:
      problems[relative] = found
  assert not problems, json.dumps(problems, indent=1)


def test_every_internal_link_and_fragment_resolves(crawl: dict[str, Visit], site: Path,
                                                   server: str):
  broken = []
  checked = 0
  for relative, visit in crawl.items():
    for link in visit.links:
      if not link.startswith(server):
        continue
      target, fragment = urldefrag(link)
      path = unquote(urlsplit(target).path).lstrip("/")
      if not path or path.endswith("/"):
        path += "index.html"
      checked += 1
      if path in crawl:
        if fragment and unquote(fragment) not in crawl[path].ids:
          broken.append(f"{relative}: {link} (no #{fragment} there)")
      elif not (site / path).is_file():
        broken.append(f"{relative}: {link} (no such file)")
      elif fragment:
        broken.append(f"{relative}: {link} (a fragment of a file that is not a page)")
  assert checked > 500, checked
  assert not broken, "\n".join(broken)


def test_api_pages_hold_an_anchor_for_every_public_name(crawl: dict[str, Visit]):
  sys.path.insert(0, str(ROOT / "docs" / "_ext"))
  try:
    from api_coverage import public_names
  finally:
    sys.path.pop(0)
  anchors = set().union(*(visit.ids for relative, visit in crawl.items()
                          if relative.startswith("api/")))
  expected = [f"{module}.{name}" for module in MODULES for name in public_names(module)]
  assert len(expected) >= 35, expected
  missing = [name for name in expected if name not in anchors]
  assert not missing, missing


def test_notebook_pages_show_their_plots_and_math(site: Path, server: str, browser: Any):
  notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
  assert len(notebooks) >= 4
  context = browser.new_context()
  try:
    tab = Browser(context, server)
    page = tab.page
    for notebook in notebooks:
      cells = json.loads(notebook.read_text())["cells"]
      plots = sum("image/png" in output.get("data", {})
                  for cell in cells for output in cell.get("outputs", []))
      has_math = any("$" in "".join(cell["source"]) for cell in cells
                     if cell["cell_type"] == "markdown")
      visit = tab.open(f"{server}notebooks/{notebook.stem}.html")
      images = page.evaluate("""() => [...document.querySelectorAll('div.cell_output img')]
          .map(img => ({complete: img.complete, width: img.naturalWidth}))""")
      assert plots >= 1, notebook.name
      assert len(images) == plots, (notebook.name, images)
      assert all(image["complete"] and image["width"] > 0 for image in images), (
          notebook.name, images)
      math = page.evaluate("""() => [...document.querySelectorAll('.math')]
          .map(e => e.querySelector('mjx-container') !== null)""")
      if has_math:
        assert math, f"{notebook.name}: no math on the page"
      assert all(math), f"{notebook.name}: {math.count(False)} of {len(math)} not typeset"
      assert not visit.console_errors and not visit.outside, (notebook.name, visit.__dict__)
  finally:
    context.close()


def test_search_finds_scale_by_amsgrad(server: str, browser: Any, screenshots: Path):
  context = browser.new_context(viewport={"width": 1280, "height": 900})
  try:
    tab = Browser(context, server)
    page = tab.page
    visit = tab.open(server + "search.html?q=scale_by_amsgrad")
    results = page.locator("#search-results ul.search li a")
    deadline = time.monotonic() + 30
    while results.count() == 0 and time.monotonic() < deadline:
      page.wait_for_timeout(200)
    hrefs = [results.nth(i).get_attribute("href") for i in range(results.count())]
    page.screenshot(path=str(screenshots / "search_scale_by_amsgrad.png"))
    assert any("api/optax_amsgrad.html#optax_amsgrad.scale_by_amsgrad" in (href or "")
               for href in hrefs), hrefs
    assert not visit.console_errors and not visit.outside, visit.__dict__
  finally:
    context.close()
