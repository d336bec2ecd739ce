"""The webui glue of HighRes-LowRAM, as a small package that ``scripts/hrlr.py`` imports.

Pure modules (import only ``lib_hrlr`` and pydantic, never the webui or gradio; unit-tested in
``tests/test_glue_*.py``):

- ``request``     the one typed request (API and tab), its limits, and its mapping to GenerationParams
- ``names``       engine field names and CLI flags -> the API's / tab's field names, in one table
- ``accordion_plan``  the txt2img/img2img accordion's arguments (by position or by name) and tile plan
- ``memory_html`` the memory panel
- ``infotext_paste``  infotext -> tab values (regions, guide strength, LowRAM dtype)
- ``prompt_checks``   warnings for ``<lora:...>`` tags the run cannot honour

Webui modules (import ``modules.*``; only loaded inside the webui):

- ``samplers``  the webui's k-diffusion samplers and schedulers as an engine SamplerSpec
- ``lifecycle`` LowRAM mode: release the webui's model (``--medvram``/``--lowvram`` hooks included) and restore it
- ``run``       one generation from a request
- ``tab``, ``api``, ``accordion``  the tab, the ``/hrlr/v1`` routes, the AlwaysOn script

This ``__init__`` imports nothing, so the pure modules import without the webui.
"""
