"""The built book in a real browser (headless Chromium), read as a reader sees it: pages and
images load; at 1280 px no page shows raw markup, a box wider than its column, figure text
too small to read or `nan`; every method chapter ends with takeaways and exercises; at
400 px no page is wider than the screen. CI installs Chromium and sets
RMLIB_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _browser_or_skip():
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if webdriver is None or not CHROMIUM or not DRIVER:
        if os.environ.get("RMLIB_REQUIRE_BROWSER") == "1":
            pytest.fail("headless Chromium, chromedriver and selenium are required here")
        pytest.skip("no headless Chromium / chromedriver / selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture(scope="module")
def site(built_book):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(built_book))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def broken_images(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")


def chapter_pages() -> list[str]:
    """Every page of the book, in the order of _toc.yml (book/intro, book/problem, ...)."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]


MATH_PAGES = ("book/rank_merge", "book/rqt", "book/mcl", "book/rho", "book/baselines",
              "book/table1")
METHOD_CHAPTERS = MATH_PAGES  # each opens with what it teaches, ends with takeaways, exercises
MIN_PX_PER_FIGURE_INCH = 80  # 9 pt figure text then displays at 10 px or more
RAW_MARKUP = ("```", ":class:", "{admonition}", "{literalinclude}", "{eq}`", "{doc}`",
              "{glue", "{figure}", "$$", "\\begin{", "\\text{", "\\mathbf{", "\\phi")


def test_index_loads_with_its_images(browser, site):
    browser.get(site + "/index.html")  # redirects to the intro
    assert "Online Backfilling" in browser.title
    assert browser.current_url.endswith("book/intro.html")
    assert broken_images(browser) == []


def typeset(browser) -> None:
    """Wait until MathJax (served with the book) has typeset the page."""
    browser.set_script_timeout(30)
    browser.execute_async_script(  # a page without MathJax's script has nothing to typeset
        "const done = arguments[arguments.length - 1];"
        "if (!document.querySelector('script[src*=mathjax]')) { done(false); return; }"
        "const wait = () => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
        "  ? MathJax.startup.promise.then(() => done(true)) : setTimeout(wait, 100);"
        "wait();")


@pytest.mark.parametrize("page", MATH_PAGES)
def test_method_chapters_show_numbered_rendered_equations(browser, site, page):
    browser.get(f"{site}/{page}.html")
    typeset(browser)
    rendered = browser.execute_script("return document.querySelectorAll('mjx-container').length;")
    numbered = browser.execute_script(
        "return document.querySelectorAll('div.math-wrapper, div.math').length;")
    assert rendered >= 1 and numbered >= 1, (page, rendered, numbered)
    text = browser.find_element("tag name", "main").text
    for raw in ("$$", "\\frac", "\\mathrm", "\\begin{"):
        assert raw not in text, (page, raw)


def test_table1_page_shows_an_html_table_with_every_row(browser, site):
    from rmlib.methods.registry import TABLE1_ROWS

    browser.get(site + "/book/table1.html")
    tables = browser.find_elements("css selector", "table.rmlib-results")
    assert tables, "no results table on the Table 1 page"
    heads = [th.text for th in tables[0].find_elements("css selector", "tbody th")]
    assert heads == list(TABLE1_ROWS)
    assert "Profile" in browser.find_element("tag name", "main").text
    assert browser.execute_script("return document.images.length;") >= 2
    assert broken_images(browser) == []


# The page's text as a reader reads it (innerText of the live page: what is rendered, with
# its line breaks), with the elements that match arguments[0] hidden for the moment.
PROSE_JS = """
const hide = document.createElement('style');
hide.textContent = arguments[0] + ' { display: none !important; }';
document.head.appendChild(hide);
const text = document.querySelector('article.bd-article').innerText;
hide.remove();
return text;
"""
CODE = "div.cell_input, div.literal-block-wrapper, div[class*='highlight-']:not(.output)"

# Boxes that stick out of the text column, or whose content is wider than the box.
OVERFLOW_JS = """
const column = document.querySelector('article.bd-article').getBoundingClientRect();
const out = [];
document.querySelectorAll(
    'article.bd-article pre, article.bd-article table, article.bd-article img, '
    + 'article.bd-article mjx-container[display="true"], article.bd-article div.cell_output'
).forEach(e => {
  const box = e.getBoundingClientRect();
  if (box.width === 0) return;  // in a closed dropdown
  const inner = e.tagName === 'PRE' || e.tagName === 'MJX-CONTAINER'
      || e.classList.contains('cell_output');
  if (box.right > column.right + 1 || box.left < column.left - 1
      || (inner && e.scrollWidth > e.clientWidth + 1)) {
    out.push(e.tagName.toLowerCase() + ' ' + Math.round(Math.max(box.width, e.scrollWidth))
             + ' px in a ' + Math.round(column.width) + ' px column: '
             + (e.innerText || e.getAttribute('src') || '').slice(0, 60));
  }
});
return out;
"""

FIGURES_JS = """
return Array.from(document.querySelectorAll('article.bd-article div.cell_output img'))
  .filter(i => i.clientWidth > 0)
  .map(i => [i.getAttribute('src'), i.clientWidth, i.naturalWidth]);
"""


def figure_dpi(built_book: Path, page: str, src: str) -> float | None:
    """The pixel density a PNG of the page was drawn at (matplotlib records it)."""
    from PIL import Image

    path = (built_book / page).parent / src
    if path.suffix.lower() != ".png" or not path.is_file():
        return None
    dpi = Image.open(path).info.get("dpi")
    return float(dpi[0]) if dpi else None


def what_a_reader_would_flag(browser, built_book: Path, page: str) -> list[str]:
    """Everything on a page, at the current window width, that a reader would call broken."""
    problems = []
    prose = browser.execute_script(PROSE_JS, CODE + ", div.cell_output")
    problems += [f"raw markup {raw!r}" for raw in RAW_MARKUP if raw in prose]
    shown = browser.execute_script(PROSE_JS, CODE)
    problems += [f"nan shown: {m.group(0)!r}" for m in
                 re.finditer(r".{0,30}\bnan\b%?.{0,10}", shown, flags=re.IGNORECASE)]
    problems += browser.execute_script(OVERFLOW_JS)
    for src, shown_px, natural_px in browser.execute_script(FIGURES_JS):
        dpi = figure_dpi(built_book, page, src)
        if dpi and natural_px and shown_px / (natural_px / dpi) < MIN_PX_PER_FIGURE_INCH:
            problems.append(f"figure {src}: {shown_px / (natural_px / dpi):.0f} px per "
                            f"figure inch, text too small to read")
    return problems


@pytest.mark.parametrize("page", chapter_pages())
def test_every_page_loads_and_at_1280_px_shows_no_raw_markup_overflow_tiny_text_or_nan(
        browser, site, built_book, page):
    browser.set_window_size(1280, 1000)
    browser.get(f"{site}/{page}.html")
    main = browser.find_element("tag name", "main").text
    assert len(main) > 200, f"{page} is (nearly) empty"
    assert "Traceback" not in main, page
    assert broken_images(browser) == [], page
    typeset(browser)
    assert what_a_reader_would_flag(browser, built_book, f"{page}.html") == [], page


@pytest.mark.parametrize("page", METHOD_CHAPTERS)
def test_method_chapters_open_with_what_they_teach_and_end_with_takeaways_and_exercises(
        browser, site, page):
    browser.get(f"{site}/{page}.html")
    headings = [h.text.strip() for h in browser.find_elements("css selector", "article h2")]
    assert any("Key takeaways" in h for h in headings), (page, headings)
    assert any("Exercises" in h for h in headings), (page, headings)
    opening = browser.find_elements("css selector", "article div.admonition")
    assert opening and "learn" in opening[0].text.lower(), page
    # every exercise has its solution, collapsed, and the solution ran (it has an output)
    solutions = browser.execute_script(
        "return Array.from(document.querySelectorAll("
        "  'section#exercises div.cell.tag_hide-cell'))"
        ".map(c => (c.querySelector('div.cell_output') || {}).textContent || '');")
    assert len(solutions) >= 3, (page, len(solutions))
    assert all(text.strip() for text in solutions), (page, "a solution without output")


def test_a_reader_on_a_400_px_phone_never_scrolls_the_page_sideways(browser, site):
    wide = {}
    try:
        browser.set_window_size(400, 900)
        for page in chapter_pages():
            browser.get(f"{site}/{page}.html")
            typeset(browser)
            width = browser.execute_script(  # the page, and the article's own box
                "const a = document.querySelector('div.bd-article-container');"
                "return [document.documentElement.scrollWidth - window.innerWidth,"
                "        a.scrollWidth - a.clientWidth];")
            if max(width) > 1:
                wide[page] = width  # px the page, the article scroll sideways
    finally:
        browser.set_window_size(1280, 1000)
    assert wide == {}, wide
