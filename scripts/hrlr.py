"""HighRes-LowRAM inside the AUTOMATIC1111 webui: the entry the webui loads.

Thin glue: everything that thinks lives in ``lib_hrlr``; the glue itself is the package
``scripts/hrlr_glue`` (request model, tab, API routes, accordion, model lifecycle, memory panel;
see its ``__init__``).  The webui loads only the ``.py`` files directly in ``scripts/``, so the
package is imported from here: its folder is put on ``sys.path`` for the import only.
"""

import os
import sys

from modules import script_callbacks

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_glue():
    # drop a copy from an earlier load ("Reload UI"), so edits to the glue take effect
    for name in [n for n in sys.modules if n == "hrlr_glue" or n.startswith("hrlr_glue.")]:
        del sys.modules[name]
    sys.path.insert(0, _HERE)
    try:
        import hrlr_glue.accordion
        import hrlr_glue.api
        import hrlr_glue.tab
    finally:
        sys.path.remove(_HERE)
    return hrlr_glue


_glue = _import_glue()
_send = _glue.tab.PngInfoSend()

# the webui registers every Script subclass found in this module
HrlrScript = _glue.accordion.HrlrScript

script_callbacks.on_after_component(_send.after_component)
script_callbacks.on_ui_tabs(lambda: _glue.tab.on_ui_tabs(_send))
script_callbacks.on_app_started(_glue.api.on_app_started)
