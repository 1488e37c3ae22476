"""The served Bento knows when not to answer and survives hostile uploads: the scope gate, OOD
abstention, the multi-frame rule recorded with the model, a deflate bomb, file-count limits, the
typed API's OpenAPI schema and client, ``/metrics`` and the request store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import requests
from pydicom import dcmread

from tests.deploy.conftest import SERVED_LIMITS
from tests.deploy.samples import dataset_bytes, deflate_bomb, png_bytes

DICOM = {"Content-Type": "application/dicom"}
PNG = {"Content-Type": "image/png"}
MAX_FILES = SERVED_LIMITS["serving.max_batch_files"]


def _synthetic_file(served) -> Path:
    return next(iter(sorted(served.training.source.glob("case_*/img_0.dcm"))))


def test_a_dicom_outside_the_training_scope_gets_422_naming_what_was_expected(served) -> None:
    trained_on = served.package["profile"]["scope"]["Modality"]
    assert "CR" in trained_on and "DX" in trained_on
    unseen = next(m for m in ("PT", "MG", "XA", "NM", "RF") if m not in trained_on)
    ds = dcmread(_synthetic_file(served))
    ds.Modality = unseen
    reply = requests.post(f"{served.url}/classify/dicom", data=dataset_bytes(ds), headers=DICOM)
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["error"] == "out_of_scope"
    assert f"Modality {', '.join(trained_on)} only" in body["message"]
    assert unseen not in body["message"]  # the upload's own value is not quoted


def test_every_file_ingestion_accepted_gets_200_multi_frame_included(served) -> None:
    manifest = pd.read_csv(served.training.processed / "manifest.csv")
    accepted = sorted(set(manifest["source_file"]))
    multi_frame = [
        n
        for n in accepted
        if int(dcmread(served.training.source / n).get("NumberOfFrames", 1) or 1) > 1
    ]
    assert multi_frame  # the set has multi-frame files (the 5 of 40 the issue saw refused)
    session = requests.Session()
    for name in accepted:
        data = (served.training.source / name).read_bytes()
        reply = session.post(f"{served.url}/classify/dicom", data=data, headers=DICOM)
        assert reply.status_code == 200, (name, reply.text)
        assert "score" in reply.json()["ood"]


def test_noise_and_blank_images_are_abstained_with_no_diagnosis(served) -> None:
    rng = np.random.default_rng(0)
    noise = png_bytes(rng.integers(0, 256, size=(256, 256), dtype=np.uint8))
    blank = png_bytes(np.zeros((256, 256), dtype=np.uint8))
    for data in (noise, blank):
        reply = requests.post(f"{served.url}/classify/png", data=data, headers=PNG)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["abstained"] is True, body["ood"]
        assert body["label"] is None and body["probabilities"] is None
        assert body["ood"]["score"] >= body["ood"]["threshold"] and body["reason"]


def _peak_rss(pid: int) -> int:
    """The largest peak resident size (VmHWM) among a process and its children, in bytes."""
    peaks = []
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
        peaks.append(int(kib) * 1024)
    return max(peaks)


def test_a_deflate_bomb_is_refused_413_and_the_server_memory_stays_flat(served) -> None:
    bomb = deflate_bomb(2**30)  # ~1 MB, inflates to 1 GiB
    assert len(bomb) <= SERVED_LIMITS["serving.max_upload_bytes"]
    before = _peak_rss(served.pid)
    replies = [
        requests.post(f"{served.url}/classify/dicom", data=bomb, headers=DICOM, timeout=120)
        for _ in range(2)
    ]
    files = [("files", ("bomb.dcm", bomb[: 900 * 1024], "application/dicom"))]
    replies.append(requests.post(f"{served.url}/classify/batch", files=files, timeout=120))
    assert [r.status_code for r in replies[:2]] == [413, 413]
    assert replies[0].json()["error"] == "too_large"
    assert replies[2].status_code in (413, 422)  # a cut bomb: too large or unreadable
    grown = _peak_rss(served.pid) - before
    assert grown < 128 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("count", [MAX_FILES + 1, 100, 1500])
def test_more_files_than_the_limit_is_always_413_too_many_files(served, count: int) -> None:
    files = [("files", (f"f{i}.dcm", b"x", "application/dicom")) for i in range(count)]
    reply = requests.post(f"{served.url}/classify/batch", files=files, timeout=60)
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"] == "too_many_files"


def test_the_openapi_schema_has_a_binary_file_body_on_each_classify_route(served) -> None:
    spec = requests.get(f"{served.url}/docs.json").json()
    for route in ("/classify/dicom", "/classify/png", "/classify/batch"):
        content = spec["paths"][route]["post"]["requestBody"]["content"]
        schemas = [body["schema"] for body in content.values()]
        text = repr(schemas)
        assert "'format': 'binary'" in text, (route, content)
    page = requests.get(f"{served.url}/docs")  # redirected to BentoML's Swagger UI at /
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_the_generated_client_classifies_a_dicom(served) -> None:
    import bentoml

    path = _synthetic_file(served)
    with bentoml.SyncHTTPClient(served.url, server_ready_timeout=30) as client:
        reply = client.classify_dicom(path)
    # The generated client's answer is the one a plain POST of the same file gets.
    direct = requests.post(f"{served.url}/classify/dicom", data=path.read_bytes(), headers=DICOM)
    expected = direct.json()
    assert (reply["abstained"], reply["label"]) == (expected["abstained"], expected["label"])
    assert reply["ood"]["score"] == pytest.approx(expected["ood"]["score"], abs=1e-5)
    assert reply["probabilities"] == (
        None if expected["probabilities"] is None else pytest.approx(expected["probabilities"])
    )


def test_metrics_count_abstentions_and_the_store_keeps_only_numbers(served) -> None:
    blank = png_bytes(np.zeros((64, 64), dtype=np.uint8))
    requests.post(f"{served.url}/classify/png", data=blank, headers=PNG)
    metrics = requests.get(f"{served.url}/metrics").text
    assert "medtransfer_abstentions_total" in metrics
    assert "medtransfer_ood_score_bucket" in metrics
    store = served.monitor_store
    with sqlite3.connect(store) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(requests)")]
        rows = connection.execute("SELECT COUNT(*), SUM(abstained) FROM requests").fetchone()
        colour_rows = connection.execute(
            "SELECT COUNT(*) FROM requests WHERE mean_r IS NOT NULL OR saturated_b IS NOT NULL"
        ).fetchone()
    per_channel = [f"{name}_{c}" for c in "rgb" for name in ("mean", "std", "saturated")]
    assert columns == [
        "id",
        "time",
        "route",
        "ood_score",
        "abstained",
        "refused",
        "probabilities",
        "mean",
        "std",
        "saturated",
        *per_channel,  # a colour model's; this gray model leaves them empty
    ]
    assert rows[0] > 0 and rows[1] >= 1
    assert colour_rows == (0,)


def test_medtransfer_monitor_compares_the_served_requests_with_the_profile(served) -> None:
    import yaml

    from flows.cli import main

    blank = png_bytes(np.zeros((64, 64), dtype=np.uint8))
    for _ in range(12):  # enough requests for a window
        requests.post(f"{served.url}/classify/png", data=blank, headers=PNG)
    reports_dir = Path(yaml.safe_load(served.params_file.read_text())["reports_dir"])
    store = f"serving.monitor_store={served.monitor_store}"
    # exit 1: drift found (the blank images' abstentions), as the monitor's exit status says
    enough = "monitor.min_requests=12"  # the 12 sent here suffice, whatever ran before
    argv = ["monitor", "--params", str(served.params_file), "-S", store, "-S", enough, "--quiet"]
    assert main(argv) == 1
    report = json.loads((reports_dir / "monitor.json").read_text())
    assert report["n"] >= 12 and set(report["psi"]) == {
        "mean",
        "std",
        "saturated",
        "ood_score",
        "probability",
    }
    assert report["abstention_share"] > 0 and "abstention_share" in report["drifted"]
    assert (reports_dir / "plots" / "monitor.png").is_file()


def test_no_marked_dicom_value_reaches_a_reply_or_the_server_log(served) -> None:
    import io

    from tests.test_hostile_dicom import MARKER, UID_MARKER, marked_datasets

    uploads = []
    for ds in marked_datasets().values():
        buffer = io.BytesIO()
        ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
        uploads.append(buffer.getvalue())
    replies = [
        requests.post(f"{served.url}/classify/dicom", data=data, headers=DICOM) for data in uploads
    ]
    files = [("files", (f"{MARKER}.dcm", data, "application/dicom")) for data in uploads[-3:]]
    replies.append(requests.post(f"{served.url}/classify/batch", files=files))
    statuses = {r.status_code for r in replies}
    assert 200 in statuses and 422 in statuses
    text = "\n".join(r.text for r in replies) + served.log_text()
    assert MARKER not in text and UID_MARKER not in text
