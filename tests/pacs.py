"""A real PACS for tests: Orthanc with its DICOMweb plugin, on 127.0.0.1.

Debian's `orthanc` and `orthanc-dicomweb` packages provide it (`.ci/run` installs them);
where they are missing, the tests that need a PACS skip with that sentence.
`start_orthanc(folder)`: an empty Orthanc in `folder`, loaded with the sample CT as a DICOM
series (`sample_data/dicom/chest_ct/`) and the sample chest X-ray. `.dicomweb` is the URL that
`monailabel start_server --studies` takes, `.series_uid` / `.xray_uid` their
SeriesInstanceUIDs, `.stop()` takes the PACS down (outage tests).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from tests.server import REPO, free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SAMPLE_SERIES = REPO / "sample_data" / "dicom" / "chest_ct"
SAMPLE_XRAY = REPO / "sample_data" / "studies" / "chest_xray.dcm"


@dataclass
class Pacs:
    url: str
    process: subprocess.Popen
    series_uid: str
    xray_uid: str

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def series(self, **query: str) -> list[dict]:
        r = requests.get(self.dicomweb + "/series", params=query, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@contextlib.contextmanager
def start_orthanc(root: Path, series_dir: Path = SAMPLE_SERIES) -> Iterator[Pacs]:
    if not (Path(ORTHANC).exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("no PACS to test against: install Debian's orthanc and orthanc-dicomweb "
                    "(`apt-get install orthanc orthanc-dicomweb`; `.ci/run` does).")
    files = sorted(series_dir.glob("*.dcm"))
    if not files:
        pytest.fail(f"no DICOM series in {series_dir}; run `citrusv sample-data` first.")
    port = free_port()
    (root / "db").mkdir(parents=True, exist_ok=True)
    config = {"Name": "citrusv-test-pacs", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": port, "HttpBindAddress": "127.0.0.1",
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomServerEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT, cwd=str(root))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/system", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not answer in 60 s")
            time.sleep(0.2)
        with requests.Session() as http:
            for f in [*files, SAMPLE_XRAY]:
                http.post(url + "/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        xray = str(pydicom.dcmread(SAMPLE_XRAY, stop_before_pixels=True).SeriesInstanceUID)
        yield Pacs(url, process, uid, xray)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
