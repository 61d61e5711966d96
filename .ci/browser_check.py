"""The course's interactive views in a real browser: JupyterLab + headless Chromium, offline (`make browser-check`).

Starts JupyterLab on 127.0.0.1 with a token, opens ``browser_check.ipynb`` (chapter 01's two views on a prepared
smoke phantom scan), runs every cell, then checks what a learner sees:

- the slice browser opens on a slice with nodule contours, fits a 1100 x 900 window with its slider, and its image
  changes when the slider moves;
- the NiiVue canvas is not blank and shows the nodule overlay (red pixels);
- no console error, no page error, and no request to any host but 127.0.0.1 (every other request is blocked).

Screenshots go to ``runs/browser-check/``; every process this script starts is stopped. Exit status 0 only if
every check passed. Playwright drives the system's Chromium (``executable_path``): ``playwright install`` would
download a browser, and these machines reach only the package registries.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "browser-check"
WINDOW = {"width": 1100, "height": 900}
TIMEOUT_S = 300  # for the kernel to start and run the notebook (the smoke data are prepared before)


def prepare_data() -> None:
    """The smoke phantom data the notebook reads, prepared here so no cell waits on it."""
    subprocess.run([sys.executable, "-c", "from lungsynth.config import get_config; "
                    "from lungsynth.data.datasets import ensure_prepared; ensure_prepared(get_config('smoke'))"],
                   check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab in its own process group (stopped with it), serving ``root``."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # containers and CI runners often run as root
        cmd.append("--allow-root")
    log = open(OUT / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "LUNGSYNTH_PROFILE": "smoke", "JUPYTER_CONFIG_DIR": str(root / ".jupyter")})
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({proc.returncode}); see {OUT / 'jupyterlab.log'}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"JupyterLab did not answer on port {port} in 120 s; see {OUT / 'jupyterlab.log'}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the process group (JupyterLab and its kernels)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def image_stats(png: bytes) -> tuple[float, float]:
    """(grey-level std, share of clearly red pixels) of a screenshot."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r > 150) & (r > g + 60) & (r > b + 60)
    return float(rgb.mean(axis=2).std()), float(red.mean())


class CheckFailed(Exception):
    """A view that did not appear or did not behave; the message says which."""


def expect(locator, what: str, timeout_s: float, state: str = "visible") -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(state=state, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        raise CheckFailed(f"{what} did not appear in {timeout_s:.0f} s") from None


def run_all_cells(page) -> None:
    """Run every cell from the menu, as a learner would, and wait until the last code cell has run."""
    expect(page.locator(".jp-StatusBar-TextItem", has_text="Idle").first, "the kernel (status 'Idle')", TIMEOUT_S)
    done = page.locator(".jp-CodeCell .jp-InputPrompt", has_text=re.compile(r"\[[0-9]+\]"))
    started = page.locator(".jp-CodeCell .jp-InputPrompt", has_text=re.compile(r"\[[0-9*]+\]"))
    for _ in range(3):  # a click that lands before the kernel's session is connected runs nothing
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            expect(started.first, "a running cell", 20)
            break
        except CheckFailed:
            continue
    n_code = page.locator(".jp-CodeCell").count()
    traceback = page.locator(".jp-OutputArea-output", has_text="Traceback")
    for _ in range(TIMEOUT_S // 2):
        if traceback.count():
            raise CheckFailed(f"a cell failed: {traceback.first.inner_text()[-400:]}")
        if done.count() == n_code:
            return
        page.wait_for_timeout(2000)
    raise CheckFailed(f"the notebook's {n_code} code cells did not all run in {TIMEOUT_S} s")


def run_checks(page, failures: list[str]) -> None:
    run_all_cells(page)
    slider_image = page.locator(".jupyter-widgets.widget-image").first
    expect(slider_image, "the slice browser's image", 30)
    canvas = page.locator(".jp-OutputArea canvas").first
    expect(canvas, "the NiiVue canvas", 30)
    page.wait_for_timeout(5000)  # NiiVue loads the NIfTI files and draws
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's "notified about news?" toast
    if news.count():
        news.first.click()

    box = page.locator(".jupyter-widgets.widget-vbox").first
    box.scroll_into_view_if_needed()
    box.screenshot(path=str(OUT / "slice_browser.png"))
    size = box.bounding_box()
    if size is None or size["width"] > WINDOW["width"] or size["height"] > WINDOW["height"]:
        failures.append(f"the slice browser does not fit a {WINDOW['width']} x {WINDOW['height']} window: {size}")
    _, red = image_stats(slider_image.screenshot())
    if red == 0:
        failures.append("the slice browser opened on a slice without nodule contours (no red pixel)")
    before = slider_image.get_attribute("src")
    handle = page.locator(".jupyter-widgets.widget-slider .noUi-handle").first
    handle.focus()
    for _ in range(3):
        handle.press("ArrowRight")
    page.wait_for_timeout(3000)
    if slider_image.get_attribute("src") == before:
        failures.append("moving the slider did not change the slice browser's image")

    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(2000)
    shot = canvas.screenshot(path=str(OUT / "niivue.png"))
    std, red = image_stats(shot)
    if std < 10:
        failures.append(f"the NiiVue canvas is blank (grey-level std {std:.1f})")
    if red == 0:
        failures.append("the NiiVue canvas shows no nodule overlay (no red pixel)")
    print(f"slice browser {size['width']:.0f} x {size['height']:.0f} px; NiiVue canvas std {std:.1f}, "
          f"red pixels {red:.3%}")


def main() -> int:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no system chromium; `make browser-check` installs Debian's (apt-get install chromium)")
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    prepare_data()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(Path(__file__).with_name("browser_check.ipynb"), root / "browser_check.ipynb")
        port, token = free_port(), secrets.token_hex(16)
        lab = start_lab(root, port, token)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=[
                    "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
                context = browser.new_context(viewport=WINDOW)
                blocked: list[str] = []

                def only_local(route) -> None:
                    host = urlparse(route.request.url).hostname
                    if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
                        route.continue_()
                    else:
                        blocked.append(route.request.url)
                        route.abort()

                context.route("**/*", only_local)
                page = context.new_page()
                errors: list[str] = []
                page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.goto(f"http://127.0.0.1:{port}/lab/tree/browser_check.ipynb?token={token}")
                try:
                    run_checks(page, failures)
                finally:
                    page.screenshot(path=str(OUT / "page.png"), full_page=True)
                    browser.close()
                    failures += errors + [f"request to another host (blocked): {u}" for u in blocked]
        except CheckFailed as exc:
            failures.append(str(exc))
        except Exception as exc:  # the browser or the server failed: the first line says where
            failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            stop(lab)
    for f in failures:
        print("FAIL", f)
    print(f"browser check: {'passed' if not failures else f'{len(failures)} failure(s)'}; screenshots in {OUT}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
