"""The HighRes-LowRAM tab in a real webui, driven by headless Chromium (Playwright, loopback only):
generate from the tab and see the image and the memory panel; interrupt a run and generate again.

Needs a prepared webui (tests/webui_support.py), the playwright package and a Chromium binary
($HRLR_CHROMIUM, default /usr/bin/chromium); skipped with the reason when one is absent."""

import os
import shutil
from pathlib import Path

import pytest

from tests.webui_support import missing_reason, running_webui

CHROMIUM = os.environ.get("HRLR_CHROMIUM", "/usr/bin/chromium")


def _ui_missing() -> str | None:
    if missing_reason():
        return missing_reason()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-dev.txt)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt install chromium, or set HRLR_CHROMIUM)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.webui, pytest.mark.skipif(_ui_missing() is not None,
                                                                       reason=_ui_missing() or "")]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    with running_webui(tmp_path_factory.mktemp("webui-ui"), api_only=False) as w:
        yield w


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def open_tab(browser, webui):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(webui.url, timeout=120_000)
    page.wait_for_selector("#tabs", timeout=120_000)
    page.get_by_role("button", name="HighRes-LowRAM").first.click()
    page.wait_for_selector("#hrlr_prompt textarea", state="visible")
    return page


def set_size(page, width: int, height: int):
    page.click("#hrlr_preset input")
    page.click("#hrlr_preset li[data-value='Custom']")
    for sel, v in (("#hrlr_width input", width), ("#hrlr_height input", height)):
        page.fill(sel, str(v))
        page.press(sel, "Tab")


def start_generation(page, width: int, height: int, steps: int, prompt: str | None = None):
    if prompt is not None:
        page.fill("#hrlr_prompt textarea", prompt)
    set_size(page, width, height)
    page.fill("#hrlr_steps input[type=number]", str(steps))
    page.press("#hrlr_steps input[type=number]", "Tab")
    page.click("#hrlr_generate")


def test_tab_generates_image_and_shows_memory_panel(browser, webui, tmp_path):
    page = open_tab(browser, webui)
    start_generation(page, 768, 512, 2, "a lighthouse on a cliff")
    page.wait_for_selector("#hrlr_gallery img", timeout=600_000)
    page.wait_for_selector("#hrlr_memory_report", timeout=60_000)
    report = page.inner_text("#hrlr_memory_report")
    assert "tiled_unet" in report and "vae_decode" in report and "added by the run" in report
    info = page.inner_text("#html_info_hrlr")
    assert "a lighthouse on a cliff" in info and "Size: 768x512" in info and "HRLR tile: 64" in info
    shot = tmp_path / "hrlr-tab.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("HRLR_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["HRLR_SCREENSHOT_DIR"]) / "hrlr-tab.png")
    page.close()


def test_interrupt_mid_run_then_generate_again(browser, webui):
    page = open_tab(browser, webui)
    start_generation(page, 2048, 2048, 20, "a very large canvas")
    page.wait_for_selector("#hrlr_results_panel .progressDiv", timeout=120_000)  # the run is in the queue
    page.wait_for_timeout(3000)
    page.click("#hrlr_interrupt")
    page.wait_for_selector("#html_log_hrlr .hrlr-interrupted", timeout=600_000)
    assert page.query_selector("#hrlr_gallery img") is None
    # the webui is usable again: a small run goes through
    start_generation(page, 512, 512, 1)
    # the live preview also puts an <img> in the gallery: wait for the finished run's infotext
    page.wait_for_function("document.querySelector('#html_info_hrlr').innerText.includes('Size: 512x512')",
                           timeout=600_000)
    assert page.query_selector("#hrlr_gallery img") is not None
    page.close()



# ----------------------------------------------------------------------------- round trips
ROUND_TRIP = {
    "prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "width": 512, "height": 512, "steps": 1,
    "seed": 11, "cfg_scale": 5, "sampler_name": "Euler a", "scheduler": "Karras", "denoising_strength": 0.3,
    "tile": 32, "overlap": 8, "weighting": "uniform", "vae": "taesd", "budget_mb": 900,
    "regions": [{"x": 0, "y": 0, "w": 256, "h": 128, "prompt": "a starry sky, with clouds", "weight": 1.5}],
}


@pytest.fixture(scope="module")
def made(webui):
    code, res = webui.post("/hrlr/v1/txt2img", ROUND_TRIP)
    assert code == 200, res
    return res


def value(page, selector: str) -> str:
    return page.eval_on_selector(selector, "e => e.value")


def checked(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "e => e.checked")


def region_cells(page) -> list[str]:
    return [c.strip() for c in page.eval_on_selector_all(
        "#hrlr_regions table tbody td", "cells => cells.map(c => c.innerText)") if c.strip()]


def assert_tab_holds_round_trip(page):
    r = ROUND_TRIP
    assert value(page, "#hrlr_prompt textarea") == r["prompt"]
    assert value(page, "#hrlr_neg_prompt textarea") == r["negative_prompt"]
    assert float(value(page, "#hrlr_steps input[type=number]")) == r["steps"]
    assert float(value(page, "#hrlr_cfg input[type=number]")) == r["cfg_scale"]
    assert float(value(page, "#hrlr_seed input")) == r["seed"]
    assert float(value(page, "#hrlr_strength input[type=number]")) == r["denoising_strength"]
    assert value(page, "#hrlr_sampler input") == r["sampler_name"]
    assert value(page, "#hrlr_scheduler input") == r["scheduler"]
    assert float(value(page, "#hrlr_width input")) == r["width"] and float(value(page, "#hrlr_height input")) == r["height"]
    assert float(value(page, "#hrlr_tile input[type=number]")) == r["tile"]
    assert float(value(page, "#hrlr_overlap input[type=number]")) == r["overlap"]
    assert value(page, "#hrlr_weighting input:checked") == "Uniform"
    assert value(page, "#hrlr_vae input:checked") == "TAESD"
    assert float(value(page, "#hrlr_budget input")) == r["budget_mb"]
    assert checked(page, "#hrlr_lowram input") is False
    reg = r["regions"][0]
    cells = region_cells(page)
    assert cells[:6] == [str(reg["x"]), str(reg["y"]), str(reg["w"]), str(reg["h"]), str(reg["weight"]),
                         reg["prompt"]], cells


def test_paste_button_restores_every_field_including_regions(browser, webui, made):
    page = open_tab(browser, webui)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.fill("#hrlr_prompt textarea", made["info"])
    page.click("#hrlr_paste")
    page.wait_for_function(f"document.querySelector('#hrlr_prompt textarea').value === {ROUND_TRIP['prompt']!r}",
                           timeout=60_000)
    page.wait_for_timeout(1000)
    page.get_by_text("Tiles and regions").first.click()
    assert_tab_holds_round_trip(page)
    assert not errors, errors
    page.close()


def test_png_info_sends_to_txt2img_without_hires_fix_and_to_this_tab(browser, webui, made, tmp_path):
    import base64

    png = tmp_path / "made.png"
    png.write_bytes(base64.b64decode(made["images"][0]))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(webui.url, timeout=120_000)
    page.wait_for_selector("#tabs", timeout=120_000)
    page.get_by_role("button", name="PNG Info").first.click()
    page.set_input_files("#pnginfo_image input[type=file]", str(png))
    page.wait_for_function("document.querySelector('#pnginfo_generation_info textarea') && "
                           "document.querySelector('#pnginfo_generation_info textarea').value.includes('HRLR')",
                           timeout=60_000)
    page.click("#txt2img_tab")
    page.wait_for_function(f"document.querySelector('#txt2img_prompt textarea').value === {ROUND_TRIP['prompt']!r}",
                           timeout=60_000)
    page.wait_for_timeout(1000)
    assert float(value(page, "#txt2img_seed input")) == ROUND_TRIP["seed"]
    assert float(value(page, "#txt2img_steps input[type=number]")) == ROUND_TRIP["steps"]
    assert float(value(page, "#txt2img_cfg_scale input[type=number]")) == ROUND_TRIP["cfg_scale"]
    assert float(value(page, "#txt2img_width input[type=number]")) == ROUND_TRIP["width"]
    assert value(page, "#txt2img_sampling input") == ROUND_TRIP["sampler_name"]
    # the guide strength has its own key: hires fix stays off
    assert checked(page, "#txt2img_hr .input-accordion-checkbox") is False
    # and the same image goes to this tab with every field
    page.get_by_role("button", name="PNG Info").first.click()
    page.click("#hrlr_send_from_pnginfo")
    page.wait_for_function(f"document.querySelector('#hrlr_prompt textarea').value === {ROUND_TRIP['prompt']!r}",
                           timeout=60_000)
    page.wait_for_timeout(1000)
    page.get_by_text("Tiles and regions").first.click()
    assert_tab_holds_round_trip(page)
    assert not errors, errors
    page.close()
