"""The extension inside a real AUTOMATIC1111 webui (API mode): it loads, its AlwaysOn script
changes ordinary txt2img results, its own route returns a 2048x2048 image with a memory
report, infotext round-trips through PNG Info, and bad input gets 422 with the field named.

Needs a prepared webui (see tests/webui_support.py); skipped with the reason when absent."""

import numpy as np
import pytest

from tests.webui_support import decode_png, missing_reason, running_webui

pytestmark = [pytest.mark.slow, pytest.mark.webui,
              pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")]

ALWAYSON = "HighRes-LowRAM"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    with running_webui(tmp_path_factory.mktemp("webui-api"), api_only=True) as w:
        yield w


def test_extension_loads_without_errors_and_registers_script_and_routes(webui):
    log = webui.log_text()
    assert "Error loading script: hrlr.py" not in log and "hrlr.py" not in log.split("Startup time")[0], log[-3000:]
    code, scripts = webui.get("/sdapi/v1/scripts")
    assert code == 200
    assert "highres-lowram" in scripts["txt2img"] and "highres-lowram" in scripts["img2img"]
    code, schema = webui.get("/openapi.json")
    assert code == 200 and "/hrlr/v1/txt2img" in schema["paths"]
    code, opts = webui.get("/hrlr/v1/options")
    assert code == 200 and "Euler a" in opts["samplers"] and "Karras" in opts["schedulers"]


def test_alwayson_script_changes_txt2img_and_is_inert_when_disabled(webui):
    base = {"prompt": "a red cube", "steps": 2, "width": 256, "height": 192, "seed": 1, "sampler_name": "Euler",
            "cfg_scale": 7}
    code, plain = webui.post("/sdapi/v1/txt2img", base)
    assert code == 200, plain
    off = dict(base, alwayson_scripts={ALWAYSON: {"args": [False, 16, 8, 2, "Gaussian", "Tiled full VAE"]}})
    on = dict(base, alwayson_scripts={ALWAYSON: {"args": [True, 16, 8, 2, "Gaussian", "Tiled full VAE"]}})
    code_off, r_off = webui.post("/sdapi/v1/txt2img", off)
    code_on, r_on = webui.post("/sdapi/v1/txt2img", on)
    assert code_off == 200 and code_on == 200, (r_off, r_on)
    a, b, c = (np.asarray(decode_png(r["images"][0]), dtype=np.float64) for r in (plain, r_off, r_on))
    assert a.shape == c.shape == (192, 256, 3)
    assert np.abs(a - b).max() == 0.0  # disabled: nothing changes
    assert np.abs(a - c).mean() > 0.5  # enabled: 12 overlapping 16x16 latent tiles denoise the canvas
    assert "HRLR tile: 16" in r_on["info"] and "HRLR tile" not in r_off["info"]
    # and the run after it is untouched again (no patch outlives a run)
    code, again = webui.post("/sdapi/v1/txt2img", base)
    assert np.abs(np.asarray(decode_png(again["images"][0]), dtype=np.float64) - a).max() == 0.0


def test_alwayson_script_tiles_img2img_with_the_tiled_vae_encode(webui):
    base = {"prompt": "a red cube", "steps": 2, "width": 256, "height": 192, "seed": 1, "sampler_name": "Euler"}
    code, first = webui.post("/sdapi/v1/txt2img", base)
    assert code == 200, first
    i2i = dict(base, init_images=[first["images"][0]], denoising_strength=0.6)
    code, plain = webui.post("/sdapi/v1/img2img", i2i)
    code_on, tiled = webui.post("/sdapi/v1/img2img", dict(i2i, alwayson_scripts={
        ALWAYSON: {"args": [True, 16, 8, 1, "Uniform", "Tiled full VAE"]}}))
    assert code == 200 and code_on == 200, (plain, tiled)
    a, b = (np.asarray(decode_png(r["images"][0]), dtype=np.float64) for r in (plain, tiled))
    assert a.shape == b.shape == (192, 256, 3) and np.abs(a - b).mean() > 0.5
    assert "HRLR weighting: uniform" in tiled["info"]


def test_route_returns_2048_image_with_memory_report_and_infotext_round_trips(webui):
    code, res = webui.post("/hrlr/v1/txt2img", {
        "prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "width": 2048, "height": 2048,
        "steps": 2, "seed": 42, "sampler_name": "Euler a", "vae": "taesd",
        "regions": [{"x": 0, "y": 0, "w": 1024, "h": 512, "prompt": "a starry sky", "weight": 1.5}]})
    assert code == 200, res
    img = decode_png(res["images"][0])
    assert img.size == (2048, 2048)
    mem = res["memory"]
    stages = {m["name"] for m in mem["modules"] if m["kind"] == "stage"}
    assert {"text_encoder", "base_unet", "guide_encode", "tiled_unet", "vae_decode"} <= stages
    assert mem["webui"]["peak_rss_mb"] >= mem["webui"]["rss_idle_mb"] > 100
    assert res["stats"]["tiles"] == 25 and res["seed"] == 42  # 5 x 5 tiles of 64 with overlap 16
    print("2048x2048 route:", res["memory"]["webui"], {m["name"]: m["seconds"] for m in mem["modules"]
                                                       if m["kind"] == "stage"})
    code, info = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + res["images"][0]})
    assert code == 200
    params = info["parameters"]
    assert params["Prompt"] == "a lighthouse at dusk" and params["Negative prompt"] == "blurry"
    # png-info parses with the webui's own infotext parser (values come back as text)
    assert str(params["Seed"]) == "42" and str(params["Size-1"]) == "2048" and params["Sampler"] == "Euler a"
    assert str(params["HRLR tile"]) == "64" and params["HRLR VAE"] == "taesd" and "a starry sky" in params["HRLR regions"]


@pytest.mark.parametrize("body, field, words", [
    ({"width": 1001}, "width", "multiple of 8"),
    ({"width": 256}, "width", "smaller than one tile"),
    ({"sampler_name": "Nope"}, "sampler_name", "unknown sampler"),
    ({"scheduler": "Weekly"}, "scheduler", "unknown scheduler"),
    ({"overlap": 64}, "overlap", "smaller than the tile"),
    ({"regions": [{"x": 400, "y": 0, "w": 200, "h": 104, "prompt": "a"}]}, "regions[0]", "inside"),
    ({"budget_mb": 10}, "budget_mb", "raise"),
])
def test_bad_input_is_422_naming_the_field_and_webui_keeps_answering(webui, body, field, words):
    req = dict({"prompt": "x", "width": 512, "height": 512, "steps": 1, "send_images": False}, **body)
    code, res = webui.post("/hrlr/v1/txt2img", req)
    assert code == 422, res
    detail = res["detail"][0]
    assert detail["loc"][-1].startswith(field) and words in detail["msg"], detail
    code, _ = webui.get("/sdapi/v1/options")
    assert code == 200


def test_overlapping_regions_are_accepted_as_the_engine_accepts_them(webui):
    # the glue validates as the engine does: overlapping regions split the blend by weight
    code, res = webui.post("/hrlr/v1/txt2img", {
        "prompt": "x", "width": 512, "height": 512, "steps": 1, "send_images": False,
        "regions": [{"x": 0, "y": 0, "w": 256, "h": 256, "prompt": "a red sky", "weight": 1.0},
                    {"x": 128, "y": 128, "w": 256, "h": 256, "prompt": "a blue sea", "weight": 2.0}]})
    assert code == 200, res
    assert "a red sky" in res["info"] and "a blue sea" in res["info"]


def test_accordion_args_by_name_match_positional_args_and_odd_sizes_work(webui):
    base = {"prompt": "a red cube", "steps": 2, "width": 120, "height": 256, "seed": 5, "sampler_name": "Euler"}
    code_p, pos = webui.post("/sdapi/v1/txt2img", dict(base, alwayson_scripts={
        ALWAYSON: {"args": [True, 16, 8, 2, "Gaussian", "Tiled full VAE"]}}))
    code_n, named = webui.post("/sdapi/v1/txt2img", dict(base, alwayson_scripts={
        ALWAYSON: {"args": [{"enabled": True, "tile": 16, "overlap": 8, "tiles_per_call": 2}]}}))
    assert code_p == 200 and code_n == 200, (pos, named)
    a, b = (np.asarray(decode_png(r["images"][0]), dtype=np.float64) for r in (pos, named))
    # a 15-latent-px side: the 16 px tile was rounded to 8 instead of failing
    assert a.shape == (256, 120, 3) and np.abs(a - b).max() == 0.0
    assert "HRLR tile: 16" in named["info"]


@pytest.mark.parametrize("body, field, words", [
    ({"tile": 0}, "tile", "positive multiple of 8"),
    ({"width": 100000}, "width", "at most 8192"),
    ({"prompt": "word " * 2_000_000}, "prompt", "at most 20000 characters"),
    ({"regions": [{"x": 0, "y": 0, "w": 8, "h": 8, "prompt": "p"}] * 17}, "regions", "at most 16"),
    ({"cfg_scale": 99}, "cfg_scale", "between 0 and 50"),
])
def test_limits_are_422_in_the_apis_field_names(webui, body, field, words):
    req = dict({"prompt": "x", "width": 512, "height": 512, "steps": 1, "send_images": False}, **body)
    code, res = webui.post("/hrlr/v1/txt2img", req, timeout=120)
    assert code == 422, res
    detail = res["detail"][0]
    assert detail["loc"][-1] == field and words in detail["msg"] and "--" not in detail["msg"], detail


def test_route_infotext_keys_dtype_and_lora_warnings(webui):
    code, res = webui.post("/hrlr/v1/txt2img", {
        "prompt": "a boat <lora:no-such-lora:0.8>", "negative_prompt": "blur <lora:neg:1>", "width": 512,
        "height": 512, "steps": 1, "seed": 3, "denoising_strength": 0.3, "lowram": True, "send_images": True})
    assert code == 200, res
    # guide strength under its own key: PNG Info's "Send to txt2img" must not switch hires fix on
    assert "HRLR guide strength: 0.3" in res["info"] and "Denoising strength" not in res["info"]
    # the harness runs the webui with --no-half --precision full: LowRAM follows it
    assert "HRLR dtype: fp32" in res["info"]
    assert any("no-such-lora" in w for w in res["warnings"]), res["warnings"]
    assert any("negative prompt" in w and "neg" in w for w in res["warnings"]), res["warnings"]
    code, again = webui.post("/sdapi/v1/txt2img", {"prompt": "after", "steps": 1, "width": 64, "height": 64})
    assert code == 200, again
