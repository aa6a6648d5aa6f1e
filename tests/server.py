"""pytest plugin: a real MONAI Label server running the Citrus-V app, over HTTP on 127.0.0.1.

Register it from tests/conftest.py with `pytest_plugins = ["tests.server"]`. Fixtures:

- `citrusv_server`: session-wide server on a temporary copy of `sample_data/studies`, serving a
  tiny Citrus-V checkpoint that answers deterministically. Use `citrusv_server.url`,
  `.studies` (the copy: labels land in `.studies / "labels" / "final"`), `.model_dir`,
  `.get(path)`, `.post(path, ...)`, `.put(path, ...)`, `.delete(path)`, `.log()`.
- `citrusv_server_without_model`: the same app with a missing checkpoint (what a fresh install
  sees before the model is downloaded): /info/ answers, tasks say "model not installed yet".
- `start_citrusv_server(studies, model_dir, **conf)`: context manager for your own server.

The sample studies must be built first (`citrusv sample-data`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "monailabel_app"
SAMPLE_STUDIES = REPO / "sample_data" / "studies"
START_TIMEOUT_S = float(os.environ.get("CITRUSV_SERVER_START_TIMEOUT", "180"))

# What the tiny test model says (its real greedy decode, fitted when written; ~40 s on CPU).
# Fitting one answer is enough: the other tasks' system prompts decode to the same text.
TINY_ANSWERS = {"segment": "Sure, [SEG]."}


@dataclass
class CitrusVServer:
    """A running server: base URL, its studies folder and checkpoint dir, and HTTP helpers."""

    url: str
    studies: Path
    model_dir: Path
    log_path: Path
    process: subprocess.Popen
    verify: str | bool = True  # https: the CA certificate that signed the server's

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, **self._kw(kw))

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, **self._kw(kw))

    def put(self, path: str, **kw) -> requests.Response:
        return requests.put(self.url + path, **self._kw(kw))

    def delete(self, path: str, **kw) -> requests.Response:
        return requests.delete(self.url + path, **self._kw(kw))

    def _kw(self, kw: dict) -> dict:
        return {"timeout": 300, "verify": self.verify, **kw}

    def limit_writes(self, nbytes: int) -> None:
        """A "full disk" for the server: RLIMIT_FSIZE of every process of its group (server and
        training runs, which inherit it), set from outside; a write past `nbytes` fails with
        EFBIG as a full disk fails with ENOSPC. `resource.RLIM_INFINITY` lifts it."""
        import resource

        pgid = self.process.pid  # started in its own session
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
            except OSError:
                continue
            if stat and int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # field 5: group
                resource.prlimit(int(entry), resource.RLIMIT_FSIZE,
                                 (nbytes, resource.RLIM_INFINITY))

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def log_size(self) -> int:
        """How many characters the log holds now (`wait_for_log`'s `since`)."""
        return len(self.log(tail=10**9))

    def wait_for_log(self, pattern: str, since: int = 0, timeout_s: float = 120) -> re.Match:
        """Poll the log, from character `since` on, until `pattern` matches; the match."""
        deadline = time.monotonic() + timeout_s
        while not (m := re.search(pattern, self.log(tail=10**9)[since:])):
            assert time.monotonic() < deadline, f"no line {pattern!r} in the log:\n{self.log()}"
            time.sleep(0.05)
        return m


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_studies(dest: Path, source: Path = SAMPLE_STUDIES) -> Path:
    """A private copy of the datastore (images only: no labels, no datastore index)."""
    if not (source / "chest_ct.nii.gz").exists():
        pytest.fail(f"sample studies are not built in {source}; run `citrusv sample-data` first.")
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != "datastore_v2.json":
            shutil.copy2(f, dest / f.name)
    return dest


@contextlib.contextmanager
def start_citrusv_server(studies: Path | str, model_dir: Path, log_path: Path | None = None,
                         workdir: Path | None = None, env: dict[str, str] | None = None,
                         tls: tuple[Path, Path, Path] | None = None,
                         **conf: str) -> Iterator[CitrusVServer]:
    """Start `monailabel start_server` on the app; stop it (and its training runs) on exit.

    `studies` is a folder or a DICOMweb URL (a PACS); `workdir` holds the log, the sessions
    and the PACS cache (default: the studies folder's parent); `env`: extra environment;
    `tls`: (certificate, key, CA certificate) to serve https (MONAI Label's --ssl_* options)."""
    port = free_port()
    remote = str(studies).startswith(("http://", "https://"))
    workdir = Path(workdir) if workdir else Path(studies).parent
    log_path = log_path or workdir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "model_dir", str(model_dir)]
    if tls:
        cmd += ["--ssl_certfile", str(tls[0]), "--ssl_keyfile", str(tls[1])]
    for key, value in {"device": "cpu", **conf}.items():
        cmd += ["--conf", key, str(value)]
    extra, env = env or {}, {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    if remote:
        env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(workdir / "pacs-cache")
    env.update(MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"),
               MONAI_LABEL_AUTO_UPDATE_SCORING="false", MONAI_LABEL_TRACKING_ENABLED="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    env.update(extra)
    # MONAI Label makes these in the app folder as it starts, checking first and creating
    # after: on a fresh clone two servers started at once (two xdist workers) raced on it and
    # one died with FileExistsError (2026-12-06 fresh-clone CI, 41 errors)
    for name in ("model", "logs", "bin"):
        (APP_DIR / name).mkdir(exist_ok=True)
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = CitrusVServer(f"{'https' if tls else 'http'}://127.0.0.1:{port}",
                           Path(studies) if not remote else workdir, Path(model_dir), log_path,
                           process, str(tls[2]) if tls else True)
    try:
        wait_until_up(server)
        yield server
    finally:
        _stop(process)
        log.close()


def assert_refuses_setting(sentences: str | list[str], studies: Path | str, model_dir: Path,
                           **kwargs) -> None:
    """A server started with `--conf` settings it cannot start with (in `kwargs`, as for
    start_citrusv_server) exits with status 78 (EX_CONFIG: the systemd unit does not restart
    on it) and logs one line, "Citrus-V cannot start: " and the sentences (regexes) in that
    order, one for each bad setting, with no traceback."""
    with pytest.raises(RuntimeError) as info:
        with start_citrusv_server(studies, model_dir, **kwargs):
            pass
    said = str(info.value)
    assert said.startswith("server exited with 78:"), said[-3000:]
    if isinstance(sentences, str):
        sentences = [sentences]
    line = re.search("Citrus-V cannot start: (.*)", said)
    assert line, said[-3000:]
    assert re.fullmatch(" ".join(sentences), line.group(1)), line.group(1)
    assert "Traceback" not in said, said[-3000:]


def wait_until_up(server: CitrusVServer) -> None:
    """Until the server answers /info/; RuntimeError with its log if it exits first or does not
    answer within START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            # 401: up, with MONAI Label's authentication on (tests/app/test_auth.py)
            if server.get("/info/", timeout=5).status_code in (200, 401):
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not answer /info/ in {START_TIMEOUT_S:.0f} s:\n"
                               f"{server.log()}")
        time.sleep(0.5)


@contextlib.contextmanager
def private_citrusv_server(root: Path, model_dir: Path, studies: Path = SAMPLE_STUDIES,
                           **kwargs) -> Iterator[CitrusVServer]:
    """A server of a test module's own, on copies of the studies and of the checkpoint under
    `root` (for tests that change labels or model versions); `kwargs` as start_citrusv_server."""
    copies = copy_studies(root / "studies", studies)
    model = shutil.copytree(model_dir, root / "model")
    with start_citrusv_server(copies, model, **kwargs) as server:
        yield server


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn + any training subprocess), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _engine_fingerprint(answers: dict[str, str]) -> str:
    """Changes when the engine's checkpoint code or the answers change (cache key)."""
    import citrusv

    digest = hashlib.sha256(json.dumps(answers, sort_keys=True).encode())
    for name in ("testing.py", "checkpoint.py", "config.py", "modeling.py", "prompting.py"):
        path = Path(citrusv.__file__).with_name(name)
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_tiny_checkpoint(request, tmp_path_factory, name: str, answers: dict[str, str]) -> Path:
    """A tiny checkpoint fitted to `answers`, kept in .pytest_cache keyed by the engine's code.

    Written to a scratch folder and renamed, so an interrupted fit never leaves a half model.
    """
    from citrusv.testing import write_tiny_checkpoint

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)
    path = root / _engine_fingerprint(answers)
    with FileLock(root / ".lock"):  # the other pytest-xdist worker waits, then reuses it
        if (path / "config.json").exists():
            return path
        tmp = root / f".writing-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_checkpoint(tmp, seed=0, answers=answers)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """A tiny Citrus-V checkpoint (released layout) whose decode is TINY_ANSWERS."""
    return cached_tiny_checkpoint(request, tmp_path_factory, "citrusv_tiny_model", TINY_ANSWERS)


@pytest.fixture(scope="session")
def citrusv_sample_studies(request) -> Path:
    """The built datastore root (tests/conftest.py's `sample_root` builds it when missing)."""
    try:
        return Path(request.getfixturevalue("sample_root")) / "studies"
    except pytest.FixtureLookupError:
        return SAMPLE_STUDIES


@pytest.fixture(scope="session")
def citrusv_server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies
                   ) -> Iterator[CitrusVServer]:
    root = tmp_path_factory.mktemp("citrusv_server")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    model_dir = root / "model"
    shutil.copytree(tiny_model_dir, model_dir)  # private: training adds versions/ to it
    with start_citrusv_server(studies, model_dir) as server:
        yield server


@pytest.fixture(scope="session")
def citrusv_server_without_model(tmp_path_factory, citrusv_sample_studies
                                 ) -> Iterator[CitrusVServer]:
    root = tmp_path_factory.mktemp("citrusv_server_no_model")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    with start_citrusv_server(studies, root / "not-installed") as server:
        yield server
