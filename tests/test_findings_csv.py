"""A folder of PNG files whose findings come from a labels CSV, in both public layouts
(CheXpert's one column per finding with uncertain ``-1`` and blank cells, ChestX-ray14's
``|``-joined ``Finding Labels``), through ``medtransfer run`` as multi-label, and the served
Bento answering every finding; unknown cells are left out of the loss and of the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.config import Params
from tasks.data.synthetic import FINDING_NAMES
from tasks.errors import MedtransferError
from tests.finding_samples import CHESTXRAY14_CSV, CHEXPERT_CSV, write_finding_folder
from tests.test_colour_pipeline import TINY

N_IMAGES = 60
# The two layouts as data.* overrides: CheXpert's columns (uncertain cells unknown) and
# ChestX-ray14's findings column (whose findings are sorted by name).
LAYOUTS = {
    "chexpert": [
        f"data.findings=[{','.join(FINDING_NAMES)}]",
        "data.uncertain=ignore",
    ],
    "chestxray14": ["data.findings_column=Finding Labels"],
}
CSV_OF = {"chexpert": CHEXPERT_CSV, "chestxray14": CHESTXRAY14_CSV}


@pytest.fixture(scope="module")
def finding_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The PNG folder and its two tables, once per module; and each image's drawn findings."""
    return write_finding_folder(tmp_path_factory.mktemp("findings") / "images", N_IMAGES, 32, 5)


def _run_params(root: Path, folder: Path, layout: str) -> Params:
    from tests.conftest import outputs_in, params_in

    return params_in(root).with_overrides(
        [
            *TINY,
            f"data.source={folder}",
            f"data.labels_csv={folder.parent / CSV_OF[layout]}",
            *LAYOUTS[layout],
            "gates.min_worst_group_auc=null",
            f"registry.model_name=findings-{layout}",
            *outputs_in(root),
            "serving.ood_gate=false",  # a tiny model's reply always carries its findings
        ]
    )


@pytest.fixture(scope="module")
def csv_runs(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_harness,
    empty_mlflow_db: Path,
    finding_folder: tuple[Path, np.ndarray],
) -> dict[str, dict]:
    """Each layout through ``medtransfer run`` once per module (tiny settings: the path is
    under test, not the model): its params, exit status and stage reports."""
    from flows.cli import main
    from tests.conftest import mlflow_store_in

    folder, _ = finding_folder
    runs = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        params = _run_params(root, folder, layout)
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
        with mlflow_store_in(root, empty_mlflow_db):
            status = main(["run", "--params", str(params_file), "--quiet"])
        reports_dir = Path(params.reports_dir)
        runs[layout] = {
            "params": params,
            "status": status,
            **{
                name: json.loads((reports_dir / f"{name}.json").read_text())
                for name in ("ingest", "metrics", "register", "package")
            },
        }
    return runs


def _known_labels(folder: Path, layout: str) -> np.ndarray:
    """The table's findings per file in FINDING_NAMES order: 1, 0, NaN where uncertain."""
    import pandas as pd

    table = pd.read_csv(folder.parent / CSV_OF[layout], dtype=str, keep_default_na=False)
    cells = table[list(FINDING_NAMES)].replace("", "0").astype(float).to_numpy()
    return np.where(cells == -1, np.nan, cells).astype(np.float32)


@pytest.mark.slow
def test_a_chexpert_table_with_uncertain_and_blank_cells_is_ingested_as_findings_with_nan(
    csv_runs: dict, finding_folder: tuple[Path, np.ndarray]
) -> None:
    from tasks.data.dataset import load_processed

    folder, truth = finding_folder
    run = csv_runs["chexpert"]
    dataset = load_processed(run["params"].data.processed_dir)
    order = np.argsort(dataset.manifest["source_file"].to_numpy())
    assert dataset.multilabel and dataset.classes == list(FINDING_NAMES)
    expected = _known_labels(folder, "chexpert")
    np.testing.assert_array_equal(dataset.labels[order], expected)  # NaN where uncertain
    assert np.isnan(expected).sum() == 26  # every 7th of 180 cells
    # blank cells are absent, as the truth drawn for them
    known = np.isfinite(expected)
    np.testing.assert_array_equal(expected[known], truth[known])
    ingest = run["ingest"]
    assert (ingest["label_kind"], ingest["source_kind"], ingest["split_by"]) == (
        "multi-label",
        "image_folder",
        "patient",
    )
    assert ingest["files_seen"] == ingest["ingested"] == N_IMAGES
    manifest = dataset.manifest
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1  # no patient in two


@pytest.mark.slow
def test_a_chestxray14_table_gives_one_finding_per_name_it_uses(
    csv_runs: dict, finding_folder: tuple[Path, np.ndarray]
) -> None:
    from tasks.data.dataset import load_processed

    _, truth = finding_folder
    dataset = load_processed(csv_runs["chestxray14"]["params"].data.processed_dir)
    names = sorted(FINDING_NAMES)
    assert dataset.classes == names
    order = np.argsort(dataset.manifest["source_file"].to_numpy())
    columns = [FINDING_NAMES.index(name) for name in names]
    np.testing.assert_array_equal(dataset.labels[order], truth[:, columns])


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_medtransfer_run_evaluates_registers_and_packages_each_finding(
    csv_runs: dict, layout: str
) -> None:
    run = csv_runs[layout]
    assert run["status"] == 0
    test = run["metrics"]["test"]
    for row in test["findings"]:
        assert row["auc_ci95"]["low"] <= row["auc"] <= row["auc_ci95"]["high"]
    assert test["auc"] == pytest.approx(np.mean([row["auc"] for row in test["findings"]]))
    assert run["register"]["test_auc"] == pytest.approx(test["ci95"]["auc"]["low"])
    assert Path(run["package"]["archive"]).is_file()


@pytest.mark.slow
def test_each_findings_figures_count_only_its_known_test_cells(csv_runs: dict) -> None:
    from tasks.data.dataset import load_processed

    run = csv_runs["chexpert"]
    dataset = load_processed(run["params"].data.processed_dir)
    _, labels = dataset.subset("test")
    for k, row in enumerate(run["metrics"]["test"]["findings"]):
        known = np.isfinite(labels[:, k])
        assert (row["n_known"], row["n_positive"]) == (known.sum(), (labels[known, k] == 1).sum())
    assert np.isnan(labels).any()  # the test split holds unknown cells, left out above


@pytest.mark.slow
def test_the_served_bento_answers_every_csv_findings_probability_and_decision(
    csv_runs: dict, finding_folder: tuple[Path, np.ndarray], tmp_path: Path
) -> None:

    from tests.deploy.conftest import post_png_to_bento

    folder, truth = finding_folder
    run = csv_runs["chexpert"]
    image = folder / f"img/{int(np.flatnonzero(truth.sum(axis=1) >= 2)[0]):04d}.png"
    # the store the package stage used: BentoML keeps the first home a process used, so in a
    # session that packaged earlier (another module's fixture) it is not this run's folder
    home = Path(run["package"]["bentoml_home"])
    reply = post_png_to_bento(
        run["package"]["bento"], home, image.read_bytes(), tmp_path / "server.log"
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    thresholds = list(run["metrics"]["thresholds"].values())
    assert [row["finding"] for row in body["findings"]] == list(FINDING_NAMES)
    assert [row["threshold"] for row in body["findings"]] == pytest.approx(thresholds)
    for row in body["findings"]:
        assert 0.0 <= row["probability"] <= 1.0
        assert row["present"] == (row["probability"] >= row["threshold"])
    present = [row["finding"] for row in body["findings"] if row["present"]]
    assert body["label"] == ("|".join(present) or "No Finding")


def test_the_masked_loss_is_the_bce_of_the_known_cells_computed_by_hand() -> None:
    from tasks.model.label_kind import MULTI_LABEL

    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), float("nan")]])
    pos_weight = torch.tensor([2.0, 0.5])

    def bce(z: float, y: float, w: float) -> float:  # -w y log s(z) - (1 - y) log(1 - s(z))
        s = 1 / (1 + np.exp(-z))
        return -(w * y * np.log(s) + (1 - y) * np.log(1 - s))

    cells = [bce(2.0, 1, 2.0), bce(0.5, 0, 2.0), bce(3.0, 1, 0.5)]  # the three known cells
    loss = MULTI_LABEL.loss(pos_weight)(logits, labels)
    assert float(loss) == pytest.approx(np.mean(cells), rel=1e-6)
    total = MULTI_LABEL.loss(pos_weight, reduction="sum")(logits, labels)
    assert float(total) == pytest.approx(np.sum(cells), rel=1e-6)
    # an unknown cell gives the logits no gradient; without one the loss is plain BCE
    logits.requires_grad_(True)
    MULTI_LABEL.loss(pos_weight)(logits, labels).backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0, 1] == 0
    known = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits[:2].detach(), known)
    masked = MULTI_LABEL.loss(pos_weight)(logits[:2].detach(), known)
    assert float(masked) == pytest.approx(float(plain), rel=1e-6)


def test_a_finding_unknown_in_every_image_is_refused_in_one_line(
    params: Params, finding_folder: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import pandas as pd

    from tasks.stages.ingest import run_ingest

    folder, _ = finding_folder
    table = pd.read_csv(folder.parent / CHEXPERT_CSV, dtype=str, keep_default_na=False)
    table["basal-band"] = "-1"
    table.to_csv(tmp_path / "all-uncertain.csv", index=False)
    overrides = [
        f"data.source={folder}",
        f"data.labels_csv={tmp_path / 'all-uncertain.csv'}",
        *LAYOUTS["chexpert"],
        f"data.processed_dir={tmp_path / 'processed'}",
    ]
    with pytest.raises(
        MedtransferError, match=r"\['basal-band'\] are unknown .* in every one"
    ) as err:
        run_ingest(params.with_overrides(overrides), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "processed").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.findings=[a]", "data.findings_column=Finding Labels"],
            "name two layouts; set one of them and the other to null",
        ),
        (["data.findings=[a]", "data.labels_csv=null"], "set data.labels_csv to the CSV"),
        (["data.findings=[a,a]"], "each once and non-empty"),
        (["data.findings_column=' '"], "must name the CSV's column of findings"),
        (["data.uncertain=maybe"], "data.uncertain must be one of"),
    ],
)
def test_contradictory_findings_keys_are_one_line_naming_them(
    overrides: list[str], message: str
) -> None:
    from tasks.config import load_params
    from tests.conftest import REPO

    with pytest.raises(MedtransferError, match=message) as err:
        load_params(REPO / "params.yaml", ["data.labels_csv=labels.csv", *overrides])
    assert "\n" not in str(err.value)


def test_findings_keys_for_an_npz_are_refused_before_anything_is_written(
    params: Params, tmp_path: Path
) -> None:
    from tasks.data.synthetic import write_multi_finding_npz
    from tasks.stages.ingest import run_ingest

    npz = write_multi_finding_npz(tmp_path / "f.npz", {"train": 4, "val": 4, "test": 4}, 32, 1)
    overrides = [f"data.source={npz}", "data.labels_csv=x.csv", "data.findings_column=F"]
    with pytest.raises(MedtransferError, match=r"a \.npz brings its own"):
        run_ingest(params.with_overrides(overrides), progress=False)
    assert not Path(params.data.processed_dir).exists()


def test_a_table_with_two_file_columns_is_refused_in_one_line(
    params: Params, finding_folder: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import pandas as pd

    from tasks.stages.ingest import run_ingest

    folder, _ = finding_folder
    table = pd.read_csv(folder.parent / CHESTXRAY14_CSV, dtype=str)
    table["path"] = table["Image Index"]
    table.to_csv(tmp_path / "two.csv", index=False)
    overrides = [f"data.source={folder}", f"data.labels_csv={tmp_path / 'two.csv'}"]
    with pytest.raises(MedtransferError, match=r"columns \['path', 'Image Index'\], each of"):
        run_ingest(params.with_overrides([*overrides, *LAYOUTS["chestxray14"]]), progress=False)


def test_an_images_findings_label_names_present_then_unknown_findings() -> None:
    from tasks.data.findings import findings_label

    names = ("Atelectasis", "Edema", "Mass")
    assert findings_label(np.array([1, np.nan, 0], np.float32), names) == "Atelectasis|Edema?"
    assert findings_label(np.array([0, 0, 0], np.float32), names) == ""
    # under zeros the same image is "Atelectasis": another label, so another content hash
    assert findings_label(np.array([1, 0, 0], np.float32), names) == "Atelectasis"


def test_images_are_stratified_by_their_rarest_present_finding() -> None:
    from tasks.data.dataset_writer import finding_strata

    # positives per finding: 3, 1, 2; image 1 has findings 0 and 1 (rarest: 1), image 3 has
    # 0 and 2 (rarest: 2), image 4 none present (stratum K = 3), image 5 only unknown
    labels = np.array(
        [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0], [np.nan, 0, np.nan]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(finding_strata(labels), [0, 1, 2, 2, 3, 3])


def test_a_dicom_folder_takes_its_findings_from_the_table_by_path(
    params: Params, tmp_path: Path
) -> None:
    import pandas as pd

    from tasks.data.dataset import load_processed
    from tasks.stages.ingest import run_ingest
    from tests.colour_samples import write_hue_dicom_folder

    folder = write_hue_dicom_folder(tmp_path / "dicom", 12, 32, seed=4)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))
    cells = ["Mass" if i % 3 == 0 else "No Finding" for i in range(12)]
    cells = [f"{c}|Edema" if i % 2 and c != "No Finding" else c for i, c in enumerate(cells)]
    cells = [("Edema" if c == "No Finding" and i % 4 == 1 else c) for i, c in enumerate(cells)]
    pd.DataFrame({"path": paths, "Finding Labels": cells}).to_csv(tmp_path / "f.csv", index=False)
    overrides = [
        f"data.source={folder}",
        f"data.labels_csv={tmp_path / 'f.csv'}",
        *LAYOUTS["chestxray14"],
    ]
    result = run_ingest(params.with_overrides(overrides), progress=False)
    assert (result.source_kind, result.label_kind, result.split_by) == (
        "dicom_folder",
        "multi-label",
        "patient",
    )
    dataset = load_processed(params.data.processed_dir)
    by_file = dict(zip(dataset.manifest["source_file"], dataset.labels.tolist(), strict=True))
    expected = {
        path: [float("Edema" in c.split("|")), float("Mass" in c.split("|"))]
        for path, c in zip(paths, cells, strict=True)
    }
    assert dataset.classes == ["Edema", "Mass"] and by_file == expected
