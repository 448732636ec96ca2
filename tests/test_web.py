"""`flexattn-jax serve --ui` (issue 36): the page for people, driven in a real headless Chromium by selenium.

One server (tiny checkpoint, the decode-slots engine, --ui) and one browser session serve the
module. The core test uploads an image, asks, and checks the answer against `flexattn-jax
generate`'s, the map against visualize's drawing of the same maps (heat map and outlines present),
and writes the screenshot (to docs/web-ui.png with FLEXATTN_UPDATE_SCREENSHOT=1). The slow ones: a
second question in the same chat (equal to the API's answer to the same conversation), the layer
and token sliders, another hr_budget, and bad input (a text file, an empty question, an image over
--max-image-bytes) shown in the page while the server keeps serving. A missing browser fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.serve import ServerProcess

from .checkpoints import write_tiny_checkpoint
from .test_serve import MAX_NEW, _data_url, _env, _png

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what is it?"
MAX_IMAGE_BYTES = 60_000
WAIT_S = 180
SERVE = ["--max-new-tokens", str(MAX_NEW), "--max-prompt-tokens", "256"]  # a second turn (the conversation template) needs 256


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(3)
    (d / "img.png").write_bytes(_png(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)))
    (d / "big.png").write_bytes(_png(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)))  # > MAX_IMAGE_BYTES
    (d / "notes.txt").write_text("this is not an image\n")
    return {"ckpt": write_tiny_checkpoint(d / "tiny"), "dir": d, "cache": d / "cache"}


@pytest.fixture(scope="module")
def server(world):
    args = ["--checkpoint", str(world["ckpt"]), "--model-name", "tiny", *SERVE, "--max-image-bytes", str(MAX_IMAGE_BYTES), "--ui"]
    with ServerProcess(args, env=_env(world["cache"]), ready_timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def expected(world):
    """`flexattn-jax generate`'s greedy answer to the image and the question (the same --max-new-tokens)."""
    batch, out = world["dir"] / "batch.jsonl", world["dir"] / "answers.jsonl"
    batch.write_text(json.dumps({"image": str(world["dir"] / "img.png"), "prompt": QUESTION}) + "\n")
    subprocess.run([sys.executable, "-m", "flexattn_jax.app.cli", "generate", "--checkpoint", str(world["ckpt"]), "--batch", str(batch),
                    "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", "8"],
                   env=_env(world["cache"]), check=True, capture_output=True, timeout=300)
    return [json.loads(line) for line in out.read_text().splitlines()][1]["answer"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium and chromedriver, headless; missing ones fail the tests (CI installs them: .ci/run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(arg)
    options.binary_location = binary
    d = webdriver.Chrome(options=options, service=Service(driver))
    yield d
    d.quit()


def _open(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/ui/")
    _until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#ask"), "the page to load")


def _until(browser, ready, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := ready():
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; page text:\n{_text(browser, 'body')}")


def _texts(browser, selector: str) -> list[str]:
    """The shown text of each element matching ``selector``, read in one script (no stale elements while the page updates)."""
    return browser.execute_script("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim())", selector)


def _text(browser, selector: str) -> str:
    return "\n".join(_texts(browser, selector))


def _upload(browser, path: Path, where: str = "#image") -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"{where} input[type=file]").send_keys(str(path))


def _set(browser, selector: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)


def _status(browser) -> str:
    """The status line, without Gradio's progress timer ('0.4s') shown over it while an event runs."""
    lines = _text(browser, "#status").splitlines()
    return "\n".join(line for line in lines if not re.fullmatch(r"[\d.]+s|processing.*|queue.*", line.strip())).strip()


def _ask(browser, question: str) -> str:
    """Type ``question``, press Ask, wait until the page says it answered (or shows an error); the status."""
    from selenium.webdriver.common.by import By

    _set(browser, "#question textarea", question)
    before, was = _bot_messages(browser), _status(browser)
    browser.find_element(By.CSS_SELECTOR, "#ask").click()

    seen = []  # the status said 'answering' at least once (the previous 'answered' may linger a moment after the chat updates)

    def settled():
        s, bots = _status(browser), _bot_messages(browser)
        if s.startswith("answering"):
            seen.append(s)
        done = s.startswith("answered") and len(bots) > len(before) and (seen or bots[-1])
        return s if ("error" in s and s != was) or done else None

    return _until(browser, settled, f"the answer to {question!r}")


def _bot_messages(browser) -> list[str]:
    return _texts(browser, "#chat [data-testid=bot]")


def _map_pixels(browser, server) -> np.ndarray:
    """The map image the page shows, decoded from what the browser fetched (its size checked as rendered)."""
    from selenium.webdriver.common.by import By

    img = _until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#map img"), "the map image")[0]
    width = browser.execute_script("return arguments[0].naturalWidth", img)
    shown = browser.execute_script("return arguments[0].getBoundingClientRect().width", img)
    assert width >= 300 and shown >= 200, (width, shown)
    return np.asarray(Image.open(io.BytesIO(httpx.get(img.get_attribute("src"), timeout=30).content)).convert("RGB"))


def _drawn(tmp_path: Path, image: Path, att, mask, question: str, answer: str, layer: int) -> np.ndarray:
    from flexattn_jax.app.visualize import save_overlay
    from flexattn_jax.preprocess import load_image

    path = save_overlay(tmp_path / f"ref-{mask is None}-{att is None}.png", load_image(image), att, mask, question=question,
                        answer=answer, layer=layer, subject="the attention predicting answer token 0")
    return np.asarray(Image.open(path).convert("RGB"))


def test_page_answers_like_generate_and_shows_where_it_looked(server, browser, expected, world, tmp_path):
    """Upload, ask, the answer of `generate`; the map is visualize's drawing of the answer's maps, outlines included."""
    from flexattn_jax.app.inference import Request, load_for_inference, stream_answers
    from flexattn_jax.app.visualize import mask_layer
    from flexattn_jax.tokenizer import load_tokenizer

    _open(browser, server)
    _upload(browser, world["dir"] / "img.png")
    status = _ask(browser, QUESTION)
    assert status.startswith("answered"), status
    assert _bot_messages(browser)[-1] == expected
    page_map = _map_pixels(browser, server)

    params, cfg, _ = load_for_inference(str(world["ckpt"]), None, None, 1)
    (_, ans), = stream_answers(params, cfg, load_tokenizer(str(world["ckpt"])), [Request(str(world["dir"] / "img.png"), QUESTION)],
                               batch_size=1, max_new_tokens=MAX_NEW, buckets=(64, 128, 256), progress=False, step_maps=True)
    assert ans.text == expected
    assert np.array_equal(ans.token_hr_masks[0], ans.hr_masks) and np.array_equal(ans.token_image_attention[0], ans.image_attention)
    layer = mask_layer(cfg)
    att, mask = ans.token_image_attention[0, layer], ans.token_hr_masks[0, layer]
    assert 0 < mask.sum() < mask.size  # something selected, something not: the outlines have edges inside the image
    want = _drawn(tmp_path, world["dir"] / "img.png", att, mask, QUESTION, expected, layer)
    assert page_map.shape == want.shape
    assert np.abs(page_map.astype(int) - want).mean() < 1.0
    no_outline = _drawn(tmp_path, world["dir"] / "img.png", att, None, QUESTION, expected, layer)
    no_heat = _drawn(tmp_path, world["dir"] / "img.png", None, mask, QUESTION, expected, layer)
    for other in (no_outline, no_heat):
        assert np.abs(page_map.astype(int) - other).mean() > 1.5 * np.abs(page_map.astype(int) - want).mean() + 0.05
    assert f"{int(mask.sum())} of {mask.size} HR tokens selected" in _text(browser, "#caption")
    assert "FLOPs of this answer" in _text(browser, "#cost") and "xattn" in _text(browser, "#cost")

    shot = tmp_path / "web-ui.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("FLEXATTN_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "web-ui.png")


def _api(server, messages: list[dict]) -> str:
    body = {"model": "tiny", "messages": messages}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_second_question_in_the_same_chat_answers_like_the_api(server, browser, world):
    _open(browser, server)
    _upload(browser, world["dir"] / "img.png")
    assert _ask(browser, QUESTION).startswith("answered")
    first = _bot_messages(browser)[-1]
    assert _ask(browser, "which colour?").startswith("answered")
    bots = _bot_messages(browser)
    assert len(bots) == 2 and bots[0] == first
    url = _data_url((world["dir"] / "img.png").read_bytes())
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    want = _api(server, [{"role": "user", "content": parts}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "which colour?"}])
    assert bots[1] == want


@pytest.mark.slow
def test_sliders_and_another_budget_redraw_the_map(server, browser, world):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    _upload(browser, world["dir"] / "img.png")
    _set(browser, "#hr_budget textarea, #hr_budget input", "0.25")
    assert _ask(browser, QUESTION).startswith("answered")
    caption = _text(browser, "#caption")
    n_sel = int(caption.split(": ", 1)[1].split(" of ")[0])
    assert 0 < n_sel <= 9, caption  # a quarter of the tiny model's 36 HR tokens
    share = float(re.search(r"GFLOP \(([\d.]+)%\)", _text(browser, "#cost")).group(1))
    assert 0 < share < 100  # fewer FLOPs than reading every HR token
    before = _map_pixels(browser, server)
    box = browser.find_element(By.CSS_SELECTOR, "#layer input[type=number]")
    _set(browser, "#layer input[type=number]", "0")
    box.send_keys("\n")
    _until(browser, lambda: _text(browser, "#caption").startswith("layer 0"), "the layer 0 caption")
    assert not np.array_equal(_map_pixels(browser, server), before)


@pytest.mark.slow
def test_bad_input_shows_a_message_and_the_server_keeps_serving(server, browser, world):
    _open(browser, server)
    _upload(browser, world["dir"] / "notes.txt", "#upload")
    _until(browser, lambda: "error" in _status(browser), "the text file's error")
    assert "notes.txt" in _status(browser) and "image" in _status(browser)
    _upload(browser, world["dir"] / "big.png", "#upload")
    _until(browser, lambda: "--max-image-bytes" in _status(browser), "the large image's error")
    _upload(browser, world["dir"] / "img.png")
    _until(browser, lambda: not _status(browser).strip(), "a new image to clear the message")
    status = _ask(browser, "   ")
    assert "type a question" in status
    assert _ask(browser, QUESTION).startswith("answered")  # still serving, in the same page
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_selection_changes_are_found_per_layer():
    from flexattn_jax.app.web import changes

    masks = np.zeros((4, 2, 6), bool)  # (tokens, layers, HR tokens)
    masks[:, 1, 0] = True
    masks[2:, 1, 3] = True
    masks[3, 0, 5] = True
    assert changes(masks, 1) == [0, 2] and changes(masks, 0) == [0, 3]


def test_serve_help_says_what_ui_does():
    from flexattn_jax.app.serve import serve_parser

    text = " ".join(serve_parser().format_help().split())
    assert "--ui" in text and "/ui" in text and "Gradio" in text
