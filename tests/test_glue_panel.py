"""The glue's pure output side: the memory panel's HTML, what a pasted infotext puts back into the
tab (regions, guide strength, LowRAM dtype) and the warnings for LoRA tags a run cannot honour."""

import dataclasses
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hrlr_glue import infotext_paste as paste  # noqa: E402
from hrlr_glue.memory_html import memory_html  # noqa: E402
from hrlr_glue.prompt_checks import lora_names, lora_warnings, strip_lora  # noqa: E402
from hrlr_glue.request import REGION_TEMPLATE, regions_from_table  # noqa: E402
from lib_hrlr.config.architectures import ARCHITECTURES  # noqa: E402
from lib_hrlr.image.infotext import parse_infotext  # noqa: E402
from lib_hrlr.memory.budget import plan_budget  # noqa: E402
from lib_hrlr.pipeline.generate import build_infotext  # noqa: E402
from lib_hrlr.pipeline.params import GenerationParams, with_model_defaults  # noqa: E402
from lib_hrlr.tiling.regions import Region  # noqa: E402

REPORT = {
    "modules": [
        {"name": "text_encoder", "kind": "stage", "peak_rss_mb": 610.0, "seconds": 1.25},
        {"name": "tiled_unet", "kind": "stage", "peak_rss_mb": 1100.0, "seconds": 30.0},
        {"name": "unet.down.0", "kind": "module", "peak_rss_mb": 1090.0, "seconds": 2.0},
        {"name": "<b>vae_decode</b>", "kind": "stage", "peak_rss_mb": 900.0, "seconds": 4.0},
    ],
    "webui": {"rss_idle_mb": 500.0, "peak_rss_mb": 1100.0, "added_mb": 600.0, "budget_mb": 800.0,
              "lowram": True, "wall_s": 35.3},
}


def cells(html: str) -> list[list[str]]:
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_memory_panel_lists_stages_with_what_each_added_and_the_budget():
    h = memory_html(REPORT)
    rows = cells(h)
    assert rows[0][:4] == ["stage", "peak RSS MB", "added MB", "s"]
    assert [r[:4] for r in rows[1:]] == [["text_encoder", "610.0", "+110.0", "1.2"],
                                         ["tiled_unet", "1100.0", "+600.0", "30.0"],
                                         ["&lt;b&gt;vae_decode&lt;/b&gt;", "900.0", "+400.0", "4.0"]]
    # bars are relative to the largest addition
    assert re.findall(r"width:(\d+)%", h) == ["18", "100", "67"]
    assert "budget <b>800 MB</b> (within it: 75 %)" in h and "added by the run <b>600.0 MB</b>" in h
    assert "(LowRAM mode)" in h and "35.3 s" in h and "unet.down.0" not in h
    over = memory_html(dict(REPORT, webui=dict(REPORT["webui"], added_mb=880.0)))
    assert "(over it: 110 %)" in over


def _infotext(**kw) -> dict:
    cfg = ARCHITECTURES["tiny"]
    p = with_model_defaults(GenerationParams(prompt="a lighthouse", negative="blur", seed=3, **kw), cfg)
    plan = plan_budget(cfg, budget_mb=800, baseline_mb=0, tile=p.tile, n_tiles=4, dtype_bytes=4, taesd=False)
    text = build_infotext(p, "model", "abc", plan, extra={"HRLR mode": "LowRAM", "HRLR dtype": "bf16"})
    prompt, negative, params = parse_infotext(text)
    return params


def test_guide_strength_has_its_own_key_and_old_images_still_read():
    params = _infotext(strength=0.35)
    # the webui's txt2img turns hires fix on for "Denoising strength": the engine no longer writes it
    assert "Denoising strength" not in params and params["HRLR guide strength"] == "0.35"
    assert paste.guide_strength(params) == "0.35"
    old = {k: v for k, v in params.items() if k != "HRLR guide strength"}
    old["Denoising strength"] = "0.5"
    assert paste.guide_strength(old) == "0.5"
    # an ordinary txt2img infotext (hires fix's denoising strength) leaves the tab's value alone
    assert paste.guide_strength({"Steps": "20", "Denoising strength": "0.7"}) is None


def test_regions_paste_back_as_the_tables_value():
    regions = (Region(0, 0, 1024, 512, "a starry sky, with clouds", 1.5), Region(512, 1024, 256, 256, 'a "red" boat'))
    params = _infotext(regions=regions)
    upd = paste.regions_rows(params)
    # an update dict: the webui passes it through instead of casting rows to the table's dict type
    assert upd["__type__"] == "update"
    rows = upd["value"]
    assert rows == [[0, 0, 1024, 512, 1.5, "a starry sky, with clouds"], [512, 1024, 256, 256, 1.0, 'a "red" boat']]
    # and the table reads them back as the same regions
    back = regions_from_table(rows)
    assert [(r.x, r.y, r.w, r.h, r.weight, r.prompt) for r in back] == \
        [dataclasses.astuple(r)[:4] + (r.weight, r.prompt) for r in regions]
    # one of ours without regions clears the table to its template; someone else's leaves it
    assert paste.regions_rows(_infotext())["value"] == [REGION_TEMPLATE]
    assert paste.regions_rows({"Steps": "20"}) is None


def test_labels_and_lowram_dtype_paste_back():
    params = _infotext(weighting="uniform", vae="taesd")
    assert (paste.weighting_label(params), paste.vae_label(params)) == ("Uniform", "TAESD")
    assert paste.lowram_dtype_label(params) == "bf16"
    assert paste.lowram_dtype_label(dict(params, **{"HRLR dtype": "fp16"})) == "Follow the webui"
    assert paste.lowram_dtype_label(dict(params, **{"HRLR mode": "webui model"})) is None


def test_lora_tags_outside_the_prompt_and_unknown_names_are_warned():
    w = lora_warnings("a cat <lora:catstyle:0.8> <lora:nope:1>", "blurry <lora:bad:1>",
                      ["sky", "a dog <lyco:dogs:0.5>"], known={"catstyle"})
    assert w == ["Lora not found: nope",
                 "LoRA tags in the negative prompt are not applied: bad (put them in the prompt)",
                 "LoRA tags in regions[1] are not applied to the region alone: dogs "
                 "(a LoRA changes the whole model; put it in the prompt)"]
    assert lora_warnings("a cat <lora:x:1>", "", [], known=None) == []  # registry unknown: no guess
    assert lora_names("<LORA:A:1><lora:b>") == ["A", "b"] and strip_lora("x <lora:a:1> y") == "x  y"


@pytest.mark.parametrize("text", ["", "plain words", "<hypernet:h:1>"])
def test_text_without_lora_tags_is_left_alone(text):
    assert strip_lora(text) == text and lora_warnings(text, text, [text], known=set()) == []
