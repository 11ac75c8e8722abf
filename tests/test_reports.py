"""Reports: tables with seed statistics, Figure 4, the MLflow comparison, the offline HTML page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats

from reports.build import build_report
from reports.data import MissingMetricsError, StaleMetricsError, load_row_data
from reports.figures import time_fid_curves
from reports.mlflow_runs import compare_runs
from reports.stats import holm, summarize, welch_p
from reports.tables import build_table4, to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# FID per seed of the tiny ablation rows; the size family adds MAR and De-MAR at "small".
TINY_FID = {"mar": [50.0, 54.0], "diff_head": [45.0, 47.0], "de_head": [48.0, 49.5], "demar": [40.0, 41.0]}
PARAMS = {
    ("mar", "tiny"): 1.0e6,
    ("diff_head", "tiny"): 1.2e6,
    ("de_head", "tiny"): 1.1e6,
    ("demar", "tiny"): 1.3e6,
    ("mar", "small"): 4.0e6,
    ("demar", "small"): 5.0e6,
}
SMALL_FID = {"mar": 35.0, "demar": 30.0}


def _row_files(root: Path, name: str, ablation: str, size: str, seed: int, fid: float) -> None:
    ident = {"row": name, "ablation": ablation, "size": size, "seed": seed}
    family = {"mar": "MAR", "demar": "De-MAR"}.get(ablation)
    n_params = PARAMS[(ablation, size)]
    train = {
        **ident,
        "steps": 100,
        "loss": 0.5 - 0.01 * seed,
        "loss_diffusion": 0.4,
        "loss_refinement": 0.05,
        "loss_assessment": 0.05,
        "params_total": n_params,
        "params_by_component": {"backbone": n_params},
        "tokens_per_s": 1000.0,
        "steps_per_s": 3.0,
        "wall_s": 33.0,
    }
    evaluate = {
        **ident,
        "family": family,
        "fid": fid,
        "is": 10.0 + seed,
        "is_std": 0.1,
        "precision": 0.5,
        "recall": 0.40 + 0.01 * seed,
        "kid": 0.01,
        "kid_std": 0.001,
        "class_accuracy": 0.6 + 0.05 * seed,
        "fid_untrained": 300.0,
        "class_accuracy_untrained": 0.1,
        "sec_per_image": 0.02,
        "num_images": 64,
        "params_total": n_params,
    }
    for kind, data in (("train", train), ("evaluate", evaluate)):
        (root / "metrics" / kind).mkdir(parents=True, exist_ok=True)
        (root / "metrics" / kind / f"{name}.json").write_text(json.dumps(data))
    if family:
        points = [
            {"ar_steps": k, "diffusion_steps": 10 * k, "sec_per_image": 0.01 * k * (1 + seed), "fid": fid + 20.0 / k}
            for k in (2, 4, 8)
        ]
        (root / "metrics" / "time_fid").mkdir(parents=True, exist_ok=True)
        (root / "metrics" / "time_fid" / f"{name}.json").write_text(
            json.dumps({"row": name, "family": family, "points": points})
        )
    if name != "demar_small_s0":  # one row without a sample grid
        (root / "samples" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 40 * seed, 90)).save(root / "samples" / name / "grid.png")


def make_tree(root: Path, seeds: tuple[int, ...] = (0, 1)) -> Path:
    """Metric files for 4 ablation rows x seeds at size tiny, plus MAR/De-MAR at size small."""
    rows = {}
    for ablation, fids in TINY_FID.items():
        for seed in seeds:
            name = f"{ablation}_tiny_s{seed}"
            rows[name] = {"ablation": ablation, "size": "tiny", "seed": seed}
            _row_files(root, name, ablation, "tiny", seed, fids[seed])
    for ablation, fid in SMALL_FID.items():
        name = f"{ablation}_small_s0"
        rows[name] = {"ablation": ablation, "size": "small", "seed": 0}
        _row_files(root, name, ablation, "small", 0, fid)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "embedded", "rows": rows, "report": {"figure_dpi": 60}}))
    return params


def build(root: Path, **kwargs):
    kwargs.setdefault("use_mlflow", False)
    return build_report(root / "params.yaml", root / "metrics", root / "samples", root / "out", **kwargs)


@pytest.fixture
def tree(tmp_path) -> Path:
    make_tree(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report built for the read-only tests, with an unreachable MLflow server."""
    root = tmp_path_factory.mktemp("report")
    make_tree(root)
    return root, build(root, use_mlflow=True, tracking_uri="http://127.0.0.1:9")


EXPECTED = [
    *(f"{t}.{e}" for t in ("table4", "table2", "rows") for e in ("csv", "md", "tex")),
    *(f"{f}.{e}" for f in ("fig4a_time_fid", "fig4b_params_fid") for e in ("png", "svg")),
    "mlflow_runs.csv",
    "mlflow_runs.md",
    "index.html",
]


def test_every_output_is_written_and_figures_are_png(built):
    root, result = built
    out = root / "out"
    for name in EXPECTED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {p.name for p in result.outputs if p.parent == out} == set(EXPECTED)
    series = [p for p in result.outputs if p.parent != out]  # the CSV series `dvc plots` draws
    assert "time_fid" in {p.parent.name for p in series} <= {"train_curves", "time_fid"}
    assert all(p.suffix == ".csv" and p.read_text().count("\n") >= 2 for p in series)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as im:
            im.verify()
    assert (out / "fig4b_params_fid.svg").read_text().lstrip().startswith("<?xml")
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_table4_has_ours_beside_paper_with_t_interval_and_welch_p(built):
    tree, _ = built
    md = (tree / "out" / "table4.md").read_text()
    assert "2.31" in md and "281.7" in md and "2.04" in md  # the paper's MAR and De-MAR rows
    assert "embedded" in md

    # our MAR FID, by hand: mean and 95% t-interval of [50, 54]
    mar = np.array(TINY_FID["mar"])
    low, high = stats.t.interval(0.95, df=len(mar) - 1, loc=mar.mean(), scale=stats.sem(mar))
    assert f"{mar.mean():.2f} [{low:.2f}, {high:.2f}]" in md

    df = pd.read_csv(tree / "out" / "table4.csv")
    tiny = df[df["size"] == "tiny"].set_index("ablation")
    assert tiny.loc["mar", "fid_mean"] == pytest.approx(52.0)
    assert tiny.loc["mar", "fid_ci_low"] == pytest.approx(low)
    assert tiny.loc["mar", "fid_ci_high"] == pytest.approx(high)
    assert tiny.loc["mar", "paper_fid"] == pytest.approx(2.31)
    assert tiny.loc["demar", "paper_is"] == pytest.approx(283.5)
    for ablation in ("diff_head", "de_head", "demar"):
        p = stats.ttest_ind(TINY_FID[ablation], TINY_FID["mar"], equal_var=False).pvalue
        assert tiny.loc[ablation, "fid_p_vs_mar"] == pytest.approx(p)
        assert f"| {p:.3g} |" in md
    assert "Class acc. (ours)" in md  # the embedded preset's class accuracy is shown
    assert tiny.loc["demar", "class_accuracy_mean"] == pytest.approx(0.625)
    # the small size has only MAR and De-MAR: two ablations, so it is shown too, with one seed each
    small = df[df["size"] == "small"].set_index("ablation")
    assert small.loc["demar", "fid_mean"] == pytest.approx(30.0) and small.loc["demar", "seeds"] == 1
    assert np.isnan(small.loc["demar", "fid_p_vs_mar"])
    assert small.loc["diff_head", "seeds"] == 0
    assert (tree / "out" / "table4.tex").read_text().count(r"\checkmark") == 8


def test_one_seed_reports_no_interval_and_na_test(tmp_path):
    make_tree(tmp_path, seeds=(0,))
    _, rows = load_row_data(tmp_path / "params.yaml", tmp_path / "metrics", tmp_path / "samples")
    md = to_markdown(build_table4(rows, preset="embedded").display)
    assert "n/a" in md and "[" not in md
    assert "| 50.00 |" in md


def test_summary_and_welch_match_scipy():
    x = [3.0, 4.5, 5.0, 7.25]
    s = summarize(x, confidence=0.9)
    low, high = stats.t.interval(0.9, df=3, loc=np.mean(x), scale=stats.sem(x))
    assert (s.n, s.mean, s.ci_low, s.ci_high) == (4, pytest.approx(np.mean(x)), pytest.approx(low), pytest.approx(high))
    assert summarize([2.0]).has_interval is False
    assert summarize([float("nan")]).n == 0
    assert welch_p([1.0], [2.0, 3.0]) is None
    assert welch_p([1.0, 1.0], [2.0, 2.0]) is None  # no variance on either side: undefined
    assert welch_p(x, [1.0, 2.0, 2.5]) == pytest.approx(stats.ttest_ind(x, [1.0, 2.0, 2.5], equal_var=False).pvalue)


def test_holm_adjusts_step_down_and_keeps_order():
    # sorted 0.01, 0.03, 0.04 (m = 3): 0.03, max(0.03, 0.06) = 0.06, max(0.06, 0.04) = 0.06
    assert holm([0.04, 0.01, 0.03]) == [pytest.approx(0.06), pytest.approx(0.03), pytest.approx(0.06)]
    assert holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1
    assert holm([None, 0.02, 0.04]) == [None, pytest.approx(0.04), pytest.approx(0.04)]  # None is not a test
    assert holm([]) == []


def test_table4_adjusts_the_three_comparisons_of_a_size_by_holm(built):
    tree, _ = built
    df = pd.read_csv(tree / "out" / "table4.csv")
    tiny = df[df["size"] == "tiny"].set_index("ablation")
    raw = [stats.ttest_ind(TINY_FID[a], TINY_FID["mar"], equal_var=False).pvalue for a in ("diff_head", "de_head", "demar")]
    m = len(raw)
    order = np.argsort(raw)
    expected = np.maximum.accumulate([min(1.0, (m - k) * raw[i]) for k, i in enumerate(order)])
    for k, i in enumerate(order):
        ablation = ("diff_head", "de_head", "demar")[i]
        assert tiny.loc[ablation, "fid_p_holm"] == pytest.approx(expected[k])
        assert bool(tiny.loc[ablation, "fid_significant"]) == (expected[k] < 0.05)
    assert np.isnan(tiny.loc["mar", "fid_p_holm"])
    md = (tree / "out" / "table4.md").read_text()
    assert "p Holm" in md and "Sig. (0.05)" in md


def test_table2_inserts_our_family_rows_in_the_mask_group(built):
    tree, _ = built
    df = pd.read_csv(tree / "out" / "table2.csv")
    ours = df[df["ours"]]
    assert list(ours["model"]) == [
        "MAR-tiny (ours, embedded)",
        "MAR-small (ours, embedded)",
        "De-MAR-tiny (ours, embedded)",
        "De-MAR-small (ours, embedded)",
    ]
    assert (ours["type"] == "Mask.").all()
    assert ours.index.min() > df.index[df["model"] == "De-MAR-H"][0]  # after the paper's Mask. rows
    assert len(df) == len(pd.read_csv(Path("reports/paper/table2_imagenet256.csv"))) + 4
    assert ours.set_index("model").loc["De-MAR-tiny (ours, embedded)", "fid_cfg"] == pytest.approx(40.5)
    assert ours.set_index("model").loc["MAR-small (ours, embedded)", "params"] == "4.0M"
    md = (tree / "out" / "table2.md").read_text()
    assert "MAR-tiny (ours, embedded)" in md and "| 1.55 |" in md  # ours and the paper's MAR-H


def test_time_fid_points_are_averaged_over_seeds(tree):
    _, rows = load_row_data(tree / "params.yaml", tree / "metrics", tree / "samples")
    curves = time_fid_curves(rows)
    assert set(curves) == {("MAR", "tiny"), ("MAR", "small"), ("De-MAR", "tiny"), ("De-MAR", "small")}
    # MAR tiny at 2 AR steps: seconds 0.02 and 0.04, FID 60 and 64; the error bar is the t-interval's half-width
    half = stats.t.ppf(0.975, df=1) * stats.sem([60.0, 64.0])
    assert curves[("MAR", "tiny")][0] == (pytest.approx(0.03), pytest.approx(62.0), pytest.approx(half))
    assert [p[0] for p in curves[("De-MAR", "small")]] == sorted(p[0] for p in curves[("De-MAR", "small")])


def test_html_is_self_contained(built):
    tree, result = built
    page = (tree / "out" / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "http" not in " ".join(refs) and "<script" not in page and "<link" not in page
    assert page.count("<img") == 2 + len(list((tree / "samples").glob("*/grid.png")))
    assert "no sample grid" in page and any("demar_small_s0" in n for n in result.notes)
    assert "2.31" in page and "MAR-tiny (ours, embedded)" in page


def test_missing_metrics_file_is_a_clear_error(tree):
    (tree / "metrics" / "evaluate" / "de_head_tiny_s1.json").unlink()
    (tree / "metrics" / "time_fid" / "demar_tiny_s0.json").unlink()
    with pytest.raises(MissingMetricsError) as err:
        build(tree)
    assert str(tree / "metrics" / "evaluate" / "de_head_tiny_s1.json") in str(err.value)
    assert str(tree / "metrics" / "time_fid" / "demar_tiny_s0.json") in str(err.value)
    assert not (tree / "out").exists()


def test_stale_metrics_file_is_an_error(tree):
    path = tree / "metrics" / "train" / "mar_tiny_s1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "seed": 7}))
    with pytest.raises(StaleMetricsError, match=r"mar_tiny_s1\.json has seed=7"):
        build(tree)


def test_unreachable_or_absent_mlflow_still_builds(built, tmp_path):
    tree, result = built
    assert result.mlflow.table is None and "unreachable" in result.mlflow.note
    assert "unreachable" in (tree / "out" / "mlflow_runs.md").read_text()
    assert "unreachable" in (tree / "out" / "index.html").read_text()
    absent = compare_runs(f"sqlite:///{tmp_path / 'none.db'}", "embedded", ["fid"])
    assert absent.table is None and "no MLflow store" in absent.note and not (tmp_path / "none.db").exists()


def test_mlflow_comparison_and_report_stage(tree, mlflow_uri, monkeypatch):
    from demar.tracking import stage_run
    from pipelines.report import main

    monkeypatch.setenv("DEMAR_REPRO_ID", "old")
    with stage_run("train", row="mar_tiny_s0", seed=0) as run:
        run.log_metrics({"loss": 1.0})
    with stage_run("evaluate", row="mar_tiny_s0", seed=0) as run:
        run.log_metrics({"fid": 52.0})
    monkeypatch.setenv("DEMAR_REPRO_ID", "new")
    with stage_run("train", row="mar_tiny_s0", seed=0) as run:
        for step, loss in enumerate([0.9, 0.7, 0.5]):
            run.log_metrics({"loss": loss}, step=step)
    with stage_run("evaluate", row="demar_tiny_s0", seed=0) as run:
        run.log_metrics({"fid": 40.0, "is": 12.0})

    root = tree
    assert (
        main(
            [
                "--params",
                str(root / "params.yaml"),
                "--metrics",
                str(root / "metrics"),
                "--samples",
                str(root / "samples"),
                "--out",
                str(root / "out"),
            ]
        )
        == 0
    )
    runs = pd.read_csv(root / "out" / "mlflow_runs.csv")
    assert len(runs) == 3 and "report" not in set(runs["stage"])
    by = runs.set_index(["stage", "row"])
    assert by.loc[("train", "mar_tiny_s0"), "loss"] == pytest.approx(0.5)  # the newer of the two train runs
    assert bool(by.loc[("train", "mar_tiny_s0"), "latest_repro"])
    assert not bool(by.loc[("evaluate", "mar_tiny_s0"), "latest_repro"])  # kept from the earlier reproduction
    assert by.loc[("evaluate", "demar_tiny_s0"), "fid"] == pytest.approx(40.0)
    assert (root / "out" / "fig_train_curves.png").read_bytes()[:8] == PNG_MAGIC
    md = (root / "out" / "mlflow_runs.md").read_text()
    assert "latest reproduction new" in md and "mar_tiny_s0" in md

    import mlflow

    report_runs = mlflow.search_runs(experiment_names=["demar-embedded"], filter_string="tags.`demar.work` = 'report'")
    assert len(report_runs) == 1 and report_runs.iloc[0]["status"] == "FINISHED"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(report_runs.iloc[0]["run_id"], "report")]
    assert "report/index.html" in artifacts and "report/table4.md" in artifacts


def test_the_page_has_a_studies_section_only_when_asked(tree):
    page = lambda: (tree / "out" / "index.html").read_text()  # noqa: E731
    build(tree)
    assert "Optuna studies" not in page()
    build(tree, studies_dir=tree / "no_studies")
    assert "<h2>Optuna studies</h2>" in page() and "No study report" in page()
