"""<lora:...> prompt tags to LoRA specs (the webui glue's entry point) and the CLI's FILE[:WEIGHT]."""

import math

import pytest

from lib_hrlr.errors import InvalidInput
from lib_hrlr.pipeline.params import GenerationParams
from lib_hrlr.text.extra_networks import (LoraSpec, loras_from_prompts, parse_lora_option, strip_network_tags,
                                          with_prompt_loras)
from lib_hrlr.tiling.regions import Region


def registry(name):
    return {"style": "/loras/style.safetensors", "detail": "/loras/add_detail.pt"}.get(name)


def test_tags_become_specs_with_webui_weights():
    found = loras_from_prompts(["a cat <lora:style:0.8>, <lora:detail:0.5:1.2>", "<lyco:style:0.3>"], registry)
    assert found.loras == (LoraSpec("/loras/style.safetensors", 0.8, None, "style"),
                           LoraSpec("/loras/add_detail.pt", 1.2, 0.5, "detail"))
    # the same name again with another weight is reported, not applied twice
    assert len(found.warnings) == 1 and "already applied" in found.warnings[0]
    one = loras_from_prompts(["<lora:style>", "<lora:detail:te=0.2:unet=0.9>"], registry).loras
    assert (one[0].weight, one[0].text_weight) == (1.0, 1.0)
    assert (one[1].weight, one[1].text_weight) == (0.9, 0.2)


def test_unknown_names_and_bad_weights_are_warnings():
    found = loras_from_prompts(["<lora:nope:1> <lora:style:abc> <hypernet:x:1> plain"], registry)
    assert found.loras == ()
    assert len(found.warnings) == 2
    assert "'nope'" in found.warnings[0] and "not a number" in found.warnings[1]
    assert loras_from_prompts(["<lora:style:1>"], None).loras == ()  # no resolver: everything unknown


def test_with_prompt_loras_scans_prompt_and_regions_and_keeps_the_text():
    p = GenerationParams(prompt="sky <lora:style:0.7>", negative="<lora:detail:1>", width=512, height=512,
                         regions=(Region(0, 0, 256, 256, "boat <lora:detail:0.4>"),),
                         loras=(LoraSpec("/x.safetensors"),))
    out, warnings = with_prompt_loras(p, registry)
    assert [s.path for s in out.loras] == ["/x.safetensors", "/loras/style.safetensors", "/loras/add_detail.pt"]
    assert out.loras[2].weight == 0.4 and warnings == []
    assert out.prompt == p.prompt  # the infotext keeps the tags, as the webui's does
    assert len(with_prompt_loras(p, registry, include_negative=True)[0].loras) == 3  # detail already there


def test_strip_and_cli_option():
    assert strip_network_tags("a <lora:x:1>b<foo:bar> c") == "a b c"
    assert strip_network_tags("a < b > c") == "a < b > c"
    assert parse_lora_option("style.safetensors:0.8") == LoraSpec("style.safetensors", 0.8)
    assert parse_lora_option("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    assert parse_lora_option("C:\\loras\\x.safetensors") == LoraSpec("C:\\loras\\x.safetensors")
    assert parse_lora_option("x.pt:-0.5").weight == -0.5
    for bad in ("", "x.pt:nan"):
        with pytest.raises(InvalidInput) as err:
            parse_lora_option(bad)
        assert err.value.field == "lora"
    assert math.isclose(LoraSpec("a/b/my.lora.safetensors").text_weight, 1.0)
    assert LoraSpec("a/b/my.lora.safetensors").display_name == "my.lora"
