"""The claims report: a summary table, then one section per claim (wording, rule, anchor beside our
number, protocol, numbers, verdict, figures), as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import math
import re
import shutil
from pathlib import Path

from bnlab.experiments.claims import CLAIMS, Claim, ClaimResult
from bnlab.report.plots import draw
from bnlab.stats import Interval

__all__ = ["load_results", "write_claims_report", "render_markdown", "draw_figures", "seeds_needed",
           "previous_verdicts"]


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


def _intervals(claim: Claim, result: ClaimResult) -> list[tuple[str, object, Interval]]:
    """``(condition, criterion, interval)`` for every test of the claim's rule on the result's numbers."""
    rule = claim.verdict_rule
    try:
        evidence = rule.evidence(result.numbers)
    except (KeyError, TypeError, ValueError):
        return []
    cases = evidence if rule.each else {"": evidence}
    return [(condition, test, iv if isinstance(iv, Interval) else Interval.from_dict(iv))
            for condition, ivs in cases.items() for test, iv in zip(rule.tests, ivs)]



def seeds_needed(test, iv: Interval) -> int | None:
    """For an interval that straddles a boundary of ``test``: about how many seeds per arm would make it
    clear the nearest boundary at the observed mean and spread (the half-width shrinks as 1/√n; the
    t quantile's own shrinking is ignored, so this errs high). None when the interval already decides."""
    if iv.n < 2 or math.isnan(iv.low) or test.outcome(iv) != "inconclusive":
        return None
    edges = [test.margin] if test.kind == "exceeds" else [-test.margin, test.margin]
    distance = min(abs(iv.mean - e) for e in edges)
    half = (iv.high - iv.low) / 2
    if distance == 0:
        return None  # the mean sits on the boundary: no number of seeds is expected to decide it
    return max(iv.n + 1, math.ceil(iv.n * (half / distance) ** 2))


def _ordered() -> list[Claim]:
    return sorted(CLAIMS.values(), key=lambda c: c.number)


def previous_verdicts(markdown: str) -> dict[int, tuple[str, str, int | None]]:
    """``{claim number: (verdict, protocol, seeds)}`` from the summary table of an earlier claims report
    (seeds None in reports whose table had no seeds column)."""
    found = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        verdict = next((re.search(r"\*\*(.+?)\*\*", c).group(1) for c in cells if "**" in c), None)
        at = next((i for i, c in enumerate(cells) if c in ("quick", "full")), None)
        protocol = cells[at] if at is not None else ""
        seeds = int(cells[at - 1]) if at is not None and at > 1 and cells[at - 1].isdigit() else None
        if verdict is not None:
            found[int(cells[0])] = (verdict, protocol, seeds)
        if line.startswith("## "):
            break
    return found


def _changes(results: dict[str, ClaimResult], previous: dict[int, tuple[str, str, int | None]],
             since: str) -> list[str]:
    lines = []
    for claim in _ordered():
        r = results.get(claim.name)
        if r is None or claim.number not in previous:
            continue
        verdict, protocol, seeds = previous[claim.number]
        if (verdict, protocol) == (r.verdict, r.protocol) and seeds in (None, r.seeds):
            continue
        how = f"{r.protocol} protocol, {r.seeds} seeds" + (", each seed its own batch order" if r.data_order == "per_seed"
                                                           else "")
        change = f"**{r.verdict}**, was {verdict}" if verdict != r.verdict else f"**{r.verdict}**, unchanged"
        then = f"{protocol or 'unknown'} protocol" + (f", {seeds} seeds" if seeds is not None else "")
        lines.append(f"- {claim.number}. {claim.title}: {change} ({then} then; now {how}).")
    if not lines:
        return []
    return ["", f"**Changes since {since}.** Each result below replaces the earlier one; where the verdict changed, "
            "the claim's section shows the new numbers:", "", *lines]


def render_markdown(results: dict[str, ClaimResult], plot_prefix: str = "", previous: dict | None = None,
                    since: str = "the previous report") -> str:
    lines = ["# Claims about batch normalization, measured", "",
             "Each claim from the seed tutorials is an experiment with a fixed protocol, several seeds, a 95% "
             "confidence interval and a verdict rule written down before the run (`bnlab claims list`). "
             "Intervals are shown as mean [low, high] (n seeds). The effect column shows the interval(s) the "
             "rule judges; follow-ups explain a claim's surprising result with an experiment of their own.", "",
             "| # | claim | verdict | effect (95% CI) | seeds | protocol |", "|---|---|---|---|---|---|"]
    for claim in _ordered():
        r = results.get(claim.name)
        if r is None:
            lines.append(f"| {claim.number} | {claim.title} (`{claim.name}`) | not run yet | | | |")
            continue
        verdict = f"**{r.verdict}**" + (f" (was {r.earlier_verdict})" if r.earlier_verdict else "")
        effects = "; ".join((f"{c}: " if c else "") + t.interval(iv) for c, t, iv in _intervals(claim, r))
        lines.append(f"| {claim.number} | {claim.title} (`{claim.name}`) | {verdict} | {effects} | {r.seeds} "
                     f"| {r.protocol} |")
    lines += ["", *_how_made(results)]
    lines += _changes(results, previous or {}, since)
    changed = [(claim, results[claim.name]) for claim in _ordered()
               if claim.name in results and results[claim.name].earlier_verdict]
    if changed:
        lines += ["", "**Changes.** Verdicts re-derived from the stored intervals by each claim's rule as written "
                  "(the rule's text and its verdict now come from one definition, `bnlab.experiments.claims.Rule`):", ""]
        lines += [f"- {c.number}. {c.title}: **{r.verdict}**, was {r.earlier_verdict}." for c, r in changed]
    for claim in _ordered():
        lines += ["", *_section(claim, results.get(claim.name), results, plot_prefix)]
    return "\n".join(lines) + "\n"


def _command(r: ClaimResult) -> str:
    from bnlab.experiments.claims import DEFAULT_SEEDS

    quick = " --quick" if r.protocol == "quick" else ""
    seeds = f" --seeds {r.seeds}" if r.seeds != DEFAULT_SEEDS[r.protocol] else ""
    return f"bnlab claims run {r.claim}{quick}{seeds}"


def _how_made(results: dict[str, ClaimResult]) -> list[str]:
    """Each result's command, wall time, end time and code version: what a rerun needs."""
    made = [(c, results[c.name]) for c in _ordered() if c.name in results]
    if not made:
        return []
    lines = ["**How these results were made.** Each command below was run with `--store` pointing at one run "
             "store. Finished arms are shared between claims and reused by reruns: *wall time* is the command's "
             "own, *training* is the wall time the store recorded for the claim's arms when they trained (an "
             "arm shared with another claim counts in both). Times are on the machine that ran them, including "
             "time shared with other jobs. `bnlab claims report` then wrote this page.", "",
             "| # | command | wall time | training | finished (UTC) | code |", "|---|---|---|---|---|---|"]
    for claim, r in made:
        training = f"{r.arm_seconds / 60:.1f} min" if r.arm_seconds else "-"
        lines.append(f"| {claim.number} | `{_command(r)}` | {r.wall_seconds / 60:.1f} min | {training} "
                     f"| {r.finished or '-'} | {r.code_version} |")
    return lines


def _section(claim: Claim, r: ClaimResult | None, results: dict[str, ClaimResult], plot_prefix: str) -> list[str]:
    lines = [f"## {claim.number}. {claim.title}", "", f"*What the seeds say:* {claim.seed_wording}."
             if not claim.follows else f"*What it follows up:* {claim.seed_wording}.", "",
             f"*Verdict rule (fixed before running):* {claim.rule}.", "", f"*Published anchor:* {claim.anchor}."]
    if r is not None and claim.ours_vs_anchor is not None:
        try:
            lines += ["", f"*Ours beside it:* {claim.ours_vs_anchor(r.numbers)}."]
        except (KeyError, TypeError, ValueError, IndexError):
            pass  # a stored result laid out differently: its numbers are listed below
    for follow_up in (c for c in _ordered() if c.follows == claim.name):
        done = results.get(follow_up.name)
        lines += ["", f"*Follow-up:* claim {follow_up.number}, {follow_up.title} (`{follow_up.name}`): "
                  + (f"**{done.verdict}** ({done.reason})." if done else "not run yet.")]
    if r is None:
        return lines + ["", "Not run yet: `bnlab claims run " + claim.name + "`."]
    batches = ("each seed drew its own batch order" if r.data_order == "per_seed" else
               "all seeds saw the same batches (made before per-seed batch orders), so the intervals "
               "cover initialization and dropout only")
    lines += ["", f"*Protocol ({r.protocol}, {r.seeds} seeds; {batches}):* {r.protocol_text}.", "",
              f"*Statistic:* {r.statistic}.", "", *_number_lines(r.numbers), "",
              f"**Verdict: {r.verdict}**, because {r.reason}."
              + (f" (The stored result said *{r.earlier_verdict}*; re-derived by the rule as written.)"
                 if r.earlier_verdict else "")]
    needs = [(c, t, iv, seeds_needed(t, iv)) for c, t, iv in _intervals(claim, r)]
    needs = [(c, t, n) for c, t, iv, n in needs if n is not None]
    if needs:
        lines += ["", "*Seeds the CI width needs:* " + "; ".join(
            f"{(c + ', ') if c else ''}{t.effect}: about {n} per arm at the observed mean and spread" for c, t, n in needs)
            + "."]
    lines += [""] + [f"![{claim.name}]({plot_prefix}{name})" for name in _figure_files(r)]
    return lines + ["", f"<sub>{r.wall_seconds:.0f} s, {r.code_version}</sub>"]


def _figure_files(r: ClaimResult) -> list[str]:
    return [Path(p).name for p in r.plots] + [f["file"] for f in r.figures]


def draw_figures(results: dict[str, ClaimResult], out_dir: Path) -> list[Path]:
    """Draw every figure of ``results`` into ``out_dir`` (results stored before figures were data bring
    their image files, which are copied)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for r in results.values():
        for plot in r.plots:
            if Path(plot).exists() and Path(plot).resolve().parent != out_dir.resolve():
                shutil.copy(plot, out_dir / Path(plot).name)
        drawn += [draw(spec, out_dir) for spec in r.figures]
    return drawn


def write_claims_report(results: dict[str, ClaimResult], out_dir: Path, markdown: Path | None = None,
                        previous: Path | None = None) -> dict[str, Path]:
    """Write the figures (PNG files) and ``index.html``, one self-contained page with the figures inline,
    into ``out_dir``, and the Markdown report to ``markdown`` (default ``out_dir/claims.md``), its image
    links relative to where it is. With ``previous`` (an earlier report's Markdown, e.g. the file about to
    be replaced), the report lists the verdicts and protocols that changed since."""
    import os

    before = {}
    if previous is not None and previous.is_file():
        before = previous_verdicts(previous.read_text())
    since = f"the previous report ({previous.name})" if previous is not None else "the previous report"
    draw_figures(results, out_dir)
    md_path = markdown if markdown is not None else out_dir / "claims.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = os.path.relpath(out_dir.resolve(), md_path.parent.resolve())
    md_path.write_text(render_markdown(results, "" if prefix == "." else prefix.replace(os.sep, "/") + "/", before,
                                       since))
    html_path = out_dir / "index.html"
    html_path.write_text(render_html(render_markdown(results, "", before, since), out_dir))
    return {"markdown": md_path, "html": html_path}


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(markdown: str, image_dir: Path | None = None) -> str:
    """A plain HTML rendering of the Markdown above (headings, tables, lists, images, emphasis); images
    found in ``image_dir`` are embedded as data URIs, so the page stands alone."""

    def image(match: re.Match) -> str:
        alt, src = match.group(1), match.group(2)
        path = image_dir / html.unescape(src) if image_dir is not None else None
        if path is not None and path.is_file():
            src = _data_uri(path)
        return f'<img alt="{alt}" src="{src}">'

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, text)
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
