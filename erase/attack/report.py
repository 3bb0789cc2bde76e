"""report.json and report.html of `erase attack`, in `erase evaluate`'s look."""

from __future__ import annotations

import html
import json
from pathlib import Path

NAMES = {"unlearndiffatk": "UnlearnDiffAtk", "cce": "CCE", "any": "either attack"}


def _rate(k: int, n: int, ci: list[float]) -> str:
    return f"{k}/{n} = {k / max(1, n):.3f} <small>[{ci[0]:.3f}, {ci[1]:.3f}]</small>"


def _img(rel: str | None, flagged: bool, show_flagged: bool) -> str:
    if not rel:
        return "-"
    blur = ' class="flagged"' if flagged and not show_flagged else ""
    return f'<img src="{html.escape(rel)}"{blur}>' + (" &#9873;" if flagged else "")


def write_reports(report: dict, out: Path, show_flagged: bool = False) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    n = report["cases_total"]
    pre = report["pre_attack"]
    rows = [f"<tr><td>before attack</td><td>{_rate(pre['successes'], n, pre['ci95'])}</td><td>-</td></tr>"]
    for name, r in report["results"].items():
        evals = f"{r['unet_evals_per_prompt']:.0f}" if "unet_evals_per_prompt" in r else "-"
        rows.append(f"<tr><td>{NAMES.get(name, name)}</td><td>{_rate(r['successes'], n, r['asr_ci95'])}</td><td>{evals}</td></tr>")
    gate = report.get("gate")
    gate_line = "" if not gate else (f"<p>gate: attack success rate &le; {gate['fail_above']}: "
                                     f"<b>{'pass' if gate['passed'] else 'FAIL'}</b> (worst {gate['worst_asr']:.3f})</p>")
    head = "".join(f"<th>{NAMES[a]}</th>" for a in report["attacks"])
    cases = []
    for c in report["cases"]:
        cells = [f"<td>{html.escape(c['prompt'])}<br><small>seed {c['seed']}, CFG {c['guidance']:g}</small></td>",
                 f"<td>{_img(c['pre_attack']['image'], c['pre_attack']['flagged'], show_flagged)}</td>"]
        for a in report["attacks"]:
            r = c.get(a)
            if r is None:
                cells.append("<td>not attacked (broken before)</td>" if c["pre_attack"]["flagged"] else "<td>-</td>")
                continue
            words = r.get("adversarial_prompt") or r.get("prompt", "")
            steps = f"<br><small>{r['steps']} steps</small>" if "steps" in r else ""
            cells.append(f"<td>{_img(r['image'], r['success'], show_flagged)}<br><code>{html.escape(words)}</code>{steps}</td>")
        cases.append("<tr>" + "".join(cells) + "</tr>")
    det = report["detector"]
    det_text = f"{det['name']} (threshold {det['threshold']}" + (f", protocol {det['protocol']}" if "protocol" in det else "") + ")"
    doc = f"""<!doctype html><meta charset=utf-8><title>erase attack: {html.escape(Path(report['erased']).name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:3px 10px;text-align:left;vertical-align:top}}
img{{width:96px;height:96px;image-rendering:pixelated}} .flagged{{filter:blur(10px)}}</style>
<h1>erase attack</h1>
<p>model <code>{html.escape(report['erased'])}</code> &middot; concept <b>{html.escape(report['concept'])}</b> &middot;
detector {html.escape(det_text)} &middot; prompts {html.escape(str(report['prompts']))} &middot; {n} cases</p>
<table><tr><th></th><th>attack success (95% CI)</th><th>UNet evals per prompt</th></tr>{''.join(rows)}</table>{gate_line}
<h2>per prompt</h2><table><tr><th>prompt</th><th>plain prompt</th>{head}</tr>{''.join(cases)}</table>
"""
    (out / "report.html").write_text(doc)
