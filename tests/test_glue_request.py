"""The webui glue's one request model without the webui: defaults from GenerationParams, the
mapping to the engine's parameters, the documented limits, errors in the request's field names,
the regions table, and LowRAM's precision choice."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hrlr_glue import names, request  # noqa: E402
from hrlr_glue.request import HrlrRequest, RegionModel, check_limits, regions_from_table, to_params  # noqa: E402
from lib_hrlr.config.architectures import ARCHITECTURES  # noqa: E402
from lib_hrlr.errors import BudgetError, HrlrError, InvalidInput  # noqa: E402
from lib_hrlr.memory.budget import plan_budget  # noqa: E402
from lib_hrlr.pipeline.params import GenerationParams, validate, with_model_defaults  # noqa: E402

SD15 = ARCHITECTURES["sd15"]


def fields_of(model) -> dict:
    f = getattr(type(model), "model_fields", None) or type(model).__fields__
    return {name: getattr(model, name) for name in f}


def test_pure_glue_modules_import_without_the_webui_or_gradio():
    code = ("import sys; sys.path[:0] = [%r, %r]\n"
            "import hrlr_glue.request, hrlr_glue.names, hrlr_glue.accordion_plan, hrlr_glue.memory_html, "
            "hrlr_glue.infotext_paste, hrlr_glue.prompt_checks\n"
            "bad = [m for m in ('modules', 'gradio', 'fastapi') if m in sys.modules]\n"
            "assert not bad, bad\n") % (str(ROOT), str(ROOT / "scripts"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_request_defaults_are_the_engines():
    req = HrlrRequest()
    d = {f.name: f.default for f in dataclasses.fields(GenerationParams)}
    assert (req.width, req.height, req.steps, req.cfg_scale, req.seed, req.denoising_strength) == \
        (d["width"], d["height"], d["steps"], d["cfg"], d["seed"], d["strength"])
    assert (req.tile, req.overlap, req.tile_batch, req.weighting, req.vae, req.budget_mb) == \
        (d["tile"], d["overlap"], d["tile_batch"], d["weighting"], d["vae"], d["budget_mb"])
    # the tab's slider start values are the engine's own SD 1.x defaults
    assert (request.SD1.tile, request.SD1.overlap) == (SD15.latent_tile, SD15.latent_tile // 4)
    # a default request becomes default engine parameters (except what the webui run decides)
    p = to_params(req, model="m.safetensors")
    expected = dataclasses.replace(GenerationParams(prompt=""), model="m.safetensors", budget_scope="run")
    assert p == expected


def test_every_request_field_reaches_the_engine_parameters():
    req = HrlrRequest(prompt="a castle", negative_prompt="fog", width=2560, height=1440, steps=12, cfg_scale=5.5,
                      seed=7, denoising_strength=0.3, tile=48, overlap=8, tile_batch=3, weighting="uniform",
                      regions=[RegionModel(x=0, y=0, w=512, h=256, prompt="sky", weight=1.5)], vae="taesd",
                      budget_mb=1200, lowram=True, lowram_dtype="bf16")
    p = to_params(req, model="m.safetensors", taesd_dir="/t", dtype="bf16", out="/o/x.png")
    assert (p.prompt, p.negative, p.width, p.height, p.steps, p.cfg, p.seed, p.strength) == \
        ("a castle", "fog", 2560, 1440, 12, 5.5, 7, 0.3)
    assert (p.tile, p.overlap, p.tile_batch, p.weighting, p.vae, p.budget_mb) == (48, 8, 3, "uniform", "taesd", 1200)
    assert [(r.x, r.y, r.w, r.h, r.prompt, r.weight) for r in p.regions] == [(0, 0, 512, 256, "sky", 1.5)]
    assert (p.taesd_dir, p.dtype, p.out, p.model, p.budget_scope) == ("/t", "bf16", "/o/x.png", "m.safetensors", "run")
    validate(with_model_defaults(p, SD15), SD15)  # what the engine accepts
    # the tab's labels work as well as the API's values; tile_batch 0 = from the budget
    q = to_params(HrlrRequest(weighting="Uniform", vae="TAESD", tile_batch=0), model="m")
    assert (q.weighting, q.vae, q.tile_batch) == ("uniform", "taesd", None)


@pytest.mark.parametrize("kw, field, words", [
    ({"width": 100000}, "width", "at most 8192"),
    ({"height": 8200}, "height", "at most 8192"),
    ({"tile": 0}, "tile", "positive multiple of 8"),
    ({"tile": 60}, "tile", "positive multiple of 8"),
    ({"tile_batch": -1}, "tile_batch", "0 (as many"),
    ({"regions": [{"x": 0, "y": 0, "w": 8, "h": 8, "prompt": "p"}] * 17}, "regions", "at most 16 regions"),
    ({"lowram_dtype": "fp8"}, "lowram_dtype", "not one of"),
    ({"prompt": "a " * 1600}, "prompt", "at most 20 chunks"),
    ({"negative_prompt": "x" * 20001}, "negative_prompt", "at most 20000 characters"),
    ({"regions": [{"x": 0, "y": 0, "w": 8, "h": 8, "prompt": "b " * 1600}]}, "regions[0].prompt", "chunks"),
])
def test_limits_name_the_request_field(kw, field, words):
    with pytest.raises(InvalidInput) as e:
        check_limits(HrlrRequest(**kw))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_limits_accept_what_they_document():
    check_limits(HrlrRequest(width=8192, height=8192, prompt="a " * 1400, tile=8,
                             regions=[{"x": 0, "y": 0, "w": 8, "h": 8, "prompt": "p"}] * 16))
    # 1400 words of one token each: 19 chunks of 75
    assert request.prompt_chunks("a " * 1400) == 19 and request.prompt_chunks("a red cube") == 1


def test_a_ten_megabyte_prompt_is_refused_at_once():
    t = time.perf_counter()
    with pytest.raises(InvalidInput) as e:
        check_limits(HrlrRequest(prompt="word " * 2_000_000))
    assert e.value.field == "prompt" and time.perf_counter() - t < 1.0


# ----------------------------------------------------------------------------- field names
def _engine_error(fn) -> HrlrError:
    with pytest.raises(HrlrError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("change, api_field", [
    ({"cfg": 99.0}, "cfg_scale"),
    ({"strength": 0.0}, "denoising_strength"),
    ({"tile": 60}, "tile"),
    ({"overlap": 64}, "overlap"),
    ({"width": 256}, "width"),
])
def test_engine_validation_errors_are_named_as_the_request_names_them(change, api_field):
    p = with_model_defaults(dataclasses.replace(GenerationParams(prompt="x", width=512, height=512), **change), SD15)
    e = names.api_error(_engine_error(lambda: validate(p, SD15)))
    assert e.field == api_field and str(e).startswith(api_field + ":")
    assert "--" not in str(e), str(e)
    assert isinstance(e, InvalidInput)


def test_budget_and_taesd_messages_lose_their_cli_flags():
    errs = [
        _engine_error(lambda: plan_budget(SD15, budget_mb=10, baseline_mb=0, tile=64, n_tiles=25, dtype_bytes=4,
                                          taesd=False)),
        _engine_error(lambda: plan_budget(SD15, budget_mb=900, baseline_mb=0, tile=64, n_tiles=25, dtype_bytes=4,
                                          taesd=False, tile_batch=64)),
        _engine_error(lambda: plan_budget(SD15, budget_mb=900, baseline_mb=0, tile=64, n_tiles=25, dtype_bytes=4,
                                          taesd=False, vae_tile=256)),
    ]
    from lib_hrlr.pipeline import components

    errs.append(_engine_error(lambda: components.taesd_dir("/nonexistent-folder")))
    mapped = [names.api_error(e) for e in errs]
    assert [m.field for m in mapped] == ["budget_mb", "tile_batch", "budget_mb", "vae"]
    assert isinstance(mapped[0], BudgetError)
    for m in mapped:
        assert "--" not in str(m), str(m)
    assert "raise budget_mb" in str(mapped[0]) and "lower tile_batch" in str(mapped[1])


def test_region_fields_and_cross_references_become_regions():
    assert names.api_field("region[3]") == "regions[3]" and names.api_field("region[0].prompt") == "regions[0].prompt"
    e = names.api_error(InvalidInput("region[1]", "lies beside region[0]; see region[0]"))
    assert str(e) == "regions[1]: lies beside regions[0]; see regions[0]"
    assert names.api_error(e).field == "regions[1]"  # mapping twice changes nothing


def test_overlapping_regions_pass_the_glue_as_the_engine_accepts_and_blends_them():
    # the glue has no region check of its own: a request the engine accepts passes, and the
    # engine's refusal comes back in the request's field names
    from lib_hrlr.tiling.mixture import region_shares

    req = HrlrRequest(prompt="x", width=512, height=512, regions=[
        RegionModel(x=0, y=0, w=256, h=256, prompt="a red sky", weight=1.0),
        RegionModel(x=128, y=128, w=256, h=256, prompt="a blue sea", weight=3.0)])
    check_limits(req)
    p = with_model_defaults(to_params(req, model="m.safetensors"), SD15)
    validate(p, SD15)
    # inside both rectangles' cores the engine splits the blend 1 : 3
    share0, (a, b) = region_shares(p.regions, 64, 64)
    y, x = 24, 24  # latent px (192, 192 image px), deep inside both regions
    assert float(share0[y, x]) == 0.0
    assert float(a[y, x]) == pytest.approx(0.25) and float(b[y - 16, x - 16]) == pytest.approx(0.75)
    outside = dataclasses.replace(p, regions=p.regions + (dataclasses.replace(p.regions[0], x=384),))
    e = names.api_error(_engine_error(lambda: validate(outside, SD15)))
    assert e.field == "regions[2]" and "inside the 512x512 image" in str(e)


# ----------------------------------------------------------------------------- regions table
def test_regions_table_skips_blank_and_template_rows_and_reads_the_rest():
    rows = [list(request.REGION_TEMPLATE), [0, 0, 0, 0, 0, ""], [None, None, None, None, None, None],
            [64, 128, 256, 512, None, "a red balloon"], ["8", "16", "24", "32", "2.5", "b"]]
    got = regions_from_table(rows)
    assert [(r.x, r.y, r.w, r.h, r.weight, r.prompt) for r in got] == \
        [(64, 128, 256, 512, 1.0, "a red balloon"), (8, 16, 24, 32, 2.5, "b")]
    # gradio's dict form of the same table
    assert regions_from_table({"headers": request.REGION_HEADERS, "data": rows}) == got
    # the template row with a prompt typed in is a usable region (weight 1, not 0)
    (r,) = regions_from_table([request.REGION_TEMPLATE[:5] + ["a cat"]])
    assert (r.w, r.h, r.weight) == (512, 512, 1.0)


@pytest.mark.parametrize("row, field", [
    ([64, 64, 128, 128, 1.0, ""], "regions[0].prompt"),
    (["a", 0, 8, 8, 1.0, "x"], "regions[0]"),
])
def test_regions_table_rejects_incomplete_rows(row, field):
    with pytest.raises(InvalidInput) as e:
        regions_from_table([row])
    assert e.value.field == field


# ----------------------------------------------------------------------------- LowRAM precision
@pytest.mark.parametrize("choice, kw, expected", [
    ("webui", dict(webui_dtype="fp32", precision_full=True, no_half=True, device="cpu"), "fp32"),
    ("webui", dict(webui_dtype="fp16", precision_full=True, no_half=False, device="cuda"), "fp32"),
    ("webui", dict(webui_dtype="fp16", precision_full=False, no_half=True, device="cuda"), "fp32"),
    ("webui", dict(webui_dtype="fp16", precision_full=False, no_half=False, device="cuda"), "fp16"),
    ("webui", dict(webui_dtype="fp16", precision_full=False, no_half=False, device="cpu"), "fp32"),
    ("bf16", dict(webui_dtype="fp32", precision_full=True, no_half=True, device="cpu"), "bf16"),
    ("fp32", dict(webui_dtype="fp16", precision_full=False, no_half=False, device="cuda"), "fp32"),
])
def test_lowram_follows_the_webuis_precision_unless_told(choice, kw, expected):
    assert request.lowram_dtype(choice, **kw) == expected


def test_request_from_reports_type_errors_by_field():
    with pytest.raises(InvalidInput) as e:
        request.request_from({"width": "wide"})
    assert e.value.field == "width"
