"""scripts/citrusv-server.service under a real systemd, on this machine.

    sudo .venv/bin/python scripts/systemd_check.py [--port 18777] [--keep]

Boots systemd 252 (Debian's) as PID 1 of its own PID and mount namespaces, with only the
units it needs (its targets and journald; none of the distribution's services, generators or
tmpfiles cleaning, which would act on this machine), then does what README "Running as a
service" tells IT to do: copy the unit, `systemctl daemon-reload`, `systemctl enable --now`.
The unit is used as shipped but for one drop-in that sets ExecStart to this checkout's
folders, a CPU, fp32, 127.0.0.1 and a free port (the edit README asks for), and RestartSec to
2 s instead of the unit's 10 (steps 3 and 4 wait for it; the unit's own value is checked by
tests/test_service_unit.py). Then it checks,
printing each figure:

1. the server answers /info/, runs as the unit's user, with its state directory, a private
   /tmp, /usr and /etc read-only and no new privileges; journalctl -u shows its log;
2. a correction sent to it is stored; `systemctl stop` during a training run ends the server
   and the run (the whole control group) within TimeoutStopSec, and the correction is whole;
3. killed with SIGKILL, the server is restarted by systemd (Restart=on-failure) and answers;
4. with a setting that keeps it from starting (`--conf device cuda` on a machine without a
   GPU), systemd gives up after StartLimitBurst tries and `systemctl status` shows the
   server's sentence.

Exit 0 when all hold, 1 with the failed check's sentence, 2 when it cannot run here (not
root, no unshare/nsenter or systemd). Everything it makes is removed at the end (--keep
leaves the scratch folder). It changes nothing outside its namespaces but /var/lib/citrusv
(the unit's StateDirectory, removed at the end; refused if it exists) and an empty
/opt/citrusv mount point (likewise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "scripts" / "citrusv-server.service"
UNIT_NAME = UNIT.name
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
SYSTEMD = Path("/usr/lib/systemd/systemd")
TARGETS = ["basic.target", "sysinit.target", "multi-user.target", "network-online.target",
           "network.target", "shutdown.target", "sockets.target", "timers.target", "paths.target",
           "slices.target", "local-fs.target", "local-fs-pre.target", "swap.target"]
JOURNALD = ["systemd-journald.service", "systemd-journald.socket",
            "systemd-journald-dev-log.socket", "systemd-journald-audit.socket"]
USER, UID = "citrusv", 61234
RESTART_SEC = 2  # the drop-in's RestartSec
STATE_DIR = Path("/var/lib/citrusv")
OPT = Path("/opt/citrusv")


class CheckFailed(Exception):
    pass


def check(ok: bool, sentence: str) -> None:
    if not ok:
        raise CheckFailed(sentence)


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the namespace -------------------------------------------------------------------------

def prepare(scratch: Path) -> None:
    """Units, accounts, the app folder and the data, under `scratch`."""
    lib = scratch / "lib-units"
    lib.mkdir()
    for name in TARGETS + JOURNALD:
        if (SYSTEM_UNITS / name).is_file():
            shutil.copy(SYSTEM_UNITS / name, lib / name)
    (lib / "sysinit.target.wants").mkdir()
    (lib / "sysinit.target.wants" / "systemd-journald.service").symlink_to(
        "../systemd-journald.service")
    (lib / "sockets.target.wants").mkdir()
    for sock in ("systemd-journald.socket", "systemd-journald-dev-log.socket"):
        (lib / "sockets.target.wants" / sock).symlink_to(f"../{sock}")
    (scratch / "etc-units").mkdir()
    (scratch / "generators").mkdir()
    for name in ("passwd", "group"):
        text = Path(f"/etc/{name}").read_text()
        line = (f"{USER}:x:{UID}:{UID}:Citrus-V server:/nonexistent:/usr/sbin/nologin\n"
                if name == "passwd" else f"{USER}:x:{UID}:\n")
        (scratch / name).write_text(text + line)
    opt = scratch / "opt"
    shutil.copytree(REPO / "monailabel_app", opt / "monailabel_app",
                    ignore=shutil.ignore_patterns("logs", "__pycache__"))
    (opt / ".venv").mkdir()
    studies = scratch / "data" / "studies"
    studies.mkdir(parents=True)
    for f in (REPO / "sample_data" / "studies").iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != "datastore_v2.json":
            shutil.copy2(f, studies / f.name)
    shutil.copytree(REPO / "models" / "nano", scratch / "data" / "model")
    for root in (opt, scratch / "data"):
        for path in [root, *root.rglob("*")]:
            os.lchown(path, UID, UID)
    (scratch / "pyenv").mkdir()
    (scratch / "repo").mkdir()
    (scratch / "boot.sh").write_text(BOOT.format(scratch=scratch, repo=REPO, opt=OPT,
                                                 systemd=SYSTEMD))


# Run by `unshare --pid --fork --mount --mount-proc`: private /run, /tmp and journal; only
# the units above; this checkout's venv and app at /opt/citrusv; the added user. This
# machine's Python lives under /root (mode 700): the user gets a path to it in the namespace
# only (a workstation's /usr/bin/python3 needs none of this).
BOOT = """#!/bin/bash
set -e
mount --make-rprivate /
mount --bind {repo} {scratch}/repo  # a checkout under /tmp (a CI clone) stays reachable
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ ! -d {repo}/.venv ]; then mkdir -p {repo}; mount --bind {scratch}/repo {repo}; fi
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mount --bind {scratch}/lib-units /usr/lib/systemd/system
mount --bind {scratch}/etc-units /etc/systemd/system
for d in /usr/lib/systemd/system-generators /etc/systemd/system-generators \
         /usr/lib/systemd/system-environment-generators; do
    if [ -d "$d" ]; then mount --bind {scratch}/generators "$d"; fi
done
mount --bind {scratch}/passwd /etc/passwd
mount --bind {scratch}/group /etc/group
mount --bind {scratch}/opt {opt}
mount --bind {repo}/.venv {opt}/.venv
if [ -d /root/.pyenv ]; then
    mount --bind /root/.pyenv {scratch}/pyenv
    mount -t tmpfs -o mode=755 tmpfs /root
    mkdir /root/.pyenv
    mount --bind {scratch}/pyenv /root/.pyenv
fi
export container=unshare
exec {systemd} --system --unit=multi-user.target --log-target=console --log-level=info
"""


class Namespace:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.log = open(scratch / "systemd.log", "w")
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "bash",
             str(scratch / "boot.sh")], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = self._pid1()

    def _pid1(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if kids:
                return int(kids[0])
            check(self.unshare.poll() is None,
                  f"unshare exited: {(self.scratch / 'systemd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        raise CheckFailed("systemd did not start in its namespace within 30 s")

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "--", *cmd],
                              capture_output=True, text=True, timeout=timeout)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args)

    def show(self, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", UNIT_NAME).stdout.strip()

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", UNIT_NAME).stdout

    def up(self) -> str:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = self.systemctl("is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise CheckFailed(f"systemd in the namespace did not finish booting (state '{state}'):\n"
                          + (self.scratch / "systemd.log").read_text()[-3000:])

    def close(self) -> None:
        self.systemctl("stop", UNIT_NAME)
        if self.unshare.poll() is None:
            os.kill(self.pid, 9)  # PID 1 of the namespace: the kernel ends every process in it
            self.unshare.wait(timeout=30)
        self.log.close()


# ---- the checks ----------------------------------------------------------------------------

def drop_in(scratch: Path, port: int, device: str = "cpu") -> str:
    """The unit's ExecStart with this checkout's folders, `device`, fp32, 127.0.0.1, `port`."""
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart="))
    for old, new in (("/data/studies", str(scratch / "data" / "studies")),
                     ("/data/models/Citrus-V-8B", str(scratch / "data" / "model")),
                     ("--host 0.0.0.0", "--host 127.0.0.1"), ("--port 8000", f"--port {port}"),
                     ("--conf device cuda", f"--conf device {device}"),
                     ("--conf dtype bf16", "--conf dtype fp32")):
        check(old in line, f"the unit's ExecStart no longer has '{old}'")
        line = line.replace(old, new)
    text = f"[Service]\nExecStart=\n{line}\nRestartSec={RESTART_SEC}\n"
    if REPO.is_relative_to("/tmp") or REPO.is_relative_to("/var/tmp"):
        # a checkout under /tmp (a CI clone): the venv imports the citrusv package from it,
        # and PrivateTmp would hide it from the service (a workstation's /opt/citrusv is not)
        text += f"BindReadOnlyPaths={REPO}\n"
    return text


def wait_http(url: str, ns: Namespace, timeout: float = 180) -> float:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"the service did not answer /info/ in {timeout:.0f} s:\n"
                      + ns.journal()[-3000:])


def status_of(ns: Namespace, pid: int) -> dict[str, str]:
    """/proc/PID/status of a process of the namespace (`pid` as systemd numbers it there)."""
    out = {}
    for line in ns.run("cat", f"/proc/{pid}/status").stdout.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def mounts_of(ns: Namespace, pid: int) -> dict[str, tuple[str, str]]:
    """mount point -> (root within its filesystem, options) for `pid`'s mount namespace."""
    out = {}
    for line in ns.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines():
        fields = line.split()
        out[fields[4]] = (fields[3], fields[5])
    return out


def cgroup_pids(ns: Namespace) -> list[int]:
    path = ns.show("ControlGroup")
    procs = Path("/sys/fs/cgroup/systemd") / path.lstrip("/") / "cgroup.procs"
    return [int(x) for x in procs.read_text().split()] if path and procs.exists() else []


def run_checks(scratch: Path, port: int) -> None:
    import nibabel as nib
    import numpy as np
    import requests

    url = f"http://127.0.0.1:{port}"
    ns = Namespace(scratch)
    try:
        say(f"systemd {ns.up()} in its namespace (PID {ns.pid} here)")
        etc = scratch / "etc-units"
        shutil.copy(UNIT, etc / UNIT_NAME)  # `sudo cp scripts/citrusv-server.service ...`
        (etc / f"{UNIT_NAME}.d").mkdir()
        (etc / f"{UNIT_NAME}.d" / "here.conf").write_text(drop_in(scratch, port))
        r = ns.systemctl("daemon-reload")
        check(r.returncode == 0, f"daemon-reload failed: {r.stderr}")
        r = ns.systemctl("enable", "--now", UNIT_NAME)
        check(r.returncode == 0, f"systemctl enable --now failed: {r.stderr}")
        check((etc / "multi-user.target.wants" / UNIT_NAME).is_symlink(),
              "enable did not link the unit into multi-user.target (starts at boot)")
        took = wait_http(url, ns)
        say(f"1. enable --now: /info/ answers after {took:.1f} s")

        pid = int(ns.show("MainPID"))  # numbered in the namespace, as every PID below
        st = status_of(ns, pid)
        check(st["Uid"].split()[0] == str(UID), f"server runs as uid {st['Uid']}, not {USER}")
        check(st.get("NoNewPrivs") == "1", "NoNewPrivileges is not in effect")
        mounts = mounts_of(ns, pid)
        check("systemd-private-" in mounts.get("/tmp", ("", ""))[0],
              f"/tmp of the server is not private: {mounts.get('/tmp')}")
        for path in ("/usr", "/etc"):
            check(path in mounts and mounts[path][1].split(",")[0] == "ro",
                  f"{path} is not read-only for the server: {mounts.get(path)}")
        check(STATE_DIR.is_dir() and STATE_DIR.stat().st_uid == UID,
              f"{STATE_DIR} missing or not owned by {USER}")
        journal = ns.journal()
        check(f"Session Path: {STATE_DIR}/sessions" in journal,
              f"MONAI Label's sessions are not in {STATE_DIR}/sessions")
        check("Uvicorn running on" in journal or "Application startup complete" in journal,
              "journalctl -u shows no server start:\n" + journal[-2000:])
        say(f"   MainPID {pid}: uid {UID} ({USER}), NoNewPrivs 1, private /tmp "
            f"({mounts['/tmp'][0]}), /usr and /etc read-only, {STATE_DIR} owned by {USER}; "
            f"journalctl -u: {len(journal.splitlines())} lines")

        # 2. a correction, a training run, then `systemctl stop`
        ref = nib.load(REPO / "sample_data" / "reference" / "chest_ct" / "mask.nii.gz")
        liver = (np.asarray(ref.dataobj) == 5).astype(np.uint8)
        ct = scratch / "data" / "studies" / "chest_ct.nii.gz"
        sent = scratch / "liver.nii.gz"
        nib.save(nib.Nifti1Image(liver, nib.load(ct).affine), sent)
        with open(sent, "rb") as f:
            r = requests.put(f"{url}/datastore/label?image=chest_ct&tag=final", timeout=120,
                             files={"label": (sent.name, f, "application/gzip")},
                             data={"params": json.dumps({"label_info": [{"name": "liver",
                                                                          "idx": 1}]})})
        check(r.status_code == 200, f"correction refused: {r.status_code} {r.text[:300]} "
              f"{requests.get(url + '/datastore/?output=all', timeout=30).text[:500]}")
        r = requests.post(f"{url}/train/citrusv_finetune", timeout=60,
                          json={"steps": 5000, "batch_images": 1, "max_per_structure": 4})
        check(r.status_code == 200, f"training not started: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + 120
        while len(cgroup_pids(ns)) < 2 or "Fine-tuning from" not in ns.journal():
            check(time.monotonic() < deadline, "no training process joined the service's "
                  "control group within 120 s:\n" + ns.journal()[-2000:])
            time.sleep(0.5)
        before = cgroup_pids(ns)
        t0 = time.monotonic()
        r = ns.systemctl("stop", UNIT_NAME)
        stop_s = time.monotonic() - t0
        check(r.returncode == 0, f"systemctl stop failed: {r.stderr}")
        left = [p for p in before if Path(f"/proc/{p}").exists()]
        check(not left and not cgroup_pids(ns), f"processes left after stop: {left}")
        timeout_stop = float(ns.show("TimeoutStopUSec").rstrip("s") or 0)
        check(stop_s < timeout_stop, f"stop took {stop_s:.1f} s, over TimeoutStopSec")
        check(ns.show("Result") == "success",
              f"stop ended with Result={ns.show('Result')} (SIGKILL after the timeout?)")
        stored = scratch / "data" / "studies" / "labels" / "final" / "chest_ct.nii.gz"
        got = np.asarray(nib.load(stored).dataobj) if stored.exists() else None
        check(got is not None and int(((got > 0) == (liver > 0)).all()) == 1,
              "the stored correction is missing or is not the liver that was sent")
        say(f"2. stop during a training run: {len(before)} processes in the control group, "
            f"all gone in {stop_s:.1f} s (TimeoutStopSec {timeout_stop:.0f} s), Result=success;"
            f" the correction is stored whole ({int(liver.sum())} voxels)")

        # 3. Restart=on-failure
        ns.systemctl("start", UNIT_NAME)
        wait_http(url, ns)
        pid = int(ns.show("MainPID"))
        check(ns.run("kill", "-9", str(pid)).returncode == 0, f"could not kill {pid}")
        took = wait_http(url, ns, timeout=240)
        restarts, new_pid = ns.show("NRestarts"), int(ns.show("MainPID"))
        check(restarts == "1" and new_pid != pid, f"NRestarts {restarts}, MainPID {new_pid}")
        say(f"3. SIGKILL to MainPID {pid}: restarted by systemd (NRestarts 1, MainPID {new_pid}),"
            f" /info/ answers again {took:.1f} s later (RestartSec "
            f"{ns.show('RestartUSec')})")
        ns.systemctl("stop", UNIT_NAME)

        # 4. a setting that keeps the server from starting: exit 78, not restarted
        (etc / f"{UNIT_NAME}.d" / "here.conf").write_text(
            drop_in(scratch, port, device="cuda"))
        ns.systemctl("daemon-reload")
        ns.systemctl("reset-failed", UNIT_NAME)
        t0 = time.monotonic()
        ns.systemctl("start", UNIT_NAME)
        deadline = time.monotonic() + 120
        while ns.show("ActiveState") != "failed":
            check(time.monotonic() < deadline, "the unit did not fail within 120 s: "
                  f"ActiveState {ns.show('ActiveState')}, NRestarts {ns.show('NRestarts')}")
            time.sleep(0.5)
        failed_s = time.monotonic() - t0
        time.sleep(RESTART_SEC + 3)  # past RestartSec: a restart would have begun by now
        state, restarts = ns.show("ActiveState"), ns.show("NRestarts")
        code = ns.show("ExecMainStatus")
        check(state == "failed" and restarts == "0" and code == "78",
              f"ActiveState {state}, NRestarts {restarts}, exit status {code}: expected a "
              "failed unit, no restarts, status 78")
        status = ns.systemctl("status", "-n", "10", UNIT_NAME).stdout
        sentence = next((x for x in status.splitlines() if "Citrus-V cannot start" in x), "")
        check(bool(sentence), "systemctl status shows no sentence:\n" + status)
        check("Traceback" not in ns.journal().split("Started citrusv-server.service")[-1],
              "the failed start logged a traceback:\n" + status)
        say(f"4. --conf device cuda without a GPU: failed after {failed_s:.1f} s with status 78"
            f", not restarted (NRestarts 0 {RESTART_SEC + 3} s later); systemctl status shows:\n"
            f"   {sentence.strip()}")
    except CheckFailed:
        say("journalctl -u, last lines:\n" + "\n".join(ns.journal().splitlines()[-25:]))
        raise
    finally:
        ns.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="port for the server (default: a free one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        say("systemd_check: run it as root (it starts systemd in namespaces of its own).")
        return 2
    for tool in ("unshare", "nsenter"):
        if not shutil.which(tool):
            say(f"systemd_check: '{tool}' (util-linux) is not installed.")
            return 2
    if not SYSTEMD.exists():
        say(f"systemd_check: {SYSTEMD} is not here (apt-get install systemd).")
        return 2
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        say("systemd_check: this machine does not allow new PID and mount namespaces "
            f"(unshare: {probe.stderr.strip()}); a container without CAP_SYS_ADMIN cannot.")
        return 2
    for path in (STATE_DIR, OPT):
        if path.exists():
            say(f"systemd_check: {path} exists already; it is the unit's own, so the check "
                "does not run on a machine where Citrus-V is installed as a service.")
            return 2
    # not under /tmp or /var/tmp: PrivateTmp=true gives the service its own of both, where it
    # would find no studies and no model
    scratch = Path(tempfile.mkdtemp(prefix="citrusv-systemd-check.", dir="/var/lib"))
    scratch.chmod(0o755)  # the service's user reads its data and app below it
    OPT.mkdir()
    t0 = time.monotonic()
    try:
        prepare(scratch)
        run_checks(scratch, args.port or free_port())
    except CheckFailed as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        OPT.rmdir()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            say(f"scratch folder kept: {scratch}")
    say(f"all checks held ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
