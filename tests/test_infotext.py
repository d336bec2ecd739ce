import json

import pytest

from lib_hrlr.errors import InvalidInput
from lib_hrlr.image.infotext import InfotextFields, format_infotext, parse_infotext, quote, unquote

REGIONS = json.dumps([
    {"prompt": 'a red "barn", at dusk', "box": [0, 0, 0.5, 1], "weight": 1.5},
    {"prompt": "sky: stars\nand comets", "box": [0.5, 0, 1, 1]},
])


def test_webui_layout_exactly():
    text = format_infotext(
        "a lighthouse",
        "blurry",
        InfotextFields(steps=20, sampler="Euler a", schedule_type="Karras", cfg_scale=7.0, seed=1,
                       width=2048, height=2048, model_hash="abc123", model="sd15",
                       denoising_strength=0.45,
                       hrlr={"tile": 64, "overlap": 16, "weighting": "gaussian", "VAE": "full"}),
    )
    assert text == (
        "a lighthouse\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 2048x2048, "
        "Model hash: abc123, Model: sd15, Denoising strength: 0.45, "
        "HRLR tile: 64, HRLR overlap: 16, HRLR weighting: gaussian, HRLR VAE: full"
    )


def test_values_with_commas_colons_quotes_are_json_quoted():
    text = format_infotext("p", "", {"Model": "my, model: v2", "HRLR regions": REGIONS, "Seed": 5})
    line = text.split("\n")[-1]
    assert line.startswith('Model: "my, model: v2", HRLR regions: "[{\\"prompt\\": ')
    assert line.endswith(", Seed: 5")
    assert "\n" not in line
    assert quote("plain") == "plain" and unquote(quote('a "b", c')) == 'a "b", c'


@pytest.mark.parametrize("prompt,negative", [
    ("a cat", ""),
    ("first line, (masterpiece:1.2)\nsecond line: detail\n\nfourth after a blank", "ugly,\nbad hands"),
    ('she said "hi", then: left', 'no "text"'),
    ("猫, 🎨 «art»", "ぼやけ"),
    ("", "only a negative"),
])
def test_round_trip(prompt, negative):
    params = {
        "Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 4242,
        "Size": "3072x2048", "Model hash": "0123abcd", "Model": "v1-5, pruned: emaonly",
        "Denoising strength": 0.45, "Clip skip": 2, "HRLR tile": 64, "HRLR overlap": 16,
        "HRLR weighting": "gaussian", "HRLR VAE": "taesd", "HRLR regions": REGIONS,
        "HRLR note": ' padded ', "HRLR empty": "", "HRLR starts with quote": '"x',
    }
    text = format_infotext(prompt, negative, params)
    p, n, d = parse_infotext(text)
    assert (p, n) == (prompt, negative)
    assert d == {k: (str(v) if not isinstance(v, float) else format(v, "g")) for k, v in params.items()}
    assert json.loads(d["HRLR regions"])[1]["prompt"] == "sky: stars\nand comets"
    assert list(d) == list(params)  # order kept


def test_parses_a_webui_infotext():
    text = (
        "masterpiece, a castle on a hill, <lora:detail:0.6>\n"
        "with banners\n"
        "Negative prompt: lowres, bad anatomy\n"
        'Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 3391, Size: 512x768, '
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 1a2b3c, other: 4d5e6f", '
        "Version: v1.10.1"
    )
    p, n, d = parse_infotext(text)
    assert p == "masterpiece, a castle on a hill, <lora:detail:0.6>\nwith banners"
    assert n == "lowres, bad anatomy"
    assert d["Lora hashes"] == "detail: 1a2b3c, other: 4d5e6f"
    assert d["Size"] == "512x768" and d["CFG scale"] == "7.0" and d["Version"] == "v1.10.1"
    assert len(d) == 10


def test_text_without_parameter_line_is_all_prompt():
    assert parse_infotext("just a prompt, nothing else") == ("just a prompt, nothing else", "", {})
    assert parse_infotext("a\nNegative prompt: b") == ("a", "b", {})


def test_none_values_are_left_out_and_bad_keys_refused():
    assert format_infotext("p", "", {"Steps": 1, "Clip skip": None}) == "p\nSteps: 1"
    for bad in ("Steps:", "a,b", " lead", "trail ", ""):
        with pytest.raises(InvalidInput) as e:
            format_infotext("p", "", {bad: 1})
        assert e.value.field == "infotext"
    with pytest.raises(InvalidInput):
        format_infotext("p", "", {"CFG scale": float("nan")})
