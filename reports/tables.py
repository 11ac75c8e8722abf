"""Tables: the paper's Table 4 and Table 2 with our rows beside them, and the table of our rows.

Each table is built twice: ``numeric`` (raw numbers, written as CSV) and
``display`` (formatted strings, written as Markdown, LaTeX and HTML). Our number
for a group of seeds is the mean, followed by its confidence interval in brackets
when there are two seeds or more.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from demar.io import atomic_write_text
from reports.data import ABLATION_HEADS, ABLATION_LABELS, ABLATIONS, FAMILIES, RowData, metric_values, size_key
from reports.stats import Summary, holm, summarize, welch_p

__all__ = [
    "PAPER_DIR",
    "Table",
    "build_rows_table",
    "build_table2",
    "build_table3",
    "build_table4",
    "format_params",
    "format_summary",
    "group_rows",
    "paper_table",
    "to_latex",
    "to_markdown",
    "write_table",
]

PAPER_DIR = Path(__file__).resolve().parent / "paper"

# metric key in metrics/evaluate/<row>.json -> (column label, decimals as the paper prints them)
METRICS: dict[str, tuple[str, int]] = {
    "fid": ("FID", 2),
    "is": ("IS", 1),
    "precision": ("Prec.", 2),
    "recall": ("Rec.", 2),
    "class_accuracy": ("Class acc.", 3),
}
PAPER_METRICS = ("fid", "is", "precision", "recall")  # what the paper reports
CHECK = "✓"


@dataclass(frozen=True)
class Table:
    """One table in two forms.

    Args:
        stem: the output file name without extension, e.g. ``"table4"``.
        caption: one sentence saying what the table shows.
        numeric: raw numbers (written as CSV).
        display: formatted cells (written as Markdown, LaTeX, HTML).
    """

    stem: str
    caption: str
    numeric: pd.DataFrame
    display: pd.DataFrame


def paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables from ``reports/paper/<name>.csv`` (e.g. ``"table4_ablation"``)."""
    return pd.read_csv(PAPER_DIR / f"{name}.csv")


def group_rows(rows: list[RowData]) -> dict[tuple[str, str], list[RowData]]:
    """Rows grouped by (ablation, size): the seeds of one configuration."""
    groups: dict[tuple[str, str], list[RowData]] = defaultdict(list)
    for row in rows:
        groups[(row.ref.ablation, row.ref.size)].append(row)
    return dict(groups)


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def format_summary(s: Summary, digits: int) -> str:
    """``"mean"`` for one seed, ``"mean [low, high]"`` for several, ``""`` for none."""
    if s.n == 0:
        return ""
    if not s.has_interval:
        return _fmt(s.mean, digits)
    return f"{_fmt(s.mean, digits)} [{_fmt(s.ci_low, digits)}, {_fmt(s.ci_high, digits)}]"


def format_p(p: float | None) -> str:
    """A p-value with three significant digits, or ``"n/a"``."""
    return "n/a" if p is None else f"{p:.3g}"


def format_params(n: float | None) -> str:
    """A parameter count the way the paper prints it (``208M``, ``1.4B``), small counts with K."""
    if n is None or not math.isfinite(n):
        return ""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def build_table4(
    rows: list[RowData], *, preset: str, confidence: float = 0.95, sizes: list[str] | None = None
) -> Table:
    """Table 4 (ablations): the paper's numbers beside ours, per size of ours.

    Every size shown gets the four ablation rows; ours are empty where a row was not
    run. The p-value is Welch's t-test of each row's FID against the MAR row of the
    same size over seeds (``n/a`` with fewer than two seeds on either side); the three
    p-values of a size are adjusted by Holm's method, and a difference is marked
    significant where the adjusted value is below ``1 - confidence``.

    Args:
        rows: every row's data.
        preset: the params preset our rows ran with (noted in the table).
        confidence: coverage of the intervals (default 0.95).
        sizes: the sizes to show; None shows every size run with two ablations or
            more, or every size when none is (default None).
    """
    groups = group_rows(rows)
    paper = paper_table("table4_ablation").set_index("row")
    if sizes is None:
        run_sizes = sorted({s for _, s in groups}, key=size_key)
        sizes = [s for s in run_sizes if sum((a, s) in groups for a in ABLATIONS) >= 2] or run_sizes
    metrics = [k for k in METRICS if k in PAPER_METRICS or metric_values(rows, k)]

    alpha = 1.0 - confidence
    numeric, display = [], []
    for size in sizes:
        reference = groups.get(("mar", size), [])
        size_num, size_disp = [], []
        for ablation in ABLATIONS:
            label = ABLATION_LABELS[ablation]
            members = groups.get((ablation, size), [])
            diff_head, de_head = ABLATION_HEADS[ablation]
            num = {"row": label, "ablation": ablation, "size": size, "preset": preset, "seeds": len(members)}
            disp = {
                "Row": label,
                "Diff. Head": CHECK if diff_head else "",
                "De. Head": CHECK if de_head else "",
                "Preset": preset,
                "Size": size,
                "Seeds": str(len(members)),
            }
            for key in PAPER_METRICS:
                value = float(paper.loc[label, key])
                num[f"paper_{key}"] = value
                label_m, digits = METRICS[key]
                disp[f"{label_m} (paper)"] = _fmt(value, digits)
            for key in metrics:
                label_m, digits = METRICS[key]
                values = metric_values(members, key)
                s = summarize(values, confidence)
                num.update({f"{key}_mean": s.mean, f"{key}_ci_low": s.ci_low, f"{key}_ci_high": s.ci_high})
                disp[f"{label_m} (ours)"] = format_summary(s, digits)
                if ablation != "mar":
                    num[f"{key}_p_vs_mar"] = welch_p(values, metric_values(reference, key))
            size_num.append(num)
            size_disp.append(disp)
        # The three rows against MAR are one family of tests per size: Holm keeps its
        # family-wise error rate at alpha.
        adjusted = holm([num.get("fid_p_vs_mar") for num in size_num])
        for num, disp, p_holm in zip(size_num, size_disp, adjusted, strict=True):
            mar, empty = num["ablation"] == "mar", num["seeds"] == 0
            num["fid_p_holm"] = p_holm
            num["fid_significant"] = None if p_holm is None else bool(p_holm < alpha)
            disp["p (FID vs MAR)"] = "ref." if mar else ("" if empty else format_p(num.get("fid_p_vs_mar")))
            disp["p Holm"] = "ref." if mar else ("" if empty else format_p(p_holm))
            disp[f"Sig. ({alpha:.2g})"] = "" if mar or empty or p_holm is None else ("yes" if p_holm < alpha else "no")
        numeric.extend(size_num)
        display.extend(size_disp)
    caption = (
        f"Table 4 (ablations). Paper: De-MAR-B on ImageNet 256x256 with CFG. Ours: preset '{preset}', "
        f"mean over seeds with its {confidence:.0%} t-interval in brackets; "
        "p: Welch's t-test of FID against the MAR row of the same size; p Holm: adjusted for the "
        f"three comparisons of a size (Holm); Sig.: p Holm below {alpha:.2g}."
    )
    return Table("table4", caption, pd.DataFrame(numeric), pd.DataFrame(display))


def build_table2(rows: list[RowData], *, preset: str, confidence: float = 0.95, ours_with_cfg: bool = True) -> Table:
    """Table 2 (system comparison) with our MAR and De-MAR rows added to the Mask. group.

    Args:
        rows: every row's data; rows of the two families (one entry per family and size) are added.
        preset: the params preset, written into our rows' names, e.g. ``"MAR-tiny (ours, embedded)"``.
        confidence: coverage of the intervals (default 0.95).
        ours_with_cfg: our evaluation sampled with classifier-free guidance, so our numbers
            go in the guided columns (default True).
    """
    paper = paper_table("table2_imagenet256")
    paper["ours"] = False
    paper["seeds"] = pd.NA
    suffix = "_cfg" if ours_with_cfg else ""
    ours_num, ours_disp = [], []
    families = {k: v for k, v in group_rows(rows).items() if k[0] in FAMILIES}
    for (ablation, size), members in sorted(
        families.items(), key=lambda kv: (list(FAMILIES).index(kv[0][0]), size_key(kv[0][1]))
    ):
        name = f"{FAMILIES[ablation]}-{size} (ours, {preset})"
        n_params = summarize(metric_values(members, "params_total")).mean
        num = {"type": "Mask.", "model": name, "params": format_params(n_params), "ours": True, "seeds": len(members)}
        disp = dict(num)
        for key in PAPER_METRICS:
            s = summarize(metric_values(members, key), confidence)
            num[key + suffix] = s.mean
            disp[key + suffix] = format_summary(s, METRICS[key][1])
        ours_num.append(num)
        ours_disp.append(disp)

    at = int(paper.index[paper["type"] == "Mask."].max()) + 1
    numeric = pd.concat([paper.iloc[:at], pd.DataFrame(ours_num), paper.iloc[at:]], ignore_index=True)
    numeric = numeric[[*paper.columns]]

    paper_disp = paper.astype(object).copy()
    for key in PAPER_METRICS:
        for col in (key, key + "_cfg"):
            paper_disp[col] = [_fmt(v, METRICS[key][1]) for v in paper[col]]
    display = pd.concat([paper_disp.iloc[:at], pd.DataFrame(ours_disp), paper_disp.iloc[at:]], ignore_index=True)
    labels = {"type": "Type", "model": "Model", "params": "Params"}
    labels.update(
        {k: METRICS[k][0] for k in PAPER_METRICS} | {f"{k}_cfg": f"{METRICS[k][0]} (CFG)" for k in PAPER_METRICS}
    )
    display = display[[*labels]].rename(columns=labels).fillna("")
    where = "guided (CFG)" if ours_with_cfg else "unguided"
    caption = (
        "Table 2 (ImageNet 256x256, class-conditional) with our reproduced rows in the Mask. group "
        f"(ours: preset '{preset}', not comparable in absolute value; our numbers in the {where} columns, "
        f"mean over seeds with its {confidence:.0%} t-interval)."
    )
    return Table("table2", caption, numeric, display)


def build_table3(rows: list[RowData], *, preset: str, confidence: float = 0.95) -> Table:
    """Table 3 (MS-COCO 256x256, text-to-image FID) with our text-conditioned rows in the Mask. group.

    Args:
        rows: every row's data (a text preset's rows); MAR and De-MAR rows are added, one
            entry per family and size, the mean over seeds with its interval.
        preset: the params preset, written into our rows' names.
        confidence: coverage of the intervals (default 0.95).
    """
    paper = paper_table("table3_mscoco")
    paper["ours"] = False
    columns = {"fid": ("FID", 2), "num_images": ("Samples", 0), "class_accuracy": ("Shape acc.", 3),
               "colour_accuracy": ("Colour acc.", 3)}  # fmt: skip
    ours_num, ours_disp = [], []
    families = {k: v for k, v in group_rows(rows).items() if k[0] in FAMILIES}
    for (ablation, size), members in sorted(
        families.items(), key=lambda kv: (list(FAMILIES).index(kv[0][0]), size_key(kv[0][1]))
    ):
        name = f"{FAMILIES[ablation]}-{size} (ours, {preset})"
        num = {"type": "Mask.", "model": name, "ours": True, "seeds": len(members)}
        disp = dict(num)
        for key, (_, digits) in columns.items():
            summary = summarize(metric_values(members, key), confidence)
            num[key] = summary.mean
            disp[key] = format_summary(summary, digits)
        ours_num.append(num)
        ours_disp.append(disp)
    numeric = pd.concat([paper, pd.DataFrame(ours_num)], ignore_index=True)
    paper_disp = paper.astype(object).copy()
    paper_disp["fid"] = [_fmt(v, 2) for v in paper["fid"]]
    display = pd.concat([paper_disp, pd.DataFrame(ours_disp)], ignore_index=True)
    labels = {"type": "Type", "model": "Model", **{k: label for k, (label, _) in columns.items()}}
    display = display.reindex(columns=[*labels]).rename(columns=labels).fillna("")
    caption = (
        "Table 3 (MS-COCO 256x256, text-to-image, FID on 30K samples) with our text-conditioned rows "
        f"(ours: preset '{preset}', not comparable in absolute value; mean over seeds with its "
        f"{confidence:.0%} t-interval; shape and colour accuracy: the share of samples showing the shape "
        "(domain classifier) and the colour (pixels) their caption names)."
    )
    return Table("table3", caption, numeric, display)


# (key, column label, decimals) of the per-row table
ROW_COLUMNS: tuple[tuple[str, str, str, int], ...] = (
    ("train", "steps", "Steps", 0),
    ("train", "loss", "Loss", 4),
    ("train", "tokens_per_s", "Tokens/s", 0),
    ("train", "wall_s", "Train s", 0),
    ("evaluate", "params_total", "Params", -1),
    ("evaluate", "fid", "FID", 2),
    ("evaluate", "fid_untrained", "FID untrained", 2),
    ("evaluate", "is", "IS", 2),
    ("evaluate", "precision", "Prec.", 3),
    ("evaluate", "recall", "Rec.", 3),
    ("evaluate", "kid", "KID", 4),
    ("evaluate", "class_accuracy", "Class acc.", 3),
    ("evaluate", "class_accuracy_untrained", "Class acc. untrained", 3),
    ("evaluate", "sec_per_image", "s/image", 4),
    ("evaluate", "num_images", "Images", 0),
)


def build_rows_table(rows: list[RowData]) -> Table:
    """One line per row of ``params.yaml``: its training and evaluation numbers, unaveraged."""
    numeric, display = [], []
    for row in rows:
        num = {"row": row.name, "ablation": row.ref.ablation, "size": row.ref.size, "seed": row.ref.seed}
        disp = {
            "Row": row.name,
            "Ablation": ABLATION_LABELS[row.ref.ablation],
            "Size": row.ref.size,
            "Seed": str(row.ref.seed),
        }
        for source, key, label, digits in ROW_COLUMNS:
            v = getattr(row, source).get(key)
            v = float(v) if v is not None else math.nan
            num[key] = v
            disp[label] = format_params(v) if digits < 0 else _fmt(v, digits)
        numeric.append(num)
        display.append(disp)
    caption = "Our rows, one line per row of params.yaml (training and evaluation metric files, unaveraged)."
    return Table("rows", caption, pd.DataFrame(numeric), pd.DataFrame(display))


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df``'s cells (as strings; ``|`` escaped)."""

    def cell(v: object) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    CHECK: r"\checkmark",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment of ``df`` (needs ``booktabs``; check marks need ``amssymb``)."""
    head = " & ".join(_latex_escape(str(c)) for c in df.columns) + r" \\"
    body = [
        " & ".join(_latex_escape("" if pd.isna(v) else str(v)) for v in rec) + r" \\"
        for rec in df.itertuples(index=False)
    ]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{_latex_escape(caption)}}}",
            rf"\label{{{label}}}",
            r"\begin{tabular}{" + "l" * len(df.columns) + "}",
            r"\toprule",
            head,
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def write_table(table: Table, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``<stem>.csv`` (numeric), ``<stem>.md`` and ``<stem>.tex`` (display) atomically; return the paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{table.stem}.{ext}" for ext in ("csv", "md", "tex")]
    atomic_write_text(paths[0], table.numeric.to_csv(index=False))
    atomic_write_text(paths[1], f"{table.caption}\n\n{to_markdown(table.display)}")
    atomic_write_text(paths[2], to_latex(table.display, table.caption, f"tab:{table.stem}"))
    return paths
