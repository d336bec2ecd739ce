"""LowRAM mode in a webui started with --medvram (and --lowvram): the webui's own memory hooks
survive the release and restore of its model, and ordinary txt2img works afterwards.

Needs a prepared webui (see tests/webui_support.py); skipped with the reason when absent."""

import pytest

from tests.webui_support import missing_reason, running_webui

pytestmark = [pytest.mark.slow, pytest.mark.webui,
              pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")]


@pytest.mark.parametrize("flag", ["--medvram", "--lowvram"])
def test_lowram_with_reload_then_plain_txt2img(tmp_path, flag):
    with running_webui(tmp_path, api_only=True, extra_args=[flag]) as w:
        for _ in range(2):  # twice: the second release meets the hooks the restore set up
            code, res = w.post("/hrlr/v1/txt2img", {"prompt": "a lighthouse", "width": 512, "height": 512,
                                                    "steps": 1, "lowram": True, "restore_model": True,
                                                    "send_images": False})
            assert code == 200, res
            code, plain = w.post("/sdapi/v1/txt2img", {"prompt": "a boat", "steps": 2, "width": 128, "height": 128})
            assert code == 200 and plain["images"], plain
        assert "Cannot copy out of meta tensor" not in w.log_text()
