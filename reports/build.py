"""Build every report from the stages' metric files: ``python -m reports.build``.

Reads ``params.yaml`` (validated whole; its ``rows:`` and ``report:`` sections), the metric
files of every row, the sample grids and the MLflow store, and writes to the
output folder (``reports/out/`` by default):

* ``table4.{csv,md,tex}``: the ablation table, ours beside the paper's;
* ``table2.{csv,md,tex}``: the paper's system comparison with our rows in the Mask. group;
* ``table3.{csv,md,tex}`` (text presets, instead of Tables 4 and 2): the paper's MS-COCO
  table with our text rows, and a section of samples each under its prompt;
* ``rows.{csv,md,tex}``: one line per row, unaveraged;
* ``fig4a_time_fid.{png,svg}``, ``fig4b_params_fid.{png,svg}``: Figure 4;
* ``fig_train_curves.{png,svg}``: training curves from MLflow (when it has them);
* ``diagnostics.{csv,md,tex}``, ``fig_diag_levels``, ``fig_diag_calibration``,
  ``fig_diag_masked_loss`` (``.png``, ``.svg``): the denoising head's diagnostics (when
  ``metrics/diagnostics/`` has them);
* ``mlflow_runs.{csv,md}``: the cross-stage comparison from MLflow;
* the Optuna studies' results (``reports/studies/<name>/``, written by ``demar study``) on the page;
* ``index.html``: all of the above on one page that works offline.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import pandas as pd

from demar.io import atomic_write_text, read_json
from demar.params import Params
from reports import diagnostics, figures
from reports.data import RowData, load_row_data
from reports.html import image_tag, render_page, table_html
from reports.mlflow_runs import MlflowComparison, compare_runs
from reports.study_results import load_study_results, studies_html
from reports.tables import (
    Table,
    build_rows_table,
    build_table2,
    build_table3,
    build_table4,
    paper_table,
    to_markdown,
    write_table,
)

__all__ = ["ReportResult", "arg_parser", "build_report", "main"]

@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote.

    Args:
        outputs: every file written.
        tables: the tables, by stem.
        mlflow: the MLflow comparison.
        notes: remarks shown at the top of the HTML page (missing grids, MLflow state).
    """

    outputs: list[Path]
    tables: dict[str, Table]
    mlflow: MlflowComparison
    notes: list[str] = field(default_factory=list)


def _write_mlflow(comparison: MlflowComparison, out_dir: Path) -> list[Path]:
    csv, md = out_dir / "mlflow_runs.csv", out_dir / "mlflow_runs.md"
    table = comparison.table if comparison.table is not None else pd.DataFrame(columns=["row", "stage", "run_id"])
    atomic_write_text(csv, table.to_csv(index=False))
    body = to_markdown(table.astype(object).fillna("")) if comparison.table is not None else ""
    atomic_write_text(md, f"{comparison.note}\n\n{body}")
    return [csv, md]


def _grids_html(rows: list[RowData], max_px: int | None) -> str:
    cells = []
    for row in rows:
        caption = f"{row.name} ({row.ref.ablation}, {row.ref.size}, seed {row.ref.seed})"
        img = image_tag(row.grid, f"samples of {row.name}", max_px) if row.grid else "<p>no sample grid</p>"
        cells.append(f"<figure>{img}<figcaption>{escape(caption)}</figcaption></figure>")
    return f'<div class="grids">{"".join(cells)}</div>'


def _prompted_html(rows: list[RowData], samples_dir: Path, max_px: int | None, count: int = 10) -> str:
    """The first ``count`` samples of each text row, each with the prompt it was drawn from beneath it."""
    blocks = []
    for row in rows:
        manifest = samples_dir / row.name / "manifest.json"
        entries = read_json(manifest).get("images", [])[:count] if manifest.is_file() else []
        cells = [
            f"<figure>{image_tag(samples_dir / row.name / e['file'], e['caption'], max_px)}"
            f"<figcaption>{escape(e['caption'])}</figcaption></figure>"
            for e in entries
            if "caption" in e and e["file"].endswith(".png")
        ]
        body = "".join(cells) or "<p>no captioned samples</p>"
        blocks.append(f"<h3>{escape(row.name)}</h3><div class=\"grids\">{body}</div>")
    return "".join(blocks)


def build_report(
    params_path: Params | str | os.PathLike[str] = "params.yaml",
    metrics_dir: str | os.PathLike[str] = "metrics",
    samples_dir: str | os.PathLike[str] = "samples",
    out_dir: str | os.PathLike[str] = "reports/out",
    *,
    tracking_uri: str | None = None,
    use_mlflow: bool = True,
    studies_dir: str | os.PathLike[str] | None = None,
) -> ReportResult:
    """Build all tables, figures, the MLflow comparison and the HTML page.

    Args:
        params_path: the loaded params (:class:`demar.params.Params`) or the params file.
        metrics_dir: the stages' metric folder (default ``"metrics"``).
        samples_dir: the sample grids' folder (default ``"samples"``).
        out_dir: where the reports go (default ``"reports/out"``).
        tracking_uri: the MLflow store; None means ``demar.tracking.tracking_uri()`` (default None).
        use_mlflow: read MLflow for the comparison and training curves (default True).
        studies_dir: the Optuna studies' report folders (``reports/studies``), shown in
            their own section; None leaves the section out (default None).

    Raises:
        reports.data.MissingMetricsError: a row of ``params.yaml`` lacks a metric file.
        reports.data.StaleMetricsError: a metric file disagrees with ``params.yaml``.
        demar.config.ConfigError: ``params.yaml`` is invalid.
    """
    params, rows = load_row_data(params_path, metrics_dir, samples_dir)
    cfg, preset = params.report, params.preset
    out = Path(out_dir)
    outputs: list[Path] = []
    notes: list[str] = []

    text = params.model.context == "text"  # a text-to-image preset: Table 3 instead of Tables 4 and 2
    paper_tables = (
        [build_table3(rows, preset=preset, confidence=cfg.confidence)]
        if text
        else [
            build_table4(
                rows,
                preset=preset,
                confidence=cfg.confidence,
                sizes=list(cfg.table4_sizes) if cfg.table4_sizes else None,
            ),
            build_table2(rows, preset=preset, confidence=cfg.confidence, ours_with_cfg=cfg.ours_with_cfg),
        ]
    )
    tables = {t.stem: t for t in (*paper_tables, build_rows_table(rows))}
    for table in tables.values():
        outputs += write_table(table, out)

    fig_paths = {
        "Figure 4a: inference time vs FID": figures.save_figure(
            figures.figure4a(rows, cfg.confidence), out, "fig4a_time_fid", dpi=cfg.figure_dpi
        ),
        "Figure 4b: parameters vs FID": figures.save_figure(
            figures.figure4b(rows, paper_table("table2_imagenet256") if cfg.paper_overlay else None, cfg.confidence),
            out,
            "fig4b_params_fid",
            dpi=cfg.figure_dpi,
        ),
    }

    if use_mlflow:
        comparison = compare_runs(tracking_uri, preset, list(cfg.mlflow_metrics), cfg.curve_metric)
    else:
        comparison = MlflowComparison(tracking_uri or "", None, "MLflow comparison not requested (--no-mlflow)")
    outputs += _write_mlflow(comparison, out)
    if comparison.table is None:
        notes.append(comparison.note)
    if comparison.curves:
        fig_paths[f"Training {cfg.curve_metric} (MLflow)"] = figures.save_figure(
            figures.training_curves(comparison.curves, cfg.curve_metric), out, "fig_train_curves", dpi=cfg.figure_dpi
        )
    for paths in fig_paths.values():
        outputs += paths.values()
    outputs += figures.write_plot_data(rows, comparison.curves, out)  # the series `dvc plots` draws

    diag_records = diagnostics.load_diagnostics(metrics_dir, rows)
    diag_html = ""
    if diag_records:
        table = diagnostics.diagnostics_table(diag_records, rows)
        tables[table.stem] = table
        outputs += write_table(table, out)
        diag_html = table_html(table)
        for title, make, stem in (
            ("Errors by injected noise level", diagnostics.figure_levels, "fig_diag_levels"),
            ("Assessment calibration", diagnostics.figure_calibration, "fig_diag_calibration"),
            ("Masked-token loss by visible tokens", diagnostics.figure_masked_loss, "fig_diag_masked_loss"),
        ):
            paths = figures.save_figure(make(diag_records), out, stem, dpi=cfg.figure_dpi)
            outputs += paths.values()
            diag_html += f"<figure>{image_tag(paths['png'], title)}<figcaption>{escape(title)}</figcaption></figure>"

    no_grid = [r.name for r in rows if r.grid is None]
    if no_grid:
        notes.append(f"no sample grid ({Path(samples_dir)}/<row>/grid.png) for rows: {', '.join(no_grid)}")

    source = "params.yaml" if isinstance(params_path, Params) else str(params_path)
    overview = f"<p>Preset <b>{escape(preset)}</b>, {len(rows)} rows from {escape(source)}.</p>"
    overview += "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    figure_html = "".join(
        f"<figure>{image_tag(paths['png'], title)}<figcaption>{escape(title)}</figcaption></figure>"
        for title, paths in fig_paths.items()
    )
    mlflow_html = f"<p>{escape(comparison.note)}</p>"
    if comparison.table is not None:
        mlflow_html += table_html(comparison.table)
    page = render_page(
        f"De-MAR reproduction report ({preset})",
        [
            ("Overview", overview),
            *(
                [("Table 3: MS-COCO 256x256, text-to-image", table_html(tables["table3"]))]
                if text
                else [
                    ("Table 4: ablations", table_html(tables["table4"])),
                    ("Table 2: ImageNet 256x256", table_html(tables["table2"])),
                ]
            ),
            ("Figure 4 and training curves", figure_html),
            ("Our rows", table_html(tables["rows"])),
            *([("Diagnostics of the denoising head", diag_html)] if diag_html else []),
            ("MLflow runs", mlflow_html),
            ("Sample grids", _grids_html(rows, cfg.grid_max_px)),
            *([("Samples and their prompts", _prompted_html(rows, Path(samples_dir), cfg.grid_max_px))] if text else []),
            *(
                [("Optuna studies", studies_html(load_study_results(studies_dir), cfg.grid_max_px))]
                if studies_dir is not None
                else []
            ),
        ],
    )
    index = out / "index.html"
    atomic_write_text(index, page)
    outputs.append(index)
    return ReportResult(outputs, tables, comparison, notes)


def arg_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command-line arguments shared by ``python -m reports.build`` and the ``report`` stage."""
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml (default: %(default)s)")
    p.add_argument("--metrics", default="metrics", help="the stages' metric folder (default: %(default)s)")
    p.add_argument("--samples", default="samples", help="the sample grids' folder (default: %(default)s)")
    p.add_argument("--out", default="reports/out", help="output folder (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: demar.tracking.tracking_uri())")
    p.add_argument("--no-mlflow", action="store_true", help="build without reading or writing MLflow")
    p.add_argument("--studies", default="reports/studies", help="the studies' report folders (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the reports from the command line; print the files written."""
    args = arg_parser().parse_args(argv)
    result = build_report(
        args.params,
        args.metrics,
        args.samples,
        args.out,
        tracking_uri=args.tracking_uri,
        use_mlflow=not args.no_mlflow,
        studies_dir=args.studies,
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.outputs)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
