"""report.json and report.html (summary table, per-class bar chart, image grids)."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _bar_chart(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    classes = list(report["erased"]["class_counts"])
    series = [("erased", report["erased"]["class_counts"])]
    if report.get("base_results"):
        series.insert(0, ("base", report["base_results"]["class_counts"]))
    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.9), 3.5))
    width = 0.8 / len(series)
    for i, (label, counts) in enumerate(series):
        ax.bar([x + i * width for x in range(len(classes))], [counts[c] for c in classes], width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(classes))])
    ax.set_xticklabels([c.replace("_EXPOSED", "").lower() for c in classes], rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _rate(k: float, n: int, ci: list[float]) -> str:
    return f"{k / max(1, n):.3f} <small>[{ci[0]:.3f}, {ci[1]:.3f}]</small>"


def _side_by_side(title: str, first: str, keys, models: list[tuple[str, dict]], cell) -> str:
    """One HTML table: a row per key, a column per model (base beside erased)."""
    if not keys:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in models)
    body = "".join(f"<tr><td>{html.escape(str(k))}</td>{''.join(f'<td>{cell(r, k)}</td>' for _, r in models)}</tr>" for k in keys)
    return f"<h2>{html.escape(title)}</h2><table><tr><th>{html.escape(first)}</th>{head}</tr>{body}</table>"


def detail_tables(report: dict) -> str:
    """The tables the terminal prints, and more: per prompt shape (shapes), per class (NudeNet), per prompt."""
    models = [(name, report[key]) for name, key in (("base", "base_results"), ("erased", "erased")) if report.get(key)]
    last = models[-1][1]
    parts = []
    if "shape_accuracy" in last:
        parts.append(_side_by_side("shape accuracy by prompt shape (95% CI)", "prompt shape", list(last["shape_accuracy"]), models,
                                   lambda r, k: _rate(r["shape_accuracy"][k] * r["shape_images"][k], r["shape_images"][k],
                                                      r["shape_accuracy_ci95"][k]) if k in r["shape_accuracy"] else "-"))
        parts.append(_side_by_side("colour fidelity", "", ["all prompts"], models,
                                   lambda r, k: "-" if r["colour_accuracy"] is None else f"{r['colour_accuracy']:.3f}"))
    else:
        parts.append(_side_by_side("images with each detected class (95% CI)", "class", list(last["class_counts"]), models,
                                   lambda r, k: _rate(r["class_counts"][k], r["images"], r["class_rate_ci95"][k])))
    parts.append(_side_by_side("flagged rate per prompt (95% CI)", "prompt", list(last["per_prompt"]), models,
                               lambda r, k: _rate(r["per_prompt"][k]["flagged"], r["per_prompt"][k]["images"], r["per_prompt"][k]["ci95"])))
    return "".join(parts)


def write_reports(report: dict, out: Path, jobs, *, show_flagged: bool = False) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    has_chart = _bar_chart(report, out / "classes.png")
    rows = []
    for label in ("base_results", "erased"):
        r = report.get(label)
        if r:
            name = "base" if label == "base_results" else "erased"
            lo, hi = r["flagged_rate_ci95"]
            rows.append(f"<tr><td>{name}</td><td>{r['flagged']}/{r['images']}</td><td>{r['flagged_rate']:.3f}</td>"
                        f"<td>[{lo:.3f}, {hi:.3f}]</td></tr>")
    pres = report.get("preservation", {})
    pres_line = (f"SSIM {pres['ssim_mean']:.4f}, PSNR {pres['psnr_mean']:.2f} dB vs base" if "ssim_mean" in pres
                 else html.escape(pres.get("skipped", "")))
    gate = report.get("gate")
    gate_line = "" if not gate else f"<p>gate: flagged rate &le; {gate['fail_above']}: <b>{'pass' if gate['passed'] else 'FAIL'}</b></p>"
    tiles = []
    for label, paths in report["images"].items():
        flags = (report["base_results"] if label == "base" else report["erased"])["flags"]
        for rel, flagged, job in zip(paths, flags, jobs):
            style = ' class="flagged"' if flagged and not show_flagged else ""
            tiles.append(f'<figure><img src="{html.escape(rel)}"{style} title="{html.escape(job.prompt)}">'
                         f"<figcaption>{label}{' &#9873;' if flagged else ''} s{job.seed}</figcaption></figure>")
    doc = f"""<!doctype html><meta charset=utf-8><title>erase evaluate: {html.escape(Path(report['model']).name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:3px 10px;text-align:left}}
img{{width:96px;height:96px;image-rendering:pixelated}} .flagged{{filter:blur(10px)}} figure{{display:inline-block;margin:3px;font-size:11px}}</style>
<h1>erase evaluate</h1>
<p>model <code>{html.escape(report['model'])}</code> &middot; detector {report['detector']} (threshold {report['threshold']}) &middot;
prompts {html.escape(str(report['prompts']))} &middot; {report['jobs']} images per model</p>
<table><tr><th>model</th><th>flagged</th><th>rate</th><th>95% CI</th></tr>{''.join(rows)}</table>
<p>preservation: {pres_line}</p>{gate_line}
{'<img src="classes.png" style="width:auto;height:auto">' if has_chart else ''}
{detail_tables(report)}
<h2>images</h2>{''.join(tiles)}
"""
    (out / "report.html").write_text(doc)
