"""The report as a person sees it: index.html in headless Chromium (Debian's ``chromium``).

A copy of the page with a small check script (``index.check.html``, beside it so relative figure
paths resolve) is loaded with ``--dump-dom``: on ``load`` the script writes into ``<body>`` how
many images there are, which did not load (``naturalWidth == 0``) and which errors were raised
(failed resources, ``console.error``, uncaught exceptions). Console messages also reach stderr as
``CONSOLE`` lines (``--enable-logging=stderr``); the report has no scripts, so any is a failure.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import make_tables as M

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]
CHECK = """<script>(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t.getAttribute && t.getAttribute("src") ? "failed to load " + t.getAttribute("src") : String(e.message));
  }, true);
  var consoleError = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, " ")); consoleError.apply(console, arguments); };
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                       .map(function (i) { return i.getAttribute("src"); });
    var b = document.body;
    b.setAttribute("data-images", String(images.length));
    b.setAttribute("data-broken", JSON.stringify(broken));
    b.setAttribute("data-errors", JSON.stringify(errors));
    b.setAttribute("data-check-done", "1");
  });
})();</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"headless Chromium not found at {CHROMIUM}: install Debian's package ({INSTALL})")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def check_page(page: Path, tmp: Path) -> dict:
    """Load ``page`` (with the check script injected) and return images, broken, errors, console."""
    source = page.read_text()
    checked = page.with_name(page.stem + ".check.html")
    checked.write_text(re.sub(r"(<head[^>]*>)", lambda m: m.group(1) + CHECK, source, count=1))
    proc = chromium(["--dump-dom", checked.as_uri()], tmp / "profile-check")
    body = re.search(r"<body([^>]*)>", proc.stdout)
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))} if body else {}
    assert attrs.get("check-done") == "1", f"page did not finish loading; rc {proc.returncode}, stderr:\n{proc.stderr[-2000:]}"
    return {"images": int(attrs["images"]), "broken": json.loads(attrs["broken"]), "errors": json.loads(attrs["errors"]),
            "console": [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]}


def test_report_renders_with_every_image_and_no_console_error(tmp_path_factory, tmp_path):
    built = M.fake_report(tmp_path_factory)
    index = built["index"]
    result = check_page(index, tmp_path)
    assert result["images"] == built["html"].count("<img ") >= 9  # every figure of every section
    assert result["broken"] == [], f"images that did not load: {result['broken']}"
    assert result["errors"] == [] and result["console"] == [], (result["errors"], result["console"])

    shot = tmp_path / "report.png"
    proc = chromium([f"--screenshot={shot}", "--window-size=1200,3000", index.as_uri()], tmp_path / "profile-shot")
    assert shot.exists(), proc.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    print(f"screenshot: {shot}")


def test_check_catches_a_broken_image_and_a_console_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    '<img src="figures/missing.png"><script>console.error("boom")</script></body></html>')
    result = check_page(page, tmp_path)
    assert result["images"] == 1 and result["broken"] == ["figures/missing.png"]
    assert "boom" in result["errors"] and "failed to load figures/missing.png" in result["errors"]
    assert any('"boom"' in line for line in result["console"])
