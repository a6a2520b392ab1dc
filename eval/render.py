"""Rendering a table (``eval.table_spec.Table``) as Markdown, LaTeX (booktabs) and CSV: ours as
mean ± std over seeds with the paper's number in brackets, "—" for a missing cell, p-values of the
tests against the reference row.

- Beside a phantom twin (``phantom_<dataset>``) the paper's number is its result on the REAL
  dataset with Qwen2.5-VL-3B: it is marked ``[94.46†]`` and the caption says what † means (another
  dataset and model: for orientation, not a comparison).
- A test cell shows only the tests that ran: ``t 0.013 / img 0.016``; with one seed no t-test can
  run, so it reads ``img 0.016 (1 seed)``; with no test at all, "—".
- CSV values are rounded as the tables print them: means, stds and the paper's numbers to 2
  decimals, t statistics to 3, p-values to 4 significant digits.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Literal

from eval import paper_numbers as paper
from eval.cells import EXPECTED_SEEDS, Entry
from eval.significance import TestResult, format_p
from eval.table_spec import METRICS, Table

Fmt = Literal["md", "tex"]


def _tex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        s = s.replace(ch, "\\" + ch)
    return (s.replace("τ", r"$\tau$").replace("±", r"$\pm$").replace("—", "--")
            .replace(PHANTOM_PAPER_MARK, TEX_DAGGER))


PHANTOM_PAPER_MARK = "†"
TEX_DAGGER = r"$^\dagger$"
PHANTOM_PAPER_NOTE = ("† the paper's result with Qwen2.5-VL-3B on the REAL dataset this phantom "
                      "twin imitates: another dataset and model, for orientation only, not a "
                      "comparison.")


def _phantom(dataset: str) -> bool:
    return dataset.startswith("phantom_")


def _cell(e: Entry | None, fmt: Fmt, with_paper: bool = True) -> str:
    """``94.10 ± 0.30 [94.46]`` (``[94.46†]`` beside a phantom twin); "—" for a missing value."""
    dash = "—" if fmt == "md" else "--"
    pm = " ± " if fmt == "md" else r" $\pm$ "
    if e is None:
        return dash
    ours = dash
    if e.mean is not None:
        ours = f"{e.mean:.2f}" + (f"{pm}{e.std:.2f}" if e.std is not None else "")
        if len(e.values) != EXPECTED_SEEDS:
            ours += f" (n={len(e.values)})"
    if with_paper and e.paper is not None:
        mark = "" if not _phantom(e.dataset) else PHANTOM_PAPER_MARK if fmt == "md" else TEX_DAGGER
        ours += f" [{e.paper:.2f}{mark}]"
    return ours


def _p_cell(e: Entry | None, fmt: Fmt) -> str:
    dash = "—" if fmt == "md" else "--"
    if e is None or e.is_reference:
        return dash
    parts = []
    if e.ttest:
        parts.append(f"t {format_p(e.ttest.p_value)}")
    if e.image_test:
        n_seeds = len(e.image_test.detail.get("seeds", ())) or None
        one = " (1 seed)" if n_seeds == 1 else ""
        parts.append(f"img {format_p(e.image_test.p_value)}{one}")
    if not parts:
        return dash
    s = " / ".join(parts)
    return s if fmt == "md" else _tex_escape(s).replace("<", "$<$")


def _block_label(dataset: str, model: str, show_model: bool) -> str:
    return f"{dataset} ({model})" if show_model and model else dataset


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tex_table(header: list[str], rows: list[list[str]], caption: str, n_left: int) -> str:
    spec = "l" * n_left + "c" * (len(header) - n_left)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(caption)}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _grid(table: Table, fmt: Fmt) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) for each tabular of the table, in the given format."""
    esc = (lambda s: s) if fmt == "md" else _tex_escape
    blocks: dict[tuple[str, str], list[Entry]] = {}
    for e in table.entries:  # scale: one block per dataset, its rows are the models
        blocks.setdefault((e.dataset, "" if table.name == "scale" else e.model), []).append(e)
    show_model = len({m for _, m in blocks if m}) > 1
    metric_label = {m: paper.METRIC_LABELS.get(m, m) for m in METRICS}
    out = []
    if table.layout == "wide":
        columns = list(dict.fromkeys(e.row for e in table.entries))
        ref = columns[0]
        header = ["Dataset", "Metric"] + [esc(c) for c in columns]
        body, sig = [], []
        for (dataset, model), es in blocks.items():
            lookup = {(e.row, e.metric): e for e in es}
            for metric in METRICS:
                left = [esc(_block_label(dataset, model, show_model)), esc(metric_label[metric])]
                body.append(left + [_cell(lookup.get((c, metric)), fmt) for c in columns])
                sig.append(left + [_p_cell(lookup.get((c, metric)), fmt) for c in columns[1:]])
        out.append((f"{table.title}. Ours: mean ± std over seeds; [paper]."
                    + _phantom_note(table), header, body))
        sig_caption = (f"Paired tests vs {ref}: t = paired t-test over seeds, img = exact "
                       "sign-flip test over test images, each image's seeds kept together "
                       "(p-values).")
        out.append((sig_caption, ["Dataset", "Metric"] + [esc(c) for c in columns[1:]], sig))
        return out
    header = ["Configuration"] + [esc(metric_label[m]) for m in METRICS]
    if table.name != "scale":
        header.append(esc(f"p vs ref ({metric_label[table.primary_metric]})"))
    for (dataset, model), es in blocks.items():
        rows_order = list(dict.fromkeys(e.row for e in es))
        lookup = {(e.row, e.metric): e for e in es}
        body = []
        for r in rows_order:
            line = [esc(r)] + [_cell(lookup.get((r, m)), fmt) for m in METRICS]
            if table.name != "scale":
                line.append(_p_cell(lookup.get((r, table.primary_metric)), fmt))
            body.append(line)
        caption = (f"{table.title}. {_block_label(dataset, model, True)}. "
                   "Ours: mean ± std over seeds; [paper]." + _phantom_note(table))
        if table.name != "scale":
            caption += " Tests are paired against the first row."
        out.append((caption, header, body))
    return out


def _phantom_note(table: Table) -> str:
    """The caption's note on † when a paper number sits beside a phantom twin."""
    if any(_phantom(e.dataset) and e.paper is not None for e in table.entries):
        return " " + PHANTOM_PAPER_NOTE
    return ""


def render_markdown(table: Table) -> str:
    parts = [f"## {table.title}", ""]
    for caption, header, rows in _grid(table, "md"):
        parts += [caption, "", _md_table(header, rows), ""]
    if table.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in table.notes] + [""]
    return "\n".join(parts)


def render_latex(table: Table) -> str:
    grids = _grid(table, "tex")
    n_left = 2 if table.layout == "wide" else 1
    return "\n\n".join(_tex_table(h, r, c, n_left) for c, h, r in grids) + "\n"


CSV_COLUMNS = ["table", "dataset", "model", "row", "arm", "metric", "n_seeds",
               "seeds", "mean", "std", "paper", "is_reference", "ttest_t", "ttest_p",
               "signflip_p", "signflip_n_images", "signflip_seeds", "signflip_a_better",
               "signflip_b_better", "signflip_tied"]


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(x: float | None, spec: str) -> str:
        """``x`` at the precision the tables print it (no 14.499999999999998)."""
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        out = format(float(x), spec)
        return "0" if spec.endswith("g") and float(out) == 0 else out

    def image_columns(r: TestResult) -> list[Any]:
        return [num(r.p_value, ".4g"), r.n, " ".join(map(str, r.detail["seeds"])),
                r.detail["n_a_better"], r.detail["n_b_better"], r.detail["n_tied"]]

    for e in table.entries:
        writer.writerow([
            e.table, e.dataset, e.model, e.row, e.arm, e.metric, len(e.values),
            " ".join(map(str, e.seeds)), num(e.mean, ".2f"), num(e.std, ".2f"),
            num(e.paper, ".2f"), e.is_reference,
            num(e.ttest.statistic, ".3f") if e.ttest else "",
            num(e.ttest.p_value, ".4g") if e.ttest else "",
            *(image_columns(e.image_test) if e.image_test else [""] * 6),
        ])
    return buf.getvalue()
