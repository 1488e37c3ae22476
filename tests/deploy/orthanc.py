"""A real Orthanc (Debian's package, ``make orthanc``) for the DICOM output tests: started on
free loopback ports with a temporary configuration and storage, queried over its REST API, and
stopped by PID."""

from __future__ import annotations

import io
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom import Dataset, dcmread

from tests.processes import free_port, start_process, stop_process

ORTHANC = Path("/usr/sbin/Orthanc")
AE_TITLE = "ORTHANC"


@dataclass
class Orthanc:
    """A running Orthanc: its DIMSE port and AE title, its REST URL, its process."""

    process: subprocess.Popen
    dicom_port: int
    url: str
    log: Path

    @property
    def address(self) -> str:
        """``AE@host:port``, as ``MEDTRANSFER_PACS`` takes it."""
        return f"{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    def instances_of_study(self, study_uid: str) -> list[Dataset]:
        """Every instance Orthanc stores in the study, parsed from the files it gives back."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}},
            timeout=10,
        )
        found.raise_for_status()
        return [
            dcmread(io.BytesIO(self._get(f"/instances/{orthanc_id}/file").content))
            for orthanc_id in found.json()
        ]

    def _get(self, path: str) -> requests.Response:
        reply = requests.get(f"{self.url}{path}", timeout=10)
        reply.raise_for_status()
        return reply

    def stop(self) -> None:
        stop_process(self.process)


def start_orthanc(root: Path, timeout: float = 30) -> Orthanc:
    """Orthanc on free loopback ports, storing under ``root``; refuses associations addressed to
    another AE title (``DicomCheckCalledAet``), so that a refusal can be tested."""
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "medtransfer-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = root / "orthanc.log"
    process = start_process([str(ORTHANC), str(root / "orthanc.json")], log, env={}, cwd=root)
    server = Orthanc(process, dicom_port, f"http://127.0.0.1:{http_port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Orthanc exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{server.url}/system", timeout=2).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"Orthanc not up after {timeout} s:\n{log.read_text()[-3000:]}")
