"""The tab's memory panel: a run's memory report as HTML (pure; the report is the engine's)."""

from __future__ import annotations

import html


def memory_html(memory: dict) -> str:
    """Peak RSS per stage with what each stage added to the process as it was before the run,
    the budget, and the run's totals."""
    mods = memory.get("modules", [])
    stages = [m for m in mods if m.get("kind") == "stage"] or mods
    w = memory.get("webui", {})
    idle = w.get("rss_idle_mb", 0) or 0
    # bars show what each stage added to the process as it was before the run
    top = max([(m.get("peak_rss_mb") or 0) - idle for m in stages] + [1])
    rows = []
    for m in stages:
        peak = m.get("peak_rss_mb") or 0
        added = max(0.0, peak - idle)
        bar = f"<div class='hrlr-bar' style='width:{100 * added / top:.0f}%'></div>"
        rows.append(f"<tr><td>{html.escape(str(m['name']))}</td><td>{peak:.1f}</td><td>+{added:.1f}</td>"
                    f"<td>{(m.get('seconds') or 0):.1f}</td><td class='hrlr-barcell'>{bar}</td></tr>")
    budget = w.get("budget_mb")
    added_total = w.get("added_mb", 0) or 0
    budget_txt = ""
    if budget:
        budget_txt = (f"; budget <b>{budget:.0f} MB</b> "
                      f"({'within' if added_total <= budget else 'over'} it: {100 * added_total / budget:.0f} %)")
    head = (f"<p>Peak RSS <b>{w.get('peak_rss_mb', 0):.1f} MB</b>; process before the run "
            f"{idle:.1f} MB; added by the run <b>{added_total:.1f} MB</b>{budget_txt}"
            f"{' (LowRAM mode)' if w.get('lowram') else ''}; {w.get('wall_s', 0):.1f} s.</p>")
    if memory.get("peak_vram_mb") is not None:
        head += f"<p>Peak allocated VRAM {memory['peak_vram_mb']:.1f} MB</p>"
    return (f"<div id='hrlr_memory_report'>{head}<table class='hrlr-mem'><tr><th>stage</th>"
            f"<th>peak RSS MB</th><th>added MB</th><th>s</th><th></th></tr>{''.join(rows)}</table></div>")


def error_html(e: Exception) -> str:
    return f"<div class='error hrlr-error'>{html.escape(str(e))}</div>"


def warnings_html(warnings) -> str:
    return "".join(f"<div class='hrlr-warning'>⚠ {html.escape(w)}</div>" for w in warnings)
