"""Open the built documentation in headless Chromium: each checked page renders, no broken image.

``make docs-check`` runs this after ``make docs``. The site is served on a local port;
Chromium loads a check page that opens each page in a frame of the same origin and
reports, per page, its title, its first heading, how much text it shows and which images
did not load. It then takes a screenshot of the home page. Exit status 1 on any fault.

Chromium comes from the system's packages (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGES = ("index.html", "api.html", "guide/quickstart.html", "guide/performance.html")
MIN_TEXT = 400  # characters a rendered page shows at least
CHECK_PATH = "/__check__.html"

# Loads each page in a same-origin frame, then writes a JSON report into <pre id="report">.
CHECK_PAGE = """<!doctype html><html><body><pre id="report">pending</pre><script>
const pages = %s, report = {};
function inspect(page, frame) {
  const doc = frame.contentDocument, heading = doc.querySelector("h1");
  const images = Array.from(doc.images);
  report[page] = {
    title: doc.title, heading: heading ? heading.textContent : null,
    text: doc.body ? doc.body.innerText.length : 0, images: images.length,
    broken: images.filter(image => !(image.complete && image.naturalWidth > 0))
                  .map(image => image.getAttribute("src")),
  };
  if (Object.keys(report).length === pages.length)
    document.getElementById("report").textContent = JSON.stringify(report);
}
for (const page of pages) {
  const frame = document.createElement("iframe");
  frame.style.width = "1200px"; frame.style.height = "900px";
  frame.onload = () => inspect(page, frame);
  frame.src = page;
  document.body.appendChild(frame);
}
</script></body></html>"""


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != CHECK_PATH:
            super().do_GET()
            return
        body = (CHECK_PAGE % json.dumps(["/" + page for page in PAGES])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium: install it from the system's packages (apt-get install chromium)")


def _browse(browser: str, url: str, *options: str) -> str:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--virtual-time-budget=20000", *options, url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        sys.exit(f"Chromium failed on {url}:\n{result.stderr[-2000:]}")
    return result.stdout


def faults(report: dict[str, dict]) -> list[str]:
    """What is wrong with each page of the report."""
    found = []
    for page in PAGES:
        seen = report.get("/" + page)
        if seen is None:
            found.append(f"{page}: did not load")
            continue
        if not seen["heading"] or seen["text"] < MIN_TEXT:
            found.append(
                f"{page}: nothing rendered (heading {seen['heading']!r}, {seen['text']} characters)"
            )
        found += [f"{page}: broken image {source}" for source in seen["broken"]]
    if not report.get("/guide/performance.html", {}).get("images"):
        found.append("guide/performance.html: the bench's charts are missing")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (docs/_build/html)")
    parser.add_argument("--screenshot", type=Path, required=True, help="PNG of the home page")
    args = parser.parse_args()
    if not (args.site / "index.html").is_file():
        sys.exit(f"no {args.site / 'index.html'}: run make docs first")
    browser = chromium()
    handler = functools.partial(_Handler, directory=str(args.site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dom = _browse(browser, base + CHECK_PATH, "--dump-dom")
        match = re.search(r'<pre id="report">(.*?)</pre>', dom, re.S)
        if match is None or match.group(1) == "pending":
            sys.exit("the check page did not finish: a page did not load in time")
        report = json.loads(html.unescape(match.group(1)))
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        _browse(browser, base + "/index.html", f"--screenshot={args.screenshot.resolve()}",
                "--window-size=1280,1000")  # fmt: skip
    finally:
        server.shutdown()
    for page, seen in report.items():
        print(f"{page}: {seen['title']!r}, {seen['text']} characters, {seen['images']} images")
    problems = faults(report)
    if problems:
        sys.exit("docs-check failed:\n" + "\n".join(problems))
    print(f"docs-check passed; home page screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
