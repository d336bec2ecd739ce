"""The ``/hrlr/v1`` routes (imports the webui): txt2img with the typed request, and the options."""

import base64
import secrets
from typing import List

from modules import call_queue, shared
from pydantic import BaseModel

from lib_hrlr.errors import HrlrError, Interrupted

from .request import SIZE_PRESETS, VAE_CHOICES, WEIGHTING_CHOICES, LOWRAM_DTYPE_CHOICES, HrlrRequest
from .run import run_generation
from .samplers import sampler_names, scheduler_names


class HrlrTxt2ImgResponse(BaseModel):
    images: List[str]
    info: str
    path: str
    seed: int
    memory: dict
    stats: dict
    warnings: List[str] = []


def error_response(e: HrlrError):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=422, content={"detail": [
        {"loc": ["body", e.field], "msg": str(e), "type": "value_error.hrlr"}]})


def on_app_started(_demo, app):
    from fastapi import Depends, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    deps = []
    if shared.cmd_opts.api_auth:
        creds = dict(c.split(":", 1) for c in shared.cmd_opts.api_auth.split(","))

        def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
            ok = credentials.username in creds and secrets.compare_digest(credentials.password,
                                                                         creds[credentials.username])
            if not ok:
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})
            return True

        deps = [Depends(auth)]

    def txt2img(req: HrlrRequest):
        with call_queue.queue_lock:
            shared.state.begin(job="hrlr_txt2img")
            try:
                res = run_generation(req)
            except HrlrError as e:
                return error_response(e)
            except Interrupted:
                return JSONResponse(status_code=409, content={"detail": "interrupted; no image was written"})
            finally:
                shared.state.end()
        imgs = []
        if req.send_images:
            with open(res["path"], "rb") as fh:
                imgs.append(base64.b64encode(fh.read()).decode())
        return HrlrTxt2ImgResponse(images=imgs, info=res["infotext"], path=res["path"], seed=res["seed"],
                                   memory=res["memory"], stats=res["stats"], warnings=res["warnings"])

    def options():
        return {"samplers": sampler_names(), "schedulers": scheduler_names(), "size_presets": list(SIZE_PRESETS),
                "vae": list(VAE_CHOICES.values()), "weighting": list(WEIGHTING_CHOICES.values()),
                "lowram_dtype": list(LOWRAM_DTYPE_CHOICES.values())}

    app.add_api_route("/hrlr/v1/txt2img", txt2img, methods=["POST"], response_model=HrlrTxt2ImgResponse,
                      dependencies=deps, tags=["HighRes-LowRAM"])
    app.add_api_route("/hrlr/v1/options", options, methods=["GET"], dependencies=deps, tags=["HighRes-LowRAM"])
