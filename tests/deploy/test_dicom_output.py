"""The served Bento's DICOM output against a real PACS: a classified DICOM's Structured Report
and Grad-CAM Secondary Capture, C-STOREd into Debian's Orthanc and read back by study, returned
as multipart/related on ``Accept: application/dicom``; PACS failures and non-DICOM inputs."""

from __future__ import annotations

import email
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from serving.pacs import PacsError, PacsTarget, store
from tests.deploy.conftest import start_server, wait_ready
from tests.deploy.orthanc import ORTHANC, Orthanc, start_orthanc
from tests.deploy.samples import SECRET_ID, SECRET_NAME, dataset_bytes, identified_dicom, png_bytes
from tests.processes import stop_server_tree

DICOM_OUT = {"Content-Type": "application/dicom", "Accept": "application/dicom"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports for this file (the last test stops it early)."""
    assert ORTHANC.exists(), "Orthanc is not installed: run `make orthanc`"
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pacs_server(served, orthanc: Orthanc, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The served Bento (the session's package, from a copy of its BentoML home) served again
    with ``MEDTRANSFER_PACS`` pointing at Orthanc: its URL and its folder (``server.log``, the
    monitor store ``requests.sqlite``).

    A copy, because ``bentoml serve`` empties its home's Prometheus multi-process folder when
    it starts: on the session server's own home it wiped that server's /metrics files."""
    root = tmp_path_factory.mktemp("served-pacs")
    home = root / "home"
    shutil.copytree(served.home, home)
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    env["MEDTRANSFER_PACS"] = orthanc.address
    env["MEDTRANSFER_MONITOR_STORE"] = str(root / "requests.sqlite")
    log = root / "server.log"
    process, url = start_server(served.package["bento"], home, log, env)
    try:
        wait_ready(process, url, log)
        yield url, root
    finally:
        stop_server_tree(process)


def identified_ct() -> tuple[bytes, Dataset]:
    """pydicom's CT_small.dcm (in the served model's training data, so not abstained on) with
    a secret patient name and ID, in a study of its own: its bytes and its header."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = SECRET_NAME, SECRET_ID
    ds.StudyInstanceUID = generate_uid()
    return dataset_bytes(ds), ds


def content(dataset: Dataset) -> list[tuple[int, str, str]]:
    """An SR's content tree as (depth, concept meaning, value) rows, depth-first."""
    rows: list[tuple[int, str, str]] = []

    def walk(items, depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            value = {
                "CODE": lambda i: i.ConceptCodeSequence[0].CodeMeaning,
                "NUM": lambda i: repr(float(i.MeasuredValueSequence[0].FloatingPointValue)),
                "TEXT": lambda i: i.TextValue,
                "IMAGE": lambda i: i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                "CONTAINER": lambda i: "",
            }[item.ValueType](item)
            rows.append((depth, name, value))
            walk(item.get("ContentSequence", []), depth + 1)

    walk(dataset.ContentSequence, 0)
    return rows


def expected_content(reply: dict, source_uid: str) -> list[tuple[int, str, str]]:
    """The content rows the SR of a non-abstained ``reply`` must hold (see
    serving/dicom_report.py for the tree)."""
    model = reply["model"]
    rows = [
        (0, "Algorithm Name", model["name"]),
        (0, "Algorithm Version", model["version"]),
        (0, "Algorithm Parameters", f"dataset_version={model['dataset_version']}"),
        (0, "Algorithm Parameters", f"bento_model={model['bento_model']}"),
        (0, "Source image for image processing operation", source_uid),
        (0, "Abstained", "No"),
        (1, "Out-of-distribution score", repr(reply["ood"]["score"])),
        (1, "Out-of-distribution threshold", repr(reply["ood"]["threshold"])),
        (0, "Finding", reply["label"]),
        (1, "Decision threshold", repr(reply["threshold"])),
    ]
    for name, probability in reply["probabilities"].items():
        rows += [(0, "Class", name), (1, "Calibrated probability", repr(probability))]
    found = reply.get("prediction_set")  # when the service serves prediction sets
    if found:
        rows += [(0, "Prediction set", ""), (1, "Nominal coverage", repr(found["coverage"]))]
        rows += [(1, "Member", label) for label in found["labels"]]
    return rows


def check_sr(sr: Dataset, source: Dataset, reply: dict) -> None:
    """The SR is valid (highdicom parses it), in the source's study and patient, references
    the source instance and holds the reply's values."""
    assert sr.SOPClassUID == ComprehensiveSRStorage
    hd.sr.ComprehensiveSR.from_dataset(sr)
    assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == (
        source.StudyInstanceUID,
        source.PatientID,
        source.PatientName,
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert content(sr) == expected_content(reply, source.SOPInstanceUID)


def check_sc(sc: Dataset, source: Dataset) -> None:
    """The SC is a valid derived image of the source's study, marked not for diagnosis."""
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    hd.Image.from_dataset(sc)
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.pixel_array.shape == (256, 256, 3)


def multipart_parts(reply: requests.Response) -> list[Dataset]:
    """The DICOM parts of a ``multipart/related; type="application/dicom"`` reply."""
    assert reply.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    head = f"Content-Type: {reply.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + reply.content)
    parts = message.get_payload()
    assert all(p.get_content_type() == "application/dicom" for p in parts)
    return [dcmread(io.BytesIO(p.get_payload(decode=True))) for p in parts]


def test_a_classified_dicom_s_sr_and_grad_cam_capture_are_stored_in_orthanc_in_its_study(
    pacs_server, orthanc: Orthanc
) -> None:
    url, root = pacs_server
    data, source = identified_ct()
    reply = requests.post(f"{url}/classify/dicom", data=data, headers=DICOM_OUT | {"Accept": ""})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["abstained"] is False and body["pacs"]["stored"] is True
    stored = {d.SOPClassUID: d for d in orthanc.instances_of_study(source.StudyInstanceUID)}
    assert set(stored) == {ComprehensiveSRStorage, SecondaryCaptureImageStorage}
    assert sorted(body["pacs"]["sop_instance_uids"]) == sorted(
        d.SOPInstanceUID for d in stored.values()
    )
    check_sr(stored[ComprehensiveSRStorage], source, body)
    check_sc(stored[SecondaryCaptureImageStorage], source)
    # The patient's name and ID went to the PACS only: not to the reply, the log or the
    # monitor store.
    log = (root / "server.log").read_bytes()
    monitor = b"".join(path.read_bytes() for path in root.glob("requests.sqlite*"))  # WAL too
    assert monitor, "the monitor store recorded nothing"
    for where in (reply.content, log, monitor):
        assert SECRET_NAME.split("^")[1].encode() not in where and SECRET_ID.encode() not in where


def test_accept_application_dicom_returns_the_sr_and_capture_multipart_as_stored(
    pacs_server, orthanc: Orthanc
) -> None:
    url, _ = pacs_server
    data, source = identified_ct()
    reply = requests.post(f"{url}/classify/dicom", data=data, headers=DICOM_OUT)
    assert reply.status_code == 200, reply.text[:300]
    assert reply.headers["medtransfer-pacs"] == "stored"
    sr, sc = multipart_parts(reply)
    stored = {d.SOPInstanceUID: d for d in orthanc.instances_of_study(source.StudyInstanceUID)}
    assert set(stored) == {sr.SOPInstanceUID, sc.SOPInstanceUID}
    assert content(stored[sr.SOPInstanceUID]) == content(sr)
    check_sc(sc, source)
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def test_dicom_output_of_a_png_or_a_batch_is_refused_in_one_line(pacs_server) -> None:
    url, _ = pacs_server
    png = png_bytes(np.full((32, 32), 128, dtype=np.uint8))
    reply = requests.post(
        f"{url}/classify/png",
        data=png,
        headers={
            "Content-Type": "image/png",
            "Accept": 'multipart/related; type="application/dicom"',
        },
    )
    assert (reply.status_code, reply.json()["error"]) == (406, "dicom_output_needs_dicom")
    assert "needs a DICOM input" in reply.json()["message"]
    data, _ = identified_ct()
    batch = requests.post(
        f"{url}/classify/batch",
        files=[("files", ("a.dcm", data, "application/dicom"))],
        headers={"Accept": "application/dicom"},
    )
    assert (batch.status_code, batch.json()["error"]) == (406, "dicom_output_per_file")


def test_a_dicom_without_study_uids_is_classified_and_says_why_no_dicom_output_was_made(
    pacs_server,
) -> None:
    url, _ = pacs_server
    data = identified_dicom()  # no Study or Series Instance UID
    as_json = requests.post(f"{url}/classify/dicom", data=data, headers=DICOM_OUT | {"Accept": ""})
    assert as_json.status_code == 200 and "ood" in as_json.json()
    assert as_json.json()["pacs"]["error"] == "dicom_output_unavailable"
    as_dicom = requests.post(f"{url}/classify/dicom", data=data, headers=DICOM_OUT)
    assert (as_dicom.status_code, as_dicom.json()["error"]) == (422, "dicom_output_unavailable")


def test_the_sr_holds_the_prediction_set_and_an_abstention_with_its_reason() -> None:
    from serving.dicom_report import structured_report

    _, source = identified_ct()
    model = {"name": "m", "version": "7", "dataset_version": "d1", "bento_model": "m:1"}
    ood = {"score": 0.25, "threshold": 0.5}
    reply = {"label": "opacity", "probabilities": {"normal": 0.375, "opacity": 0.625}}
    reply |= {"abstained": False, "ood": ood, "threshold": 0.5, "model": model}
    reply["prediction_set"] = {"coverage": 0.95, "labels": ["normal", "opacity"]}
    sr = structured_report(source, reply)
    assert content(sr) == expected_content(reply, source.SOPInstanceUID)
    assert content(sr)[-4:] == [
        (0, "Prediction set", ""),
        (1, "Nominal coverage", "0.95"),
        (1, "Member", "normal"),
        (1, "Member", "opacity"),
    ]
    abstained = {"label": None, "probabilities": None, "abstained": True, "reason": "unlike"}
    abstained |= {"ood": {"score": 0.75, "threshold": 0.5}, "threshold": 0.5, "model": model}
    rows = content(structured_report(source, abstained))
    assert rows[5:] == [
        (0, "Abstained", "Yes"),
        (1, "Out-of-distribution score", "0.75"),
        (1, "Out-of-distribution threshold", "0.5"),
        (1, "Abstention reason", "unlike"),
    ]


def test_a_pacs_refusing_the_called_ae_title_is_a_pacs_refused_error(orthanc: Orthanc) -> None:
    from serving.dicom_report import structured_report

    _, source = identified_ct()
    reply = {"label": "a", "probabilities": {"a": 1.0}, "abstained": False, "ood": {}}
    target = PacsTarget("127.0.0.1", orthanc.dicom_port, called_ae="NOT-ORTHANC", timeout_s=5)
    with pytest.raises(PacsError) as refused:
        store([structured_report(source, reply | {"model": {}})], target)
    assert refused.value.reason == "pacs_refused"


def test_with_the_pacs_down_the_classification_still_answers_and_the_log_says_why(
    pacs_server, orthanc: Orthanc
) -> None:
    """Runs last in this file: it stops Orthanc."""
    url, root = pacs_server
    orthanc.stop()
    data, _ = identified_ct()
    reply = requests.post(f"{url}/classify/dicom", data=data, headers=DICOM_OUT | {"Accept": ""})
    assert reply.status_code == 200
    body = reply.json()
    assert body["label"] is not None and body["pacs"]["error"] == "pacs_unreachable"
    assert "classification is in this reply" in body["pacs"]["message"]
    text = (root / "server.log").read_text(errors="replace")
    assert "PACS store for /classify/dicom failed: pacs_unreachable" in text
    assert SECRET_NAME.split("^")[1] not in text and SECRET_ID not in text
