"""The ingestion stage end to end on synthetic DICOM, hand-built bad input and a .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import main as cli_main
from tasks import reports
from tasks.config import Params
from tasks.data import dicom_rejections, synthetic
from tasks.data.dataset import load_processed
from tasks.data.quarantine import DUPLICATE_SOP_UID, NO_LABEL
from tasks.errors import MedtransferError
from tasks.stages.ingest import run_ingest
from tests.conftest import make_mono_dataset, write_dataset


def test_synthetic_default_ingests_every_file(params: Params) -> None:
    result = run_ingest(params, progress=False)
    dataset = load_processed(params.data.processed_dir)
    assert result.files_seen == result.ingested > 30
    assert result.quarantined == 0
    assert dataset.images.shape == (result.images, 32, 32) and dataset.images.dtype == np.uint8
    assert dataset.classes == list(synthetic.LABEL_NAMES)
    for split in ("train", "val", "test"):
        assert set(np.unique(dataset.labels[dataset.indices(split)])) == {0, 1}, split
    report = reports.INGEST.read(params.reports_dir)
    assert report["files_seen"] == report["ingested"] + report["quarantined"]
    notes = ";".join(dataset.manifest["notes"])
    assert "monochrome1_inverted" in notes and "rescale" in notes and "window" in notes


def test_split_never_shares_a_patient(params: Params) -> None:
    run_ingest(params, progress=False)
    manifest = load_processed(params.data.processed_dir).manifest
    splits_per_patient = manifest.groupby("patient_hash")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert manifest["patient_hash"].nunique() == params.synthetic.n_patients


def test_no_patient_identifier_anywhere_in_the_output(params: Params) -> None:
    run_ingest(params, progress=False)
    patients = synthetic.make_patients(synthetic.SyntheticConfig.from_params(params))
    forbidden = {"DOE^JANE", "Synthetic General Hospital", "SMITH^JOHN"}
    for patient in patients:
        forbidden |= {patient.patient_id, patient.patient_name, patient.birth_date}
    outputs = [
        *Path(params.data.processed_dir).rglob("*"),
        *Path(params.reports_dir).rglob("*"),
    ]
    scanned = 0
    for path in (p for p in outputs if p.is_file()):
        content = path.read_bytes()
        for value in forbidden:
            assert value.encode() not in content, f"{value!r} leaked into {path.name}"
        scanned += 1
    assert scanned >= 6  # images, labels, manifest, quarantine, dataset.json, ingest.json


def test_same_input_same_bytes(params: Params, tmp_path: Path) -> None:
    first = run_ingest(params, progress=False)
    other = params.with_overrides([f"data.processed_dir={tmp_path / 'again'}"])
    second = run_ingest(other, progress=False)
    for name in ("images.npy", "labels.npy", "manifest.csv", "dataset.json"):
        assert (first.processed_dir / name).read_bytes() == (
            second.processed_dir / name
        ).read_bytes(), name


def test_serial_and_parallel_decoding_agree(params: Params, tmp_path: Path) -> None:
    parallel = run_ingest(params.with_overrides(["data.workers=2"]), progress=False)
    serial = run_ingest(
        params.with_overrides(["data.workers=1", f"data.processed_dir={tmp_path / 's'}"]),
        progress=False,
    )
    assert (parallel.processed_dir / "images.npy").read_bytes() == (
        serial.processed_dir / "images.npy"
    ).read_bytes()


def _bad_input_folder(root: Path) -> tuple[Path, Path]:
    """A folder holding every kind of bad file next to good ones, and its labels CSV."""
    rng = np.random.default_rng(0)
    good = lambda pid, uid=None: make_mono_dataset(  # noqa: E731
        rng.integers(0, 4096, (32, 32), dtype=np.uint16), patient_id=pid, sop_uid=uid
    )
    folder = root / "dicoms"
    rows = []
    for i in range(6):
        write_dataset(good(f"P{i}"), folder / f"good_{i}.dcm")
        rows.append((f"good_{i}.dcm", "sick" if i % 2 else "healthy"))
    (folder / "notes.txt").write_text("not an image")
    rows.append(("notes.txt", "sick"))
    truncated = folder / "truncated.dcm"
    write_dataset(good("P7"), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-500])
    rows.append(("truncated.dcm", "sick"))
    no_pixels = good("P8")
    del no_pixels.PixelData
    write_dataset(no_pixels, folder / "no_pixels.dcm")
    rows.append(("no_pixels.dcm", "sick"))
    mpeg = make_mono_dataset(np.zeros((8, 8), dtype=np.uint8), bits_stored=8)
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    from pydicom.encaps import encapsulate

    mpeg.PixelData = encapsulate([b"\x00" * 64])
    write_dataset(mpeg, folder / "video.dcm")
    rows.append(("video.dcm", "sick"))
    write_dataset(good("P9"), folder / "sub" / "unlabelled.dcm")  # not in the CSV
    write_dataset(good("P10", uid="1.2.3.4.5"), folder / "dup_a.dcm")
    write_dataset(good("P11", uid="1.2.3.4.5"), folder / "dup_b.dcm")
    rows += [("dup_a.dcm", "sick"), ("dup_b.dcm", "healthy")]
    csv_path = root / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv_path, index=False)
    return folder, csv_path


def test_bad_files_are_quarantined_with_reasons(params: Params, tmp_path: Path) -> None:
    folder, csv_path = _bad_input_folder(tmp_path)
    result = run_ingest(
        params.with_overrides([f"data.source={folder}", f"data.labels_csv={csv_path}"]),
        progress=False,
    )
    quarantine = pd.read_csv(result.processed_dir / "quarantine.csv").set_index("source_file")
    assert quarantine.loc["notes.txt", "reason"] == dicom_rejections.NOT_DICOM
    assert quarantine.loc["truncated.dcm", "reason"] == dicom_rejections.DECODE_FAILED
    assert quarantine.loc["no_pixels.dcm", "reason"] == dicom_rejections.NO_PIXEL_DATA
    assert quarantine.loc["video.dcm", "reason"] == dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX
    assert quarantine.loc["sub/unlabelled.dcm", "reason"] == NO_LABEL
    assert quarantine.loc["dup_b.dcm", "reason"] == DUPLICATE_SOP_UID
    assert "dup_a.dcm" not in quarantine.index
    assert result.files_seen == 13 and result.ingested == 7 and result.quarantined == 6
    assert sum(result.quarantined_by_reason.values()) == result.quarantined
    manifest = pd.read_csv(result.processed_dir / "manifest.csv")
    assert set(manifest["source_file"]) | set(quarantine.index) == {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    }


def test_labels_from_class_subfolders(params: Params, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(8):
        label = "effusion" if i % 2 else "clear"
        ds = make_mono_dataset(rng.integers(0, 4096, (16, 16), dtype=np.uint16), patient_id=f"P{i}")
        write_dataset(ds, tmp_path / "by_class" / label / f"{i}.dcm")
    write_dataset(
        make_mono_dataset(np.ones((4, 4), dtype=np.uint16)), tmp_path / "by_class" / "root.dcm"
    )
    result = run_ingest(
        params.with_overrides([f"data.source={tmp_path / 'by_class'}"]), progress=False
    )
    assert result.classes == {"clear": 4, "effusion": 4}
    assert result.quarantined_by_reason[NO_LABEL] == 1  # a file outside any class folder


def test_npz_keeps_the_official_split(params: Params, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "mini.npz", **arrays)
    result = run_ingest(
        params.with_overrides([f"data.source={tmp_path / 'mini.npz'}"]), progress=False
    )
    dataset = load_processed(result.processed_dir)
    assert [len(dataset.indices(s)) for s in ("train", "val", "test")] == [20, 6, 8]
    assert dataset.images.shape == (34, 32, 32)
    assert result.files_seen == result.ingested == 34


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "holds no files"),
        ("bad_csv", "could not be read"),
        ("csv_columns", "needs a 'label'"),
        ("one_class", "at least two labels"),
        ("missing", "neither 'synthetic'"),
    ],
)
def test_bad_configuration_is_a_clear_error_and_exit_status(
    tmp_path: Path, params: Params, setup: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    csv_path = tmp_path / "labels.csv"
    if setup != "empty":
        for i in range(3):
            write_dataset(
                make_mono_dataset(np.eye(4, dtype=np.uint16), patient_id=f"P{i}"),
                folder / f"{i}.dcm",
            )
    if setup == "bad_csv":
        csv_path.write_bytes(b"\xff\xfe\x00garbage\x00\n\x01")
    elif setup == "csv_columns":
        csv_path.write_text("file,diagnosis\n0.dcm,a\n")
    else:
        csv_path.write_text("path,label\n" + "".join(f"{i}.dcm,same\n" for i in range(3)))
    source = tmp_path / "nowhere" if setup == "missing" else folder
    overrides = [f"data.source={source}", f"data.labels_csv={csv_path}"]

    with pytest.raises(MedtransferError, match=message):
        run_ingest(params.with_overrides(overrides), progress=False)

    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(params.to_dict()))
    status = cli_main(
        ["ingest", "--params", str(params_file), "-q", *[f"-S{o}" for o in overrides]]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err and "Traceback" not in captured.err
    assert not Path(params.data.processed_dir).exists()  # nothing half-written
