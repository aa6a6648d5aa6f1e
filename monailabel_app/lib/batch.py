"""Batch inference (`POST /batch/infer/{model}`) on a thread of the server's own process.

MONAI Label 0.8.5 runs such a batch in a new process (`python -m monailabel.interfaces.utils.app
-m batch_infer`) that loads the model again: on a GPU, a second copy of the weights next to the
serving one (bf16 8B: 15816 MiB). On a 24 GB card serving the 8B there is no room for it, and
whichever process allocates last runs out of memory, the radiologists' questions included.
Here the batch asks the engine the server has loaded, on a thread; the engine answers one
question at a time, and over a slice range one chunk of slices at a time (the engine's
turns), so a radiologist's question waits at most for the slices the batch is asking (8 of a
volume, or one 2D image), not for its whole volume. MONAI Label's task table is kept, so `GET
/batch/infer` lists the run (with `progress` while a volume's slices are asked), another batch
while it runs gets a 429, and `DELETE /batch/infer` stops the run after the slices it is
asking; a volume stopped part way has no label saved. A `run_sync` batch is such a run too,
and its request waits for it (`run_and_wait`): MONAI Label ran it on the request's own
thread, outside the task table, so it could not be stopped, and two sent at once both ran."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from datetime import datetime

from lib.errors import RequestError

from monailabel.utils.async_tasks import utils as task_table

logger = logging.getLogger(__name__)

METHOD = "batch_infer"
RUNNING = ("a batch inference is already running; GET /batch/infer shows its progress, and "
           "DELETE /batch/infer stops it after the slices it is asking.")
_lock = threading.Lock()
_this_thread = threading.local()  # .run: the BatchRun a batch thread asks for


class BatchStopped(Exception):
    """A stop was asked: raised before the next image, or a volume's next slices, is asked."""


def _now() -> str:
    return datetime.today().strftime("%Y-%m-%d %H:%M:%S")  # MONAI Label's task time stamps


class BatchRun:
    """One batch on a thread, entered in MONAI Label's task table as its own runs are: `task`
    is the dict `GET /batch/infer` answers with (status RUNNING, STOPPING after a stop is
    asked, then DONE, STOPPED or ERROR; `details`: the last 20 lines of progress)."""

    def __init__(self, request: dict) -> None:
        self._stop = threading.Event()
        self.ended = threading.Event()
        self.task = {"id": str(uuid.uuid4()), "status": "RUNNING", "request": request,
                     "start_ts": _now(), "details": deque(maxlen=20),
                     # "chest_ct: 40 of 133 slices asked" while a volume's slices are asked;
                     # the key stays (a GET reads the dict while this thread writes it)
                     "progress": None}
        self.answered: list[str] = []  # the images answered so far, in order
        self.result: dict | None = None  # {image id: answer}, once DONE
        self.cut_short: str | None = None  # "chest_ct after 16 of 60 slices": stopped in it
        self.error: str | None = None  # what failed, once ERROR

    def note(self, line: str) -> None:
        self.task["details"].append(line)
        logger.info("Batch inference: %s", line)

    def answer(self, image: str, tag: str) -> None:
        """`image` was answered and its label saved under `tag`."""
        self.answered.append(image)
        self.task["progress"] = None
        self.note(f"{image}: answered; its label is saved under '{tag}'")

    def check(self, image: str) -> None:
        """Before asking `image`: BatchStopped if a stop was asked."""
        if self._stop.is_set():
            self.note(f"stopped before {image}")
            raise BatchStopped

    def slices(self, image: str, asked: int, total: int) -> None:
        """Before a volume's next slices: its progress in the task, BatchStopped if a stop
        was asked (the volume's label is then not saved)."""
        self.task["progress"] = f"{image}: {asked} of {total} slices asked"
        if self._stop.is_set():
            self.cut_short = f"{image} after {asked} of {total} slices"
            self.note(f"{image}: stopped after {asked} of {total} slices; its label is not saved")
            raise BatchStopped

    def stop(self) -> dict:
        if not self._stop.is_set():
            self._stop.set()
            self.task["status"] = "STOPPING"
            self.note("stop asked: the slices being asked are finished first")
        return self.task

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def progress(image: str):
    """For a slice range asked by a batch on this thread: the engine's `progress` callback
    (`BatchRun.slices` for `image`); None on any other thread (a radiologist's question)."""
    run = getattr(_this_thread, "run", None)
    if run is None:
        return None
    return lambda asked, total: run.slices(image, asked, total)


def running() -> BatchRun | None:
    """The batch running on its thread (None: none runs)."""
    for run in task_table.processes(METHOD).values():
        if isinstance(run, BatchRun):
            return run
    return None


def start(app, model: str, images, params: dict | None) -> dict:
    """Start `app.batch_infer` on a thread with the request MONAI Label's AsyncTask would make
    (the app's batch config, then the params sent); the task's dict, or a 429 sentence when a
    batch already runs."""
    return _start(app, model, images, params).task


def run_and_wait(app, model: str, images, params: dict | None) -> dict:
    """A `run_sync` batch: started as `start` starts one, then waited for (on the request's
    worker thread). Its answer is MONAI Label's `run_sync` answer, `{image id: {"label", "tag",
    "params"}}` (`{"error": sentence}` for an image not asked); a batch stopped by `DELETE
    /batch/infer` is a 409 sentence naming the images answered, a failed one a 500 sentence."""
    run = _start(app, model, images, params)
    run.ended.wait()
    if run.task["status"] == "DONE" and run.result is not None:
        return run.result
    if run.task["status"] == "STOPPED":
        tag = run.task["request"].get("label_tag") or "original"
        other = "other " if run.cut_short else ""
        done = (f"after {', '.join(run.answered)} had been answered (labels saved under "
                f"'{tag}')" if run.answered else f"before any {other}image had been answered")
        if run.cut_short:  # in a volume's slices
            done = f"in {run.cut_short} (its label is not saved), {done}"
        raise RequestError(f"the batch was stopped (DELETE /batch/infer) {done}; the other "
                           "images were not asked.", status_code=409)
    raise RequestError(f"the batch failed: {run.error or 'see the server log'}; GET "
                       "/batch/infer shows its last lines.", status_code=500)


def _start(app, model: str, images, params: dict | None) -> BatchRun:
    request = {"model": model, "images": images}
    request.update(app.info().get("config", {}).get(METHOD, {}))
    request.update(params or {})
    with _lock:
        check_none_running()
        run = BatchRun(request)
        task_table.background_tasks.setdefault(METHOD, []).append(run.task)
        task_table.background_processes.setdefault(METHOD, {})[run.task["id"]] = run
    logger.info("Batch inference in the server's process: %s", request)
    # a daemon thread: stopping the server does not wait for the batch to end
    threading.Thread(target=_run, args=(app, run), name="citrusv-batch", daemon=True).start()
    return run


def _run(app, run: BatchRun) -> None:
    status = "ERROR"
    _this_thread.run = run
    try:
        result = app.batch_infer(dict(run.task["request"]), run=run)
        status = "STOPPED" if run.stopped else "DONE"
        if status == "DONE":
            failed = sum(1 for r in result.values() if not r or "error" in r)
            run.note(f"done: {len(result) - failed} of {len(result)} images answered")
            run.result = result
    except BatchStopped:
        status = "STOPPED"
    except Exception as e:  # noqa: BLE001 (the run's end is reported in its task, not raised)
        logger.exception("Batch inference failed")
        run.error = str(e)
        run.note(f"failed: {e}")
    finally:
        _this_thread.run = None
        run.task.update(status=status, end_ts=_now(), progress=None)
        with _lock:
            task_table.background_processes.get(METHOD, {}).pop(run.task["id"], None)
        run.ended.set()


def check_none_running() -> None:
    """A 429 sentence while a batch runs (`run_sync` or not), for any batch sent."""
    if task_table.processes(METHOD):
        raise RequestError(RUNNING, status_code=429)
