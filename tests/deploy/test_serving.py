"""The packaged Bento under a real ``bentoml serve`` on loopback: same answers as the in-process
student, a documented 4xx for every bad input, no patient data in replies or logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tasks.code_closure import import_closure, relative_paths
from tasks.model.inference import Predictor, prediction_set, prepare_dicom, prepare_png
from tasks.model.profile import DataProfile, features_and_probabilities
from tests.deploy.conftest import SERVED_LIMITS
from tests.deploy.samples import (
    GOOD_DICOM,
    SECRET_ID,
    SECRET_NAME,
    bad_inputs,
    corpus_bytes,
    identified_dicom,
    png_bytes,
)
from tests.deploy.students import CLASSES, REPO, SERVED_TEMPERATURE, reference_probabilities

MAX_UPLOAD = SERVED_LIMITS["serving.max_upload_bytes"]
MAX_DIM = SERVED_LIMITS["serving.max_image_dim"]
MAX_FILES = SERVED_LIMITS["serving.max_batch_files"]
DICOM = {"Content-Type": "application/dicom"}


def _probabilities(reply: dict) -> np.ndarray:
    assert list(reply["probabilities"]) == list(CLASSES)
    return np.array([reply["probabilities"][c] for c in CLASSES])


def _uploads() -> dict[str, bytes]:
    files = {name: corpus_bytes(name) for name in GOOD_DICOM}
    files["identified-monochrome1"] = identified_dicom()
    return files


def in_process(served) -> tuple[Predictor, DataProfile]:
    """The served Bento's own student and profile, loaded in this process."""
    name, version = served.package["bento_model"].split(":")
    folder = served.home / "models" / name / version
    profile = DataProfile.load(folder)
    assert profile is not None and profile.detector is not None
    return Predictor.from_folder(folder), profile


def expected_output(predictor: Predictor, profile: DataProfile, image: np.ndarray) -> np.ndarray:
    """What the model service computes for one prepared image: probabilities, then OOD score."""
    probs, features = features_and_probabilities(
        predictor.model, image[np.newaxis], predictor.spec.temperature
    )
    return np.append(probs[0], profile.detector.score(features)[0])


def reply_output(reply: dict, threshold: float) -> np.ndarray:
    """A reply as ``(probabilities..., OOD score)``, checking its abstention is consistent."""
    score = reply["ood"]["score"]
    assert reply["abstained"] is (score >= threshold)
    if reply["abstained"]:
        assert reply["label"] is None and reply["probabilities"] is None and reply["reason"]
        return np.append(np.full(len(CLASSES), np.nan), score)
    return np.append(_probabilities(reply), score)


def _masked(outputs: np.ndarray, threshold: float) -> np.ndarray:
    """Probabilities of abstained rows replaced by NaN, as the replies carry none."""
    outputs = np.array(outputs, dtype=np.float64, ndmin=2)
    outputs[outputs[:, -1] >= threshold, :-1] = np.nan
    return outputs


def test_served_dicom_predictions_equal_the_in_process_student(served) -> None:
    predictor, profile = in_process(served)
    threshold = profile.ood["threshold"]
    session = requests.Session()
    expected = {
        name: expected_output(predictor, profile, prepare_dicom(data, 64))
        for name, data in _uploads().items()
    }
    assert np.ptp([p[1] for p in expected.values()]) > 0.05  # answers vary with the image
    answered = 0
    for name, data in _uploads().items():
        reply = session.post(f"{served.url}/classify/dicom", data=data, headers=DICOM)
        assert reply.status_code == 200, (name, reply.text)
        body = reply.json()
        got = reply_output(body, threshold)
        np.testing.assert_allclose(
            got, _masked(expected[name], threshold)[0], rtol=1e-5, atol=1e-5, err_msg=name
        )
        if not body["abstained"]:
            answered += 1
            assert body["label"] == (CLASSES[1] if got[1] >= 0.5 else CLASSES[0])
            # the set packaging calibrated, drawn from the image as evaluate draws it
            sets = served.package["conformal"]
            image = prepare_dicom(data, 64)
            assert body["prediction_set"] == prediction_set(
                expected[name][:-1], CLASSES, 0.95, sets["threshold"], image
            )
        else:
            assert body["prediction_set"] is None
        assert body["threshold"] == 0.5
        assert body["model"]["name"] == "served-student"
        assert body["model"]["version"] == "1"
        assert body["model"]["dataset_version"] == "dataset-a"
    assert answered >= len(expected) // 2  # in-distribution images are mostly answered


def test_the_packaged_set_rule_is_calibrated_on_validation_and_measured_on_test(served) -> None:
    from tasks.data.dataset import load_processed
    from tasks.evaluation.conformal import calibrate, measure, split_uniforms

    predictor, _ = in_process(served)
    dataset = load_processed(served.training.processed)
    draws = split_uniforms(dataset)
    probs = {}
    for split in ("val", "test"):
        images, _ = dataset.subset(split)
        probs[split], _ = features_and_probabilities(
            predictor.model, images, predictor.spec.temperature
        )
    rule = calibrate(probs["val"], dataset.subset("val")[1], 0.95, draws["val"])
    block = served.package["conformal"]
    assert block["threshold"] == pytest.approx(rule.threshold, abs=1e-6)
    assert block["n_calibration"] == len(dataset.indices("val"))
    tested = measure(rule.sets(probs["test"], draws["test"]), dataset.subset("test")[1])
    assert block["test"]["covered"] == tested.covered and block["test"]["n"] == tested.n
    # abstention beside the set, not in it: the accepted images' coverage is its own figure
    assert block["test_abstention"]["n"] == tested.n
    assert block["test_accepted"]["n"] == tested.n - block["test_abstention"]["abstained"]


def test_served_probabilities_are_the_saved_logits_softened_by_the_saved_temperature(
    served,
) -> None:
    # Expected: a plain torch forward of the Bento's saved weights, softmax(logits / 1.7), with
    # none of the service's code (the test above compares with the service's own helpers).
    name, version = served.package["bento_model"].split(":")
    folder = served.home / "models" / name / version
    session = requests.Session()
    checked = 0
    for upload, data in _uploads().items():
        image = prepare_dicom(data, 64)[np.newaxis]
        expected = reference_probabilities(folder, image, SERVED_TEMPERATURE)[0]
        body = session.post(f"{served.url}/classify/dicom", data=data, headers=DICOM).json()
        if body["abstained"]:
            continue
        np.testing.assert_allclose(_probabilities(body), expected, atol=1e-5, err_msg=upload)
        checked += 1
    assert checked >= 2  # the comparison saw answered images


def test_concurrent_and_batch_requests_give_the_same_answers(served) -> None:
    predictor, profile = in_process(served)
    threshold = profile.ood["threshold"]
    uploads = list(_uploads().values())
    expected = _masked(
        [expected_output(predictor, profile, prepare_dicom(data, 64)) for data in uploads],
        threshold,
    )

    def classify(data: bytes) -> np.ndarray:
        reply = requests.post(f"{served.url}/classify/dicom", data=data, headers=DICOM, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply_output(reply.json(), threshold)

    # Many requests at once: adaptive batching stacks them into shared forward passes.
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(classify, uploads * 3))
    np.testing.assert_allclose(np.stack(got), np.concatenate([expected] * 3), atol=1e-5, rtol=1e-5)

    batch = uploads[:MAX_FILES]
    files = [
        ("files", (f"image{i}.dcm", data, "application/dicom")) for i, data in enumerate(batch)
    ]
    reply = requests.post(f"{served.url}/classify/batch", files=files, timeout=60)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    got = np.stack([reply_output(r, threshold) for r in results])
    np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-5, rtol=1e-5)


def test_served_png_predictions_equal_the_in_process_student(served) -> None:
    predictor, profile = in_process(served)
    threshold = profile.ood["threshold"]
    rng = np.random.default_rng(3)
    for shape in ((80, 100), (30, 30, 3)):
        data = png_bytes(rng.integers(0, 256, size=shape, dtype=np.uint8))
        expected = expected_output(predictor, profile, prepare_png(data, 64))
        reply = requests.post(
            f"{served.url}/classify/png", data=data, headers={"Content-Type": "image/png"}
        )
        assert reply.status_code == 200, reply.text
        got = reply_output(reply.json(), threshold)
        np.testing.assert_allclose(got, _masked(expected, threshold)[0], atol=1e-5, rtol=1e-5)


# A multi-frame file is not bad here: the served model's data were ingested with the middle
# frame rule, and the service takes it too (tests/deploy/test_serving_gate.py).
SERVED_BAD = [b for b in bad_inputs(MAX_UPLOAD, MAX_DIM) if b.reason != "multi_frame"]


@pytest.mark.parametrize("bad", SERVED_BAD, ids=lambda b: b.name)
def test_every_bad_single_upload_gets_its_documented_4xx(served, bad) -> None:
    headers = {"Content-Type": bad.content_type} if bad.content_type else {}
    reply = requests.post(f"{served.url}{bad.route}", data=bad.body, headers=headers, timeout=60)
    assert reply.status_code == bad.status, reply.text
    body = reply.json()
    assert body["error"] == bad.reason and body["status"] == bad.status
    assert body["message"]


def test_an_oversized_chunked_upload_is_cut_off_with_413(served) -> None:
    def chunks():  # no Content-Length: the server must count while reading
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    reply = requests.post(f"{served.url}/classify/dicom", data=chunks(), headers=DICOM, timeout=60)
    assert reply.status_code == 413 and reply.json()["error"] == "payload_too_large"


def _multipart(parts: list[bytes], field: str = "files") -> list:
    return [(field, (f"f{i}.dcm", data, "application/dicom")) for i, data in enumerate(parts)]


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        ("one bad file", 422, "not_dicom"),
        ("too many files", 413, "too_many_files"),
        ("no files", 400, "no_files"),
        ("wrong field name", 400, "no_files"),
        ("not multipart", 415, "unsupported_media_type"),
        ("multipart without boundary", 400, "bad_multipart"),
        ("multipart cut off", 400, "no_files"),
        ("oversized batch", 413, "payload_too_large"),
    ],
)
def test_bad_batches_get_their_documented_4xx(served, name: str, status: int, reason: str) -> None:
    good = corpus_bytes("CT_small.dcm")
    url = f"{served.url}/classify/batch"
    if name == "one bad file":
        reply = requests.post(url, files=_multipart([good, b"not dicom at all"]))
    elif name == "too many files":
        reply = requests.post(url, files=_multipart([good] * (MAX_FILES + 1)))
    elif name == "no files":
        reply = requests.post(url, data={"note": "nothing attached"}, files=[("x", ("", b""))])
    elif name == "wrong field name":
        reply = requests.post(url, files=_multipart([good], field="file"))
    elif name == "not multipart":
        reply = requests.post(url, data=good, headers=DICOM)
    elif name == "multipart without boundary":
        reply = requests.post(url, data=good, headers={"Content-Type": "multipart/form-data"})
    elif name == "multipart cut off":
        reply = requests.post(
            url,
            data=b"--xyz\r\nContent-Disposition: form-data; na",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
    else:
        reply = requests.post(url, files=_multipart([good, b"\0" * MAX_UPLOAD]))
    assert reply.status_code == status, reply.text
    assert reply.json()["error"] == reason
    if name == "one bad file":
        assert reply.json()["message"].startswith("File 1: ")


def test_wrong_method_or_route_is_a_4xx(served) -> None:
    assert requests.get(f"{served.url}/classify/dicom").status_code == 405
    assert requests.post(f"{served.url}/classify/nothing", data=b"x").status_code == 404


def test_health_readiness_and_info(served) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert requests.get(f"{served.url}{probe}").status_code == 200, probe
    # Ready means the model answers: a classification right after /readyz succeeds.
    reply = requests.post(
        f"{served.url}/classify/dicom", data=corpus_bytes("MR_small.dcm"), headers=DICOM
    )
    assert reply.status_code == 200
    info = requests.get(f"{served.url}/info").json()
    assert info["model"]["name"] == "served-student" and info["model"]["version"] == "1"
    assert info["classes"] == list(CLASSES) and info["image_size"] == served.student.image_size
    assert info["limits"] == {
        "max_upload_bytes": MAX_UPLOAD,
        "max_batch_files": MAX_FILES,
        "max_image_dim": MAX_DIM,
        # params.yaml's values (the served Bento does not override them)
        "max_decoded_mib": 128,
        "max_concurrent_decodes": 1,
        "request_timeout_s": 60.0,
    }
    assert info["batching"]["enabled"] is True
    assert info["batching"]["max_batch_size"] == SERVED_LIMITS["serving.max_batch_size"]


def test_no_patient_data_in_replies_or_server_log(served) -> None:
    single = identified_dicom()
    volume = identified_dicom(frames=3)
    replies = []
    for data in (single, single[: len(single) - 500], single[:400], volume):
        replies.append(requests.post(f"{served.url}/classify/dicom", data=data, headers=DICOM))
    files = [
        ("files", (f"{SECRET_NAME}.dcm", data, "application/dicom")) for data in (single, volume)
    ]
    replies.append(requests.post(f"{served.url}/classify/batch", files=files))
    files = [("files", (f"{SECRET_NAME}.dcm", single, "application/dicom"))]
    replies.append(requests.post(f"{served.url}/classify/batch", files=files))
    statuses = [r.status_code for r in replies]
    assert statuses[0] == 200 and statuses[-1] == 200 and 422 in statuses
    text = "\n".join(r.text for r in replies) + "\n" + served.log_text()
    for secret in (SECRET_NAME, SECRET_ID, "Secretname", "QXZW", "19991399"):
        assert secret not in text, secret


def test_the_archive_holds_the_model_and_only_the_modules_the_service_imports(served) -> None:
    needed = set(relative_paths(import_closure("serving.service")))
    with tarfile.open(served.package["archive"]) as archive:
        names = set(archive.getnames())
        bento_yaml = archive.extractfile("./bento.yaml").read().decode()
        served_inference = archive.extractfile("./src/tasks/model/inference.py").read()
    shipped = {name.removeprefix("./src/") for name in names if name.startswith("./src/tasks/")}
    shipped = {name for name in shipped if name.endswith(".py")}
    assert shipped == needed  # attacks, training and ingestion stay out
    assert "./src/serving/service.py" in names
    served_source = (REPO / "tasks" / "model" / "inference.py").read_bytes()
    assert served_inference == served_source  # imported as is
    model_tag = served.package["bento_model"]
    name, version = model_tag.split(":")
    assert f"./models/{name}/{version}/model.pt" in names
    assert re.search(rf"model_tag: {re.escape(model_tag)}", bento_yaml)
    assert "threshold: 0.5" in bento_yaml


# Imports serving.service from the Bento's own source: the project's editable install is taken
# off the import system first, so a module the bentofile left out fails here.
IMPORT_FROM_BENTO = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", {repo!r})]
sys.path.insert(0, {src!r})
# BentoML's CLI hands a Bento its arguments through this container before importing it.
from bentoml._internal.configuration.containers import BentoMLContainer
BentoMLContainer.bento_arguments.set(json.loads({args!r}))
import serving.service, tasks.model.student_io, tasks.model.transforms
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "tasks")))
"""


def test_the_service_imports_from_the_bentos_own_source(served, tmp_path: Path) -> None:
    with tarfile.open(served.package["archive"]) as archive:
        archive.extractall(tmp_path, filter="data")
        args = yaml.safe_load(archive.extractfile("./bento.yaml"))["args"]
    src = str(tmp_path / "src")
    script = IMPORT_FROM_BENTO.format(repo=str(REPO), src=src, args=json.dumps(args))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported and all(path.startswith(src) for path in imported), imported


def test_bento_requirements_match_the_pinned_environment() -> None:
    def pins(path: Path) -> dict[str, str]:
        found = {}
        for line in path.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                found[name.strip().lower()] = version.strip()
        return found

    served, pinned = pins(REPO / "serving" / "requirements.txt"), pins(REPO / "constraints.txt")
    assert served, "serving/requirements.txt lists no package"
    for name, version in served.items():
        assert pinned.get(name) == version, f"{name}=={version} is not constraints.txt's pin"


def test_a_reply_holds_only_the_documented_fields(served) -> None:
    data = corpus_bytes("CT_small.dcm")
    reply = requests.post(f"{served.url}/classify/dicom", data=data, headers=DICOM)
    body = reply.json()
    answered = {"label", "probabilities", "prediction_set", "abstained", "ood", "threshold"}
    answered.add("model")
    assert set(body) == (answered | {"reason"} if body["abstained"] else answered)
    assert set(body["ood"]) == {"score", "threshold", "out_of_distribution"}
    model = reply.json()["model"]
    assert set(model) == {
        "name",
        "version",
        "dataset_version",
        "bento_model",
        "approved",
        "approval",
    }
    # the champion was packaged: every reply says it is the approved version
    assert model["approved"] is True and model["approval"].startswith("approved: version ")


PACKAGE_TWICE = """
import json, sys, tarfile
import yaml
from tasks.config import load_params
from tasks.stages.package import run_package

params = load_params(sys.argv[1])
for version in (1, 2):
    report = run_package(params.with_overrides([f"registry.version={version}"]))
    with tarfile.open(report["archive"]) as archive:
        bento = yaml.safe_load(archive.extractfile("./bento.yaml"))
    models = [m["tag"] for service in bento["services"] for m in service["models"]]
    print(json.dumps({"report": report, "args": bento["args"], "models": models}))
"""


def test_packaging_twice_in_one_process_builds_each_bento_with_its_own_model(
    served, students, tmp_path: Path
) -> None:
    # The Prefect flow packages in process: the service module, which names its model at
    # import, must be read again for the second Bento.
    import os
    import subprocess
    import sys

    import yaml

    from tasks.stages.register import run_register
    from tests.deploy.students import stage_params, write_reports

    params = stage_params(
        tmp_path,
        students["b"],
        ["registry.model_name=served-student", f"data.processed_dir={served.training.processed}"],
    )
    write_reports(params, students["b"])
    assert run_register(params)["version"] == "2"
    local = tmp_path / "params.yaml"
    local.write_text(yaml.safe_dump(params.to_dict()))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run(
        [sys.executable, "-c", PACKAGE_TWICE, str(local)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert first["report"]["bento_model"] != second["report"]["bento_model"]
    for packaged in (first, second):
        assert packaged["models"] == [packaged["report"]["bento_model"]]
        assert packaged["args"]["model_tag"] == packaged["report"]["bento_model"]
