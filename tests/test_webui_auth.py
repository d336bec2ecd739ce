"""`--api-auth` protects the extension's routes like the webui's own."""

import base64
import json
import urllib.request

import pytest

from tests.webui_support import missing_reason, running_webui

pytestmark = [pytest.mark.slow, pytest.mark.webui,
              pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")]


def test_route_needs_the_api_credentials(tmp_path):
    with running_webui(tmp_path, api_only=True, extra_args=["--api-auth", "hrlr:s3cret"],
                       auth=("hrlr", "s3cret")) as w:
        body = {"prompt": "x", "width": 1001, "height": 512, "steps": 1}
        code, _ = w.post("/hrlr/v1/txt2img", body)
        assert code == 401
        req = urllib.request.Request(w.url + "/hrlr/v1/txt2img", data=json.dumps(body).encode(), headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(b"hrlr:s3cret").decode()})
        code, res = w._call(req, 60)
        assert code == 422 and res["detail"][0]["loc"][-1] == "width"
