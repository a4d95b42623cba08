"""The claims report: one section per claim (wording, protocol, numbers, verdict, plots, anchor), as Markdown and HTML."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

from bnlab.experiments.claims import CLAIMS, ClaimResult

__all__ = ["load_results", "write_claims_report", "render_markdown"]


def load_results(directory: Path) -> dict[str, ClaimResult]:
    """The latest result per claim (a full-protocol result wins over a quick one), each judged by its
    claim's rule as written now (:meth:`~bnlab.experiments.claims.Claim.rejudge`)."""
    results: dict[str, ClaimResult] = {}
    for path in sorted(directory.glob("*.json")):
        result = ClaimResult.load(path)
        current = results.get(result.claim)
        if current is None or (current.protocol == "quick" and result.protocol == "full"):
            results[result.claim] = result
    return {name: CLAIMS[name].rejudge(r) if name in CLAIMS else r for name, r in results.items()}


def _format(value) -> str:
    if isinstance(value, dict) and {"mean", "low", "high"} <= set(value):
        if value.get("n", 0) < 2:
            return f"{value['mean']:.4g} (n={value.get('n', 0)})"
        return f"{value['mean']:.4g} [{value['low']:.4g}, {value['high']:.4g}] (n={value['n']})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _number_lines(numbers: dict, indent: int = 0) -> list[str]:
    lines = []
    for key, value in numbers.items():
        if isinstance(value, dict) and not ({"mean", "low", "high"} <= set(value)):
            lines.append(f"{'  ' * indent}- {key}:")
            lines += _number_lines(value, indent + 1)
        else:
            lines.append(f"{'  ' * indent}- {key}: {_format(value)}")
    return lines


def render_markdown(results: dict[str, ClaimResult], plot_prefix: str = "") -> str:
    lines = ["# Claims about batch normalization, measured", "",
             "Each claim from the seed tutorials is an experiment with a fixed protocol, several seeds, a 95% "
             "confidence interval and a verdict rule written down before the run (`bnlab claims list`). "
             "Intervals are shown as mean [low, high] (n seeds).", "",
             "| # | claim | protocol | verdict |", "|---|---|---|---|"]
    for claim in sorted(CLAIMS.values(), key=lambda c: c.number):
        r = results.get(claim.name)
        verdict = f"**{r.verdict}**" if r else "not run yet"
        if r and r.earlier_verdict:
            verdict += f" (was {r.earlier_verdict})"
        lines.append(f"| {claim.number} | {claim.title} (`{claim.name}`) | {r.protocol if r else '-'} | {verdict} |")
    changed = [(claim, results[claim.name]) for claim in sorted(CLAIMS.values(), key=lambda c: c.number)
               if claim.name in results and results[claim.name].earlier_verdict]
    if changed:
        lines += ["", "**Changes.** Verdicts re-derived from the stored intervals by each claim's rule as written "
                  "(the rule's text and its verdict now come from one definition, `bnlab.experiments.claims.Rule`):", ""]
        lines += [f"- {c.number}. {c.title}: **{r.verdict}**, was {r.earlier_verdict}." for c, r in changed]
    for claim in sorted(CLAIMS.values(), key=lambda c: c.number):
        r = results.get(claim.name)
        lines += ["", f"## {claim.number}. {claim.title}", "", f"*What the seeds say:* {claim.seed_wording}.", "",
                  f"*Verdict rule (fixed before running):* {claim.rule}.", "",
                  f"*Published anchor:* {claim.anchor}."]
        if r is None:
            lines += ["", "Not run yet: `bnlab claims run " + claim.name + "`."]
            continue
        batches = ("each seed drew its own batch order" if r.data_order == "per_seed" else
                   "all seeds saw the same batches (made before per-seed batch orders), so the intervals "
                   "cover initialization and dropout only")
        lines += ["", f"*Protocol ({r.protocol}, {r.seeds} seeds; {batches}):* {r.protocol_text}.", "",
                  f"*Statistic:* {r.statistic}.", "", *_number_lines(r.numbers), "",
                  f"**Verdict: {r.verdict}**, because {r.reason}."
                  + (f" (The stored result said *{r.earlier_verdict}*; re-derived by the rule as written.)"
                     if r.earlier_verdict else ""), ""]
        lines += [f"![{claim.name}]({plot_prefix}{Path(p).name})" for p in r.plots]
        lines += ["", f"<sub>{r.wall_seconds:.0f} s, {r.code_version}</sub>"]
    return "\n".join(lines) + "\n"


def write_claims_report(results: dict[str, ClaimResult], out_dir: Path) -> dict[str, Path]:
    """Write ``claims.md``, ``index.html`` and copies of the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        for plot in r.plots:
            if Path(plot).exists() and Path(plot).resolve().parent != out_dir.resolve():
                shutil.copy(plot, out_dir / Path(plot).name)
    markdown = render_markdown(results)
    md_path = out_dir / "claims.md"
    md_path.write_text(markdown)
    html_path = out_dir / "index.html"
    html_path.write_text(_html(markdown))
    return {"markdown": md_path, "html": html_path}


def _html(markdown: str) -> str:
    """A plain HTML rendering of the Markdown above (headings, tables, lists, images, emphasis)."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        text = re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
        return text.replace("&lt;sub&gt;", "<small>").replace("&lt;/sub&gt;", "</small>")

    body, in_list, in_table = [], 0, False
    for line in markdown.splitlines():
        stripped = line.lstrip()
        depth = (len(line) - len(stripped)) // 2 + 1 if stripped.startswith("- ") else 0
        while in_list > depth:
            body.append("</ul>")
            in_list -= 1
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if depth:
            while in_list < depth:
                body.append("<ul>")
                in_list += 1
            body.append(f"<li>{inline(stripped[2:])}</li>")
        elif line.startswith("## "):
            body.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    body += ["</ul>"] * in_list + (["</table>"] if in_table else [])
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>bnlab claims</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
