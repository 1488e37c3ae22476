"""``medtransfer monitor``: population stability against the training deciles, the abstention
share with its interval, drift flags, the report, the plot and the MLflow run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.cli import main as cli_main
from tasks.config import Params
from tasks.model.profile import DataProfile
from tasks.model.request_store import RequestStore, read_recent
from tasks.monitoring.drift import compare, population_stability
from tasks.reports import MONITOR, as_json

CLASSIFIED = {"abstained": False, "refused": False}
REFUSED = {"abstained": False, "refused": True}
EDGES = [float(e) for e in np.arange(1, 10) / 10]  # deciles of U(0, 1)


def test_psi_is_zero_for_the_training_distribution_and_known_for_a_collapsed_one() -> None:
    uniform = (np.arange(1000) + 0.5) / 1000
    assert population_stability(uniform, EDGES) == pytest.approx(0.0, abs=1e-12)
    # All in one bin: 0.9 ln(10) + 9 (1e-4 - 0.1) ln(1e-3), the floor keeping it finite.
    assert population_stability(np.full(50, 0.05), EDGES) == pytest.approx(8.28309, abs=1e-4)


def test_an_empty_window_has_no_abstention_share_and_no_interval(
    params: Params, tmp_path: Path
) -> None:
    _profile(tmp_path)
    report = compare([], DataProfile.load(tmp_path), params)
    assert report["n"] == 0 and report["drifted"] == []
    assert np.isnan(report["abstention_share"])
    assert all(np.isnan(report["abstention_interval"]))  # one Wilson: (nan, nan) at n = 0
    assert as_json(report)["abstention_interval"] == [None, None]


def _profile(folder: Path) -> None:
    DataProfile(
        scope=None,
        multiframe="middle",
        source_kind="synthetic",
        n_train=100,
        n_val=20,
        statistics={"mean": EDGES, "std": EDGES, "saturated": EDGES},
        ood={"method": "knn", "threshold": 0.95, "false_rejection": 0.05, "score_deciles": EDGES},
        probability_deciles=EDGES,
    ).save(folder)


def test_monitor_flags_drifted_statistics_and_abstentions(
    params: Params, tmp_path: Path, fresh_mlflow_store: str
) -> None:
    folder = Path(params.reports_dir) / "serving_profile"
    folder.mkdir(parents=True)
    _profile(folder)
    store_path = tmp_path / "requests.sqlite"
    store = RequestStore(store_path, max_records=1000)
    rng = np.random.default_rng(0)
    for i in range(200):
        # Images all bright (mean ~0.9: drifted), scores and probabilities as in training.
        image = np.full((8, 8), 230, dtype=np.uint8)
        score = float(rng.uniform())
        store.record(
            "/classify/png",
            score,
            np.array([0.5, rng.uniform()]),
            image,
            abstained=score >= 0.95 or i % 4 == 0,
            refused=False,
        )
    assert len(read_recent(store_path, 50)) == 50
    code = cli_main(
        [
            "monitor",
            "--json",
            "-S",
            f"serving.monitor_store={store_path}",
            "-S",
            f"reports_dir={params.reports_dir}",
            "-S",
            "monitor.window=200",
        ]
    )
    assert code == 1  # drift found
    report = MONITOR.read(params.reports_dir)
    assert report["n"] == 200
    assert report["psi"]["mean"] > report["psi_max"] and "mean" in report["drifted"]
    assert report["psi"]["ood_score"] < report["psi_max"]
    assert "abstention_share" in report["drifted"]  # ~29% against 15% allowed
    low, high = report["abstention_interval"]
    assert low < report["abstention_share"] < high
    assert (Path(params.reports_dir) / "plots" / "monitor.png").is_file()
    assert json.loads(json.dumps(report))["drift"] is True
    client = MlflowClient(fresh_mlflow_store)  # its own experiment, not among the trainings
    monitored = client.get_experiment_by_name("medtransfer-monitor")
    assert [run.info.run_name for run in client.search_runs([monitored.experiment_id])] == [
        "monitor"
    ]
    assert client.get_experiment_by_name("medtransfer") is None


def test_monitor_flags_no_drift_on_too_few_requests_and_says_how_many_it_needs(
    params: Params, tmp_path: Path, fresh_mlflow_store: str, capsys
) -> None:
    folder = Path(params.reports_dir) / "serving_profile"
    folder.mkdir(parents=True)
    _profile(folder)
    store_path = tmp_path / "requests.sqlite"
    store = RequestStore(store_path, max_records=1000)
    for _ in range(5):  # bright images: the mean's PSI alone would call it drift
        image = np.full((8, 8), 230, dtype=np.uint8)
        store.record(
            "/classify/png", 0.5, np.array([0.5, 0.5]), image, abstained=False, refused=False
        )
    code = cli_main(
        [
            "monitor",
            "-S",
            f"serving.monitor_store={store_path}",
            "-S",
            f"reports_dir={params.reports_dir}",
            "-S",
            "monitor.min_requests=30",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "monitor: 5 recent requests compared with the training profile"
    assert printed[1] == (
        "  abstained or refused: 0.000 (95% CI 0.000-0.434, n=5); expected 0.050, drift above 0.150"
    )
    assert printed[-1] == (
        "drift: not judged, 5 of the 30 requests needed (monitor.min_requests); "
        "run it again after more requests"
    )
    report = MONITOR.read(params.reports_dir)
    assert report["psi"]["mean"] > report["psi_max"]  # measured, but not flagged on n=5
    assert report["drifted"] == [] and report["drift"] is False


def test_the_monitor_deployment_runs_on_its_cron_with_the_params_file(
    params: Params, tmp_path: Path
) -> None:
    from flows.deployments import MONITOR_DEPLOYMENT, monitor_deployments

    [deployment] = monitor_deployments(
        params, tmp_path / "params.yaml", ["monitor.window=50"], work_pool_name="cpu"
    )
    assert (deployment.flow_name, deployment.name) == ("monitor", MONITOR_DEPLOYMENT)
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == params.monitor.cron == "0 * * * *"
    assert deployment.parameters == {
        "params_file": str((tmp_path / "params.yaml").resolve()),
        "overrides": ["monitor.window=50"],
    }
    assert deployment.work_pool_name == "cpu" and deployment.concurrency_limit == 1
    assert monitor_deployments(params.with_overrides(["monitor.cron=null"]), "p.yaml") == []


def test_a_flood_of_refusals_keeps_the_classified_rows_the_drift_check_compares(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "requests.sqlite"
    store = RequestStore(store_path, max_records=100)
    image = np.full((8, 8), 128, dtype=np.uint8)
    for i in range(150):  # classified: scores 0, 1, ..., 149
        store.record("/classify/png", float(i), np.array([0.5, 0.5]), image, **CLASSIFIED)
    for _ in range(1200):  # then a flood of out-of-scope refusals, 8x the bound
        store.record("/classify/dicom", float("nan"), None, None, **REFUSED)
    with sqlite3.connect(store_path) as connection:
        kept = dict(connection.execute("SELECT refused, COUNT(*) FROM requests GROUP BY refused"))
        scores = [
            r[0] for r in connection.execute("SELECT ood_score FROM requests WHERE NOT refused")
        ]
    # 1350 writes, trimmed at each 100th: the latest 100 of each kind, 50 refusals since.
    assert kept == {0: 100, 1: 150}
    assert scores == [float(i) for i in range(50, 150)]
    rows = read_recent(store_path, 20)
    assert [r["ood_score"] for r in rows if not r["refused"]] == [float(i) for i in range(130, 150)]
    assert sum(r["refused"] for r in rows) == 20  # the refusals since those, at most the window


def test_read_recent_interleaves_the_refusals_recorded_within_the_classified_window(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "requests.sqlite"
    store = RequestStore(store_path, max_records=100)
    image = np.full((8, 8), 128, dtype=np.uint8)
    for i in range(10):  # c r c r ...: five classified (scores 0, 2, 4, 6, 8), five refused
        if i % 2:
            store.record("/classify/dicom", float("nan"), None, None, **REFUSED)
        else:
            store.record("/classify/png", float(i), np.array([0.5, 0.5]), image, **CLASSIFIED)
    rows = read_recent(store_path, 3)
    assert [(r["refused"], r["ood_score"]) for r in rows] == [
        (0, 4.0),
        (1, None),
        (0, 6.0),
        (1, None),
        (0, 8.0),
        (1, None),
    ]


def test_swapped_colour_channels_drift_per_channel_while_the_pooled_figures_do_not(
    params: Params, tmp_path: Path
) -> None:
    from tasks.model.profile import deciles, image_statistics, statistic_names

    rng = np.random.default_rng(0)
    images = np.empty((200, 3, 8, 8), np.uint8)
    images[:, 0] = rng.integers(150, 250, (200, 1, 1))  # reddish
    images[:, 1] = rng.integers(0, 256, (200, 8, 8))
    images[:, 2] = rng.integers(0, 100, (200, 1, 1))
    stats = image_statistics(images)
    DataProfile(
        scope=None,
        multiframe="middle",
        source_kind="image_folder",
        n_train=200,
        n_val=200,
        statistics={name: deciles(stats[:, i]) for i, name in enumerate(statistic_names(3))},
        ood={"method": "knn", "threshold": 0.95, "false_rejection": 0.05, "score_deciles": EDGES},
        probability_deciles=EDGES,
    ).save(tmp_path)
    store = RequestStore(tmp_path / "requests.sqlite", max_records=1000)
    for image in images[:, ::-1]:  # a camera sending BGR: the same values, channels swapped
        store.record(
            "/classify/png", rng.uniform(), np.array([0.5, rng.uniform()]), image, **CLASSIFIED
        )
    report = compare(
        read_recent(tmp_path / "requests.sqlite", 200), DataProfile.load(tmp_path), params
    )
    assert {"mean_r", "mean_b"} <= set(report["drifted"])
    assert report["psi"]["mean"] == pytest.approx(0.0, abs=1e-9)  # the pooled figures: as trained
    assert report["psi"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert "mean_g" not in report["drifted"]


def test_a_monitor_store_from_before_per_channel_statistics_gains_their_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "requests.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE requests (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
        "route TEXT NOT NULL, ood_score REAL, abstained INTEGER NOT NULL, refused INTEGER NOT "
        "NULL, probabilities TEXT, mean REAL, std REAL, saturated REAL)"
    )
    old.commit()
    old.close()
    store = RequestStore(path, max_records=10)
    store.record("/classify/png", 0.1, None, np.full((3, 4, 4), 255, np.uint8), **CLASSIFIED)
    store.record("/classify/png", 0.1, None, np.zeros((4, 4), np.uint8), **CLASSIFIED)
    colour, gray = read_recent(path, 10)
    assert (colour["mean"], colour["mean_r"], colour["saturated_b"]) == (1.0, 1.0, 1.0)
    assert (gray["mean"], gray["mean_r"]) == (0.0, None)


def test_three_classes_drift_on_any_class_probability_not_only_the_last(
    params: Params, tmp_path: Path
) -> None:
    DataProfile(
        scope=None,
        multiframe="middle",
        source_kind="synthetic",
        n_train=100,
        n_val=100,
        statistics={},
        ood={"method": "knn", "threshold": 0.95, "false_rejection": 0.05, "score_deciles": EDGES},
        probability_deciles=[],
        class_probability_deciles=[EDGES, EDGES, EDGES],
    ).save(tmp_path)
    store = RequestStore(tmp_path / "requests.sqlite", max_records=1000)
    image = np.zeros((8, 8), np.uint8)
    for i in range(100):  # class 0 collapses into one bin; the last class stays as trained
        last = (i + 0.5) / 100
        probabilities = np.array([0.05, 0.95 - last, last])
        store.record("/classify/png", (i + 0.5) / 100, probabilities, image, **CLASSIFIED)
    profile = DataProfile.load(tmp_path)
    report = compare(read_recent(tmp_path / "requests.sqlite", 100), profile, params)
    assert report["psi"]["probability_0"] == pytest.approx(8.28309, abs=1e-4)
    assert report["psi"]["probability_2"] == pytest.approx(0.0, abs=1e-9)
    assert "probability_0" in report["drifted"] and "probability_2" not in report["drifted"]
    assert "probability" not in report["psi"]


def test_a_profile_saved_before_per_class_deciles_loads_and_watches_the_positive_class(
    tmp_path: Path,
) -> None:
    _profile(tmp_path)
    record = json.loads((tmp_path / "profile.json").read_text())
    del record["class_probability_deciles"]
    (tmp_path / "profile.json").write_text(json.dumps(record))
    profile = DataProfile.load(tmp_path)
    assert profile.class_probability_deciles == [] and profile.probability_deciles == EDGES
