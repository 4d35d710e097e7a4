"""Headless Chromium for the report tests: a screenshot, and what the page did when it loaded
(every <img> decoded? any error event or console.error?), read back through --dump-dom.

No DevTools client needed: a small script injected at the top of a copy of the page records
errors from the start and, on the load event, writes its findings into the DOM, which
``--dump-dom`` prints once the page has settled (``--virtual-time-budget``). Network access is
mapped to nothing, so a page that needed the network would fail here with an error.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

TIMEOUT_S = 180
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? e.target.tagName + ' ' + (e.target.alt || e.target.src || '').slice(0, 60) : '';
  window.__errors.push(String(e.message || ('failed to load ' + t)));
}, true);
(function () {
  var orig = console.error;
  console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); };
})();
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {images: imgs.length,
             undecoded: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
             errors: window.__errors};
  var pre = document.createElement('pre');
  pre.id = '__browser_check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def find_chromium() -> Optional[str]:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={workdir / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def check_page(browser: str, page: Path) -> dict:
    """{"images": n, "undecoded": [alt, ...], "errors": [...]} for ``page`` as Chromium loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probed = tmp / page.name
        text = page.read_text(encoding="utf-8")
        probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
        proc = _run(browser, ["--virtual-time-budget=20000", "--dump-dom", probed.as_uri()], tmp)
    found = re.search(r'<pre id="__browser_check">(.*?)</pre>', proc.stdout, re.S)
    if not found:
        raise AssertionError(f"Chromium printed no check result (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}")
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser: str, page: Path, out: Path, width: int = 1200, height: int = 4000) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run(browser, ["--hide-scrollbars", f"--window-size={width},{height}", "--virtual-time-budget=20000",
                              f"--screenshot={out}", page.as_uri()], Path(tmp))
    if not out.is_file():
        raise AssertionError(f"Chromium wrote no screenshot (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}")
    return out
