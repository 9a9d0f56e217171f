"""`vlmdrop demo` end to end in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The test starts the real command (`python -m vlmdrop demo --port N`, the embedded model) on a free local port,
picks a sample, submits its question and checks that both answers, both timings and the kept-token picture
appear; then a second page and the first submit at once (Gradio's queue serves both); then it uploads a
non-image and checks the error message in the page. It saves a screenshot (under pytest's tmp folder, and to
$VLMDROP_DEMO_SCREENSHOT when set: the README's `demo/screenshot.png` is made that way).

Skips only when no browser is there: Playwright's Python package or a `chromium` executable missing (`.ci/run`
installs both and sets VLMDROP_REQUIRE_BROWSER=1, which turns the skip into a failure).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

REQUIRE = os.environ.get("VLMDROP_REQUIRE_BROWSER") == "1"


def _need(ok: bool, reason: str) -> None:
    if not ok:
        if REQUIRE:
            pytest.fail(f"VLMDROP_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)  # called at import: the whole module


_need(shutil.which("chromium") is not None,
      "no chromium executable (Debian: apt-get install chromium; .ci/run installs it)")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
_need(sync_playwright is not None, "Playwright's Python package is not installed (pip install playwright)")
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'vlmdrop[demo]')")
pytest.importorskip("easy_vqa", reason="easy-vqa is not installed: no easyvqa-hr samples")

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlmdrop", "demo", "--port", str(port),
                                 "--max-new-tokens", "4", "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vlmdrop demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).read(1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vlmdrop demo did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def n_visual(path) -> int:
    """Visual tokens the embedded model's processor makes of the image at ``path``."""
    from vlmdrop.eval.loading import build_prompt
    from vlmdrop.zoo.mini import build_mini_processor

    processor = build_mini_processor()
    with Image.open(path) as im:
        ids = processor(images=im.convert("RGB"), text=build_prompt(processor, "q"), return_tensors="pt")["input_ids"]
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


def _pick_first_sample(page) -> str:
    page.wait_for_selector("#sample input", timeout=60_000)
    page.click("#sample input")
    page.get_by_role("option").first.click()
    page.wait_for_function("document.querySelector('#question textarea').value.length > 0", timeout=30_000)
    return page.input_value("#question textarea")


def _wait_answers(page) -> None:
    page.wait_for_function("document.querySelector('#reduced-stats').innerText.includes('time to first token')",
                           timeout=60_000)
    page.wait_for_function("(() => { const i = document.querySelector('#kept-picture img');"
                           " return i && i.complete && i.naturalWidth > 0; })()", timeout=30_000)


def test_demo_in_chromium(server, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(server)
            question = _pick_first_sample(page)
            assert question.startswith(("is ", "what ", "does ")), question
            page.click("#submit")
            _wait_answers(page)
            full, red = page.input_value("#full-answer textarea"), page.input_value("#reduced-answer textarea")
            assert full.strip() and red.strip(), (full, red)
            full_stats, red_stats = page.inner_text("#full-stats"), page.inner_text("#reduced-stats")
            for stats in (full_stats, red_stats):
                assert "time to first token" in stats and " ms" in stats and "tokens/s" in stats, stats
            assert "visual tokens" in full_stats and "visual tokens" in red_stats
            assert "HiredConfig(budget=0.2" in red_stats, red_stats
            assert "kept patches" in page.inner_text("#kept-note")
            assert page.locator("#budget-chart img").count() == 1
            assert page.inner_text("#error").strip() == ""
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # two users at once: both are served (one after the other, by Gradio's queue)
            other = browser.new_page(viewport={"width": 1280, "height": 1500})
            other.goto(server)
            _pick_first_sample(other)
            other.click("#method input")
            other.get_by_role("option", name="hired+fastv", exact=True).click()
            page.click("#method input")
            page.get_by_role("option", name="pool", exact=True).click()
            other.click("#submit")
            page.click("#submit")
            _wait_answers(other)
            assert "image tokens per LLM layer" in other.inner_text("#reduced-stats")
            assert other.locator("#layer-chart img").count() == 1
            shot = tmp_path / "demo-stack.png"
            other.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("VLMDROP_DEMO_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["VLMDROP_DEMO_SCREENSHOT"])
            page.wait_for_function("document.querySelector('#reduced-stats').innerText.includes('PoolConfig')",
                                   timeout=60_000)
            _wait_answers(page)

            # a non-image upload: a message in the page, no picture
            bad = tmp_path / "notes.txt"
            bad.write_text("this is not an image\n")
            page.set_input_files("#upload input[type=file]", str(bad))
            page.wait_for_function("document.querySelector('#error').innerText.includes('Error')", timeout=30_000)
            msg = page.inner_text("#error")
            assert "'notes.txt' is not an image" in msg, msg
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "demo-error.png"), full_page=True)
            assert page.locator("#preview img").count() == 0

            # an uploaded picture replaces the sample (the dropdown is cleared) and is the one answered about
            good = tmp_path / "upload.png"
            Image.new("RGB", (250, 60), (30, 90, 200)).save(good)  # 159 visual tokens, the sample 203
            page.set_input_files("#upload input[type=file]", str(good))
            page.wait_for_function("document.querySelector('#sample input').value === ''", timeout=30_000)
            page.wait_for_selector("#preview img", timeout=30_000)
            page.click("#submit")
            page.wait_for_function("document.querySelector('#full-stats').innerText.includes('visual tokens "
                                   f"{n_visual(good)}')", timeout=60_000)
            _wait_answers(page)
            assert page.inner_text("#error").strip() == ""

        finally:
            browser.close()
