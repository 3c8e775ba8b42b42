"""Drawing an :class:`~handlens.audit.report.AuditReport` as one self-contained HTML page: inline style, the
overlays as data URIs, no script and nothing fetched, so it can be mailed and opened anywhere."""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f0; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 4px 8px; border-radius: 4px; margin: 3px 0; }
.bad { background: #fbe0e0; color: #8a1111; } .good { background: #dff3e4; color: #0b5d1e; }
.unsure { background: #fff4d6; color: #6b4d00; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 262px; font-size: 12px; overflow-wrap: anywhere; }
figure img { width: 256px; display: block; border: 3px solid #d33; } figure img.right { border-color: #3a8; }
.small { color: #666; font-size: 12px; }
"""

def tone(sentence: str) -> str:
    """good, bad or unsure: the colour of a verdict line, from its words."""
    text = sentence.lower()
    if "the maps sit on it" in text:
        return "bad"
    if text.startswith(("no shortcut", "no leak", "no burned-in", "no exact copy", "faithful")):
        return "good"
    if text.startswith(("shortcut", "leaks", "worse than random")):
        return "bad"
    return "unsure"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def _share(found: dict[str, Any] | None, name: str) -> str:
    region = (found or {}).get(name)
    if not region:
        return "-"
    return f"{region['energy']:.0%} (area {region['area']:.0%}; {region['flagged']} of {region['maps']} flagged)"


def render(report: Any) -> str:
    """The whole page for ``report`` (an AuditReport)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>handlens audit: "
             f"{escape(report.source)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Audit of {escape(report.bundle)}</h1>",
             f"<p>Judged on <b>{escape(report.source)}</b>: {report.images} images, classes "
             f"{escape(', '.join(report.classes))}. Accuracy <b>{report.accuracy:.3f}</b>, macro-F1 "
             f"<b>{report.macro_f1:.3f}</b>. Maps: {escape(report.method)} on {escape(report.layer or 'pixels')}, "
             f"drawn for {report.sample} images.</p>", "<h2>Verdicts</h2>"]
    parts += [f'<p class="verdict {tone(sentence)}"><b>{escape(check)}</b>: {escape(sentence)}</p>'
              for check, sentence in report.verdicts()]
    parts.append("<h2>File-attribute baselines against the model</h2>")
    parts.append(_table(["classifier", "accuracy", "macro-F1", "values seen in training"],
                        [["model", report.accuracy, report.macro_f1, "-"]]
                        + [[b["name"], b["accuracy"], b["macro_f1"], b["values"]] for b in report.baselines]))
    parts.append("<h2>Train/test copies</h2>" + _leaks(report.leakage))
    parts.append("<h2>Where the maps' energy sits, per class</h2>")
    parts.append(_table(["class", "maps", "outside ROI", "on padding", "border band", "verdict"],
                        [[c, s["maps"], _share(s, "outside_roi"), _share(s, "padding"), _share(s, "border"),
                          s["verdict"]] for c, s in report.per_class.items()]))
    parts.append('<p class="small">Each share is the median share of the maps\' positive energy in the region; '
                 "the area is the share of pixels it covers: a map spread evenly puts as much energy in a region "
                 "as its area.</p>")
    parts.append("<h2>Burned-in marks</h2>" + _marks(report))
    parts.append("<h2>Faithfulness on the sample</h2>")
    parts.append(f"<p>{escape(report.trust['sentence'] if report.trust else report.trust_note)}</p>")
    parts.append("<h2>Worst cases</h2><div class='cases'>" + "".join(_case(c) for c in report.worst) + "</div>")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    parts.append(f"<p class='small'>handlens audit · {escape(seconds)}</p></body></html>")
    return "\n".join(parts)


def _leaks(leakage: dict[str, Any]) -> str:
    rows = [[p["test"], p["train"], p["kind"], p["distance"]] for p in leakage.get("pairs", [])[:50]]
    table = _table(["judged image", "training image", "kind", "bits apart"], rows) if rows else ""
    return f"<p>{escape(leakage.get('verdict', ''))}</p>{table}"


def _marks(report: Any) -> str:
    if not report.marks:
        return f"<p>{escape(report.marks_verdict)}</p>"
    rows = []
    for mark in report.marks:
        on = report.maps_on_marks.get(mark["label"], {})
        rows.append([mark["label"], mark["where"], f"{mark['in_class']:.0%}", f"{mark['in_others']:.0%}",
                     "yes" if mark["shortcut"] else "no", on.get("verdict", "-")])
    return f"<p>{escape(report.marks_verdict)}</p>" + _table(
        ["class", "where", "its images", "other classes' images", "shortcut", "maps"], rows)


def _case(case: Any) -> str:
    right = case.truth == case.predicted
    trust = f" · {escape(case.trust)}" if case.trust else ""
    return (f"<figure><img class='{'right' if right else 'wrong'}' alt='map of {escape(case.image)}' "
            f"src='data:image/png;base64,{case.overlay_png}'><figcaption><b>{escape(case.truth)} &rarr; "
            f"{escape(case.predicted)}</b> ({case.probability:.2f}, loss {case.loss:.2f}){trust}<br>"
            f"{escape(case.shortcuts)}<br><span class='small'>{escape(case.image)}</span></figcaption></figure>")
