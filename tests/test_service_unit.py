"""scripts/citrusv-server.service: the systemd unit the README gives IT. Its ExecStart, with the
unit's environment and this checkout's paths in place of /opt/citrusv and /data, starts the real
server; SIGTERM to its process group (what `systemctl stop` sends to the control group) stops it
within the unit's TimeoutStopSec; `systemd-analyze verify` finds nothing to say about the file."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server import REPO, CitrusVServer, copy_studies, free_port, wait_until_up

UNIT = REPO / "scripts" / "citrusv-server.service"


def _settings() -> dict[str, list[str]]:
    """Key -> values (in order) over the unit's sections; comments and blank lines skipped."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _here(text: str, studies: Path, model: Path, port: int) -> str:
    """The unit's text with this checkout's paths, a CPU and a free port."""
    for old, new in (("/opt/citrusv", str(REPO)), ("/data/studies", str(studies)),
                     ("/data/models/Citrus-V-8B", str(model)), ("--port 8000", f"--port {port}"),
                     ("--host 0.0.0.0", "--host 127.0.0.1"), ("--conf device cuda", "--conf device cpu"),
                     ("--conf dtype bf16", "--conf dtype fp32")):
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_unit_runs_as_a_restarting_unprivileged_service():
    s = _settings()
    assert s["User"] == ["citrusv"] and s["Restart"] == ["on-failure"]
    assert s["WantedBy"] == ["multi-user.target"] and s["KillMode"] == ["control-group"]
    assert int(s["StartLimitBurst"][0]) >= 2 and int(s["RestartSec"][0]) > 0
    # the app's exit status for a --conf setting it cannot start with (tests/server.py
    # assert_refuses_setting): systemd does not restart on it
    assert s["RestartPreventExitStatus"] == ["78"]
    command = shlex.split(s["ExecStart"][0])
    assert command[:4] == ["/opt/citrusv/.venv/bin/python", "-m", "monailabel.main", "start_server"]
    assert command[command.index("--app") + 1] == "/opt/citrusv/monailabel_app"
    assert "PrivateDevices" not in s  # the GPU's device files stay visible


def test_unit_command_starts_the_server_and_stop_ends_it(tmp_path, tiny_model_dir,
                                                         citrusv_sample_studies):
    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    port = free_port()
    s = _settings()
    command = shlex.split(_here(s["ExecStart"][0], studies, model, port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    for assignment in s["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("/var/lib/citrusv", str(tmp_path / "state"))
    env["OMP_NUM_THREADS"] = "2"
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = CitrusVServer(f"http://127.0.0.1:{port}", studies, model, tmp_path / "server.log",
                           process)
    try:
        wait_until_up(server)
        info = server.get("/info/").json()["citrusv"]
        assert info["model_dir"] == str(model.resolve()) and info["device"] == "cpu"
        r = server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                        data={"params": '{"prompt": "Segment the liver.", "slice": 60}'})
        assert r.status_code == 200, r.text
        stop_s = float(s["TimeoutStopSec"][0])
        start = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=stop_s)
        assert time.monotonic() - start < stop_s
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def test_the_unit_under_real_systemd():
    """scripts/systemd_check.py: the unit under Debian's systemd, PID 1 of namespaces of its own
    (root only, ~75–90 s): `enable --now`; the server as the unit's user with its state directory,
    private /tmp, read-only /usr and /etc; `systemctl stop` during a training run ends the
    whole control group within TimeoutStopSec and the correction sent before is stored whole;
    SIGKILL is followed by a restart; `--conf device cuda` without a GPU fails with status 78,
    is not restarted, and `systemctl status` shows the sentence. The script checks each value
    and exits 1 naming the first that does not hold."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "systemd_check.py")],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 2:  # not root, no namespaces, no systemd, or a real install here
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    for step in ("1. enable --now: /info/ answers", "2. stop during a training run",
                 "3. SIGKILL to MainPID", "4. --conf device cuda without a GPU: failed"):
        assert step in r.stdout, r.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian's systemd package)")
def test_systemd_finds_nothing_wrong_with_the_unit(tmp_path):
    # with the paths of this checkout, so that its ExecStart exists
    unit = tmp_path / "citrusv-server.service"
    unit.write_text(_here(UNIT.read_text(), tmp_path, tmp_path, 8000))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
