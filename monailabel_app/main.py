"""MONAI Label app for Citrus-V: discovers `lib/configs/*.py` (radiology sample-app shape).

    monailabel start_server --app monailabel_app --studies sample_data/studies \\
        [--conf model_dir DIR] [--conf device cuda|cpu] [--conf dtype bf16|fp32]

Beyond discovery this class only adds what every config shares: the datastore (DICOM files
included, corrections written atomically), 4xx answers for unknown tasks and images, and the
model's status and versions in /info.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import json
import logging
import os
import sys
import time
from typing import Any

import lib.configs
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import Form, HTTPException
from lib.datastore import (SERVER_KEYS, EXTENSIONS, CorrectionsDatastore, PacsDatastore,
                           pacs_cache_bytes)
from lib.errors import EXIT_CONF, ConfError, RequestError
from lib.images import StudyCache, read_study, write_image
from lib.model import resolve_model_dir
from lib.trainers.citrusv_finetune import check_options

import monailabel
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.class_utils import get_class_names
from pydantic import BaseModel

logger = logging.getLogger(__name__)

MONAI_LABEL_DEFAULT_SEARCH = {"Modality": "CT"}  # MONAI_LABEL_DICOMWEB_SEARCH_FILTER's default


def _patch_once(module, name: str, make, tag: str = "") -> None:
    """Replace `module.name` (a MONAI Label or Starlette internal looked up at call time) with
    `make(original)`, once per process and `tag`: the app may be constructed more than once,
    and one internal may be wrapped by more than one patch."""
    original = getattr(module, name)
    done = getattr(original, "_citrusv_patches", frozenset())
    if tag in done:
        return
    patched = make(original)
    patched._citrusv_patches = done | {tag}
    setattr(module, name, patched)


# what a full (or read-only) disk looks like to a write, and what it means for the request
STORAGE_ERRORS = {
    errno.ENOSPC: "ran out of disk space",
    errno.EDQUOT: "used up its disk quota",
    errno.EFBIG: "hit the file size limit set for its process",
    errno.EROFS: "found its storage read-only",
}


def _storage_error_507(e: OSError, what: str, then: str, where: str = ""):
    """The HTTP 507 (logged, with the file or `where`) for a write that failed for lack of space
    or on a read-only disk while the server was `what`; None for any other OSError. `then`:
    what the sender does."""
    if e.errno not in STORAGE_ERRORS:
        return None
    logger.error("Storage error while %s: %s (%s)", what, e, e.filename or where)
    return HTTPException(status_code=507, detail=(
        f"The server {STORAGE_ERRORS[e.errno]} while {what} ({e.strerror}){then}"))


def _storage_errors_as_507(doing: str, then: str, image_arg: int):
    """Wrap an endpoint helper: a write that fails for lack of space (or on a read-only disk)
    answers HTTP 507 with a sentence instead of MONAI Label's bare 500, and is logged.
    `doing` names what was being stored ({image}: the helper's argument `image`, positional
    index `image_arg`), `then` what the sender should do."""

    def wrap(function):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except OSError as e:
                image = kwargs.get("image") or (args[image_arg] if len(args) > image_arg else "")
                what = doing.format(image=f"'{image}'" if image else "").strip()
                answer = _storage_error_507(e, what, then)
                if answer is None:
                    raise
                raise answer from None
        return wrapped
    return wrap


def _answer_full_disk_with_507() -> None:
    """Corrections, image uploads and answers write files; on a full disk MONAI Label 0.8.5
    answers those requests 500 with no word of why. A correction that could not be merged may
    still be kept as sent (labels/final/.history), but the sender must not take it as saved."""
    from monailabel.endpoints import datastore, infer

    _patch_once(datastore, "save_label", _storage_errors_as_507(
        "storing the correction for {image}",
        "; it may not be saved. Keep it and send it again once IT has freed space on the "
        "server.", image_arg=1), tag="507")
    _patch_once(datastore, "add_image", _storage_errors_as_507(
        "storing the uploaded image {image}",
        ": nothing was added. Ask IT to free space on the server, then send it again.",
        image_arg=1), tag="507")
    _patch_once(infer, "run_inference", _storage_errors_as_507(
        "answering about {image}", ": ask IT to free space on the server, then ask again.",
        image_arg=2), tag="507")


def _receive_uploads_with_507() -> None:
    """Starlette spools an uploaded file over 1 MB into the server's temporary folder while it
    reads the request, before any endpoint runs. On a full disk that write fails, and FastAPI
    answered "There was an error parsing the body" (400), which reads as the client's fault.
    The multipart parser (a class attribute, looked up per request) now answers 507 with a
    sentence for a write that fails for lack of space; other failures stay as they were."""
    import tempfile

    from starlette.formparsers import MultiPartParser

    def make(parse):
        @functools.wraps(parse)
        async def wrapped(self, *args, **kwargs):
            try:
                return await parse(self, *args, **kwargs)
            except OSError as e:
                answer = _storage_error_507(
                    e, "receiving the upload into its temporary folder",
                    ": nothing was stored. Ask IT to free space on the server, then send it again.",
                    where=tempfile.gettempdir())
                if answer is None:
                    raise
                raise answer from None
        return wrapped

    _patch_once(MultiPartParser, "parse", make, tag="507")


def _json_object(params: str | None, example: str, field: str = "params") -> dict:
    """A request's `params` (or other `field`) form field as a dict; anything but a JSON object
    is a 400 sentence (MONAI Label answered 500)."""
    try:
        body = json.loads(params) if params else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise HTTPException(status_code=400, detail=f"{field} must be a JSON object, e.g. {example}.")
    return body


def _answer_missing_image_with_400() -> None:
    """MONAI Label 0.8.5's /infer endpoint answers 500 when neither `image` nor `file` is given.

    That check runs before any app code, so the app wraps the endpoint's module-level
    `run_inference` (looked up at call time) to answer the same case with a 400 sentence.
    """
    from monailabel.endpoints import infer as endpoint

    def make(original):
        def run_inference(background_tasks, model, image="", session_id="", params="{}",
                          file=None, label=None, output=None):
            if not file and not image and not session_id:
                raise HTTPException(status_code=400, detail=(
                    "Name the image to ask about: add ?image=ID of a datastore image, or upload "
                    "it in the 'file' field."))
            _json_object(params, '{"prompt": "Segment the liver.", "slice": 60}')
            return original(background_tasks, model, image, session_id, params, file, label,
                            output)
        return run_inference

    _patch_once(endpoint, "run_inference", make)


def _no_such_image(image: str, store) -> str:
    """The sentence for an image id the datastore does not hold (infer, download)."""
    if isinstance(store, PacsDatastore):
        return (f"image '{image}' is not a series on the PACS; use a SeriesInstanceUID that "
                "the PACS lists, or upload the file.")
    return (f"image '{image}' is not in the datastore; use an id from GET "
            "/datastore/?output=all or upload the file.")


def _series_file(app, folder: str, image: str):
    """`GET /datastore/image` of a series read from a folder of DICOM files: the volume the
    server reads, as one NIfTI in its geometry (MONAI Label answered 404 "Image NOT Found", and
    the app's 404 then said the image was not in the datastore). Read through the tasks'
    study cache where there is one: a client that just asked about it fetches it next."""
    from fastapi.responses import FileResponse
    from starlette.background import BackgroundTask

    cache = next((c.studies for c in getattr(app, "configs", {}).values()
                  if isinstance(getattr(c, "studies", None), StudyCache)), None)
    path = write_image(cache.get(folder) if cache is not None else read_study(folder))
    return FileResponse(path, media_type="application/gzip", filename=f"{image}.nii.gz",
                        background=BackgroundTask(os.remove, path))


def _no_such_label(label: str, tag: str) -> str:
    return (f"there is no label '{label}' tagged '{tag}' in the datastore; GET "
            "/datastore/?output=all lists each image's labels and their tags.")


def _name_missing_images() -> None:
    """MONAI Label 0.8.5's `GET /datastore/image` and `GET /datastore/label` answer an id the
    datastore does not hold with "Image NOT Found" / "Label NOT Found", and `PUT
    /datastore/image/info` and `PUT /datastore/label/info` with a 500 (and info that is not a
    JSON object with another). The app wraps the endpoint's module-level `download_image`,
    `download_label`, `update_image_info` and `update_label_info` (looked up at call time) so
    that a 404 names the id and what to send instead, and bad info gets a 400 sentence. Label
    info sent this way cannot say who sent the label, or which PACS SEGs it came from or went
    to (as with `PUT /datastore/label`): those keys are dropped, and with sign-in on MONAI Label
    puts the signed-in user; nor can it replace the label's structures (`label_info`: 400)."""
    from monailabel.endpoints import datastore as endpoint
    from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
    from monailabel.interfaces.utils.app import app_instance

    def make_image(original):
        def download_image(image: str, check_only=False, check_sum=None):
            app = app_instance()
            store = app.datastore()
            # a series folder of the studies folder: no one file to send (a PACS datastore's
            # images are its own, and asking it twice would fetch twice)
            uri = store.get_image_uri(image) if getattr(store, "series_folders", False) else ""
            if uri and os.path.isdir(uri):
                return {} if check_only else _series_file(app, uri, str(image))
            try:
                return original(image, check_only, check_sum)
            except HTTPException as e:
                if e.status_code != 404 or e.detail != "Image NOT Found":
                    raise
                # a PACS series held as a folder (radiographs sharing a series): its reading
                # says why no one file is sent (fetched by the first call, so not fetched twice)
                folder = "" if uri else store.get_image_uri(image)
                if folder and os.path.isdir(folder):
                    return {} if check_only else _series_file(app, folder, str(image))
                raise HTTPException(status_code=404, detail=_no_such_image(
                    str(image), app_instance().datastore())) from None
        return download_image

    def make_label(original):
        def download_label(label: str, tag: str, check_only=False):
            try:
                return original(label, tag, check_only)
            except HTTPException as e:
                if e.status_code != 404 or e.detail != "Label NOT Found":
                    raise
                raise HTTPException(status_code=404, detail=_no_such_label(label, tag)) from None
        return download_label

    def make_image_info(original):
        def update_image_info(image: str, info="{}", user=None):
            _json_object(info, '{"note": "..."}', field="info")
            try:  # without sign-in nobody is known (MONAI Label's stand-in user is "admin")
                return original(image, info, user if settings.MONAI_LABEL_AUTH_ENABLE else None)
            except ImageNotFoundException:
                raise HTTPException(status_code=404, detail=_no_such_image(
                    str(image), app_instance().datastore())) from None
        return update_image_info

    def make_label_info(original):
        def update_label_info(label: str, tag: str, info="{}", user=None):
            body = _json_object(info, '{"note": "..."}', field="info")
            if "label_info" in body:
                raise HTTPException(status_code=400, detail=(
                    "info.label_info (the label's structures, with who sent each) is set by "
                    "sending the label (PUT /datastore/label?tag=final); leave it out here."))
            for key in (*SERVER_KEYS, "claimed_by"):
                body.pop(key, None)
            try:
                return original(label, tag, json.dumps(body),
                                user if settings.MONAI_LABEL_AUTH_ENABLE else None)
            except LabelNotFoundException:
                raise HTTPException(status_code=404, detail=_no_such_label(label, tag)) from None
        return update_label_info

    _patch_once(endpoint, "download_image", make_image)
    _patch_once(endpoint, "download_label", make_label)
    _patch_once(endpoint, "update_image_info", make_image_info)
    _patch_once(endpoint, "update_label_info", make_label_info)


def _no_whole_slide_inference() -> None:
    """MONAI Label's `POST /infer/wsi_v2/{model}` and `/infer/wsi/{model}` tile a pathology
    whole-slide image; Citrus-V does not read those, and MONAI Label 0.8.5 answered 500 when
    no image was named. The app wraps the endpoint's `run_wsi_inference`: 404 with a sentence."""
    from monailabel.endpoints import wsi_infer as endpoint

    def make(original):
        def run_wsi_inference(*args, **kwargs):
            raise HTTPException(status_code=404, detail=(
                "whole-slide (pathology) inference is not offered: Citrus-V answers about CT, MR "
                "and X-ray images; ask with POST /infer/{task}?image=ID."))
        return run_wsi_inference

    _patch_once(endpoint, "run_wsi_inference", make)


def _check_training_options() -> None:
    """MONAI Label 0.8.5 starts any training request and its options fail, if at all, inside
    the run (a bad value gave a raw Python error in `last_run`; an unknown option was silently
    ignored), and a run for a task name it lacks started and failed in the run (200, then
    "ERROR" in `GET /train/`). The app wraps the endpoint's `run_model` so the task name and
    the Citrus-V trainer's options are checked first: 404 or 400 with a sentence, and no run is
    started. A `run_sync` run (`POST /train/...?run_sync=true`, with or without a task name)
    runs in a process of its own like any run, and the request waits for it
    (`_wait_for_training`)."""
    from monailabel.endpoints import train as endpoint
    from monailabel.interfaces.utils.app import app_instance

    def make(original):
        def run_model(model, params=None, run_sync=False, enqueue=False):
            trainers = getattr(app_instance(), "_trainers", {})
            if model and model not in trainers:
                raise HTTPException(status_code=404, detail=_unknown_task(
                    "training task", model, trainers, " (or leave the name out: POST /train/)"))
            trainer = trainers.get(model) if model else None
            defaults = getattr(trainer, "defaults", None)
            if defaults is not None:
                try:
                    check_options(params, defaults)
                except ValueError as e:
                    raise HTTPException(status_code=400, detail=str(e)) from None
            _check_corrections_to_learn_from()
            if not run_sync:
                return original(model, params, run_sync, enqueue)
            task = original(model, params, False, enqueue)  # a 429 while one runs
            return _wait_for_training(task, trainers.get(model) if model else None)
        return run_model

    def make_run(original):
        def run(params=None, run_sync=False):
            trainers = getattr(app_instance(), "_trainers", {})
            for name, trainer in trainers.items():
                defaults = getattr(trainer, "defaults", None)
                if defaults is not None:
                    _check_options_for(name, params, trainers, defaults)
            _check_corrections_to_learn_from()
            started = original(params, False)  # each trainer's run, queued one after another
            if not run_sync:
                return started
            return {name: {**entry, "result": _wait_for_training(entry["result"],
                                                                 trainers.get(name))}
                    for name, entry in started.items()}
        return run

    _patch_once(endpoint, "run_model", make)
    _patch_once(endpoint, "run", make_run)


def _check_options_for(name: str, params, trainers, defaults: dict) -> None:
    """`POST /train/` (no task name) runs every trainer; MONAI Label gives trainer `name` the
    options under `params[name]` and, over them, the top-level ones that name no trainer. A
    bad one is a 400 with its sentence, as for `POST /train/{name}`."""
    try:
        if not isinstance(params, dict):
            check_options(params, defaults)  # None passes; anything else: its sentence
            return
        own = params.get(name, {})
        if not isinstance(own, dict):
            raise ValueError(f"params.{name} must be a JSON object of {name}'s options, e.g. "
                             f"{{\"{name}\": {{\"steps\": 200}}}}, not {own!r}.")
        check_options({**own, **{k: v for k, v in params.items() if k not in trainers}},
                      defaults)
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


def _check_corrections_to_learn_from() -> None:
    """A training run learns from the radiologists' corrections (final labels); with none
    saved it could only fail inside its process (MONAI Label started it, 200, then "ERROR" in
    `GET /train/`). Such a request is a 409 with a sentence, and no run is started. On a PACS
    the run first imports the SEGs other tools stored there (`PacsDatastore.import_pacs_segs`,
    a query of the PACS), so the run itself finds out there."""
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    if getattr(datastore, "import_pacs_segs", None) is not None:
        return
    if not datastore.get_labeled_images():
        raise HTTPException(status_code=409, detail=(
            "There is no correction to learn from yet: save a corrected label first (Submit in "
            "Slicer's Citrus-V module, or PUT /datastore/label?tag=final); no run was started."))


TRAINING_ENDED = ("DONE", "ERROR", "STOPPED")


def _wait_for_training(task: dict, trainer, poll_s: float = 0.2) -> dict:
    """A `run_sync` training request: MONAI Label 0.8.5 ran the fine-tune in the server's own
    process, which then held a second copy of the model beside the one it serves (on a GPU
    serving the 8B, more than a 24 GB card has), left the run out of the task table (so
    another run could start beside it, each deleting at its start the unfinished version
    folders it finds, and `DELETE /train/` could not stop it) and, on the event loop, held
    every other request for the whole run. The run is now started as any run is (`task`:
    MONAI Label's task entry) and the request, on a worker thread, waits for it to end. The answer is the run's record
    (`last_run`: `status` `done`, `rejected`, `failed` or `killed`, and what the run wrote) with
    `task`: the task's `id` and `status` (`DONE`). A run that did not end as `done` or
    `rejected` is not answered 200: one stopped by `DELETE /train/` is a 409, one that failed
    on what the server holds (no corrected structure, the model not installed: the trainer's
    ValueError) a 409 and any other failure a 500, each with a sentence that says why and
    that no version was published; a run that left no record of its own (its process died
    before writing one) is a 500 too."""
    from monailabel.utils.async_tasks.utils import processes

    pid = None
    while task.get("status") not in TRAINING_ENDED:
        process = processes("train").get(task["id"])
        if process is not None:
            pid = process.pid
        time.sleep(poll_s)
    ended = {"id": task["id"], "status": task["status"]}
    unchanged = "no version was published, and the server serves what it served before."
    if task["status"] == "STOPPED":
        raise HTTPException(status_code=409, detail=(
            f"The training run {task['id']} was stopped (DELETE /train/) before it ended; "
            f"{unchanged}"))
    last = trainer.stats()["last_run"] if trainer is not None else {}
    if pid is None or last.get("pid") != pid:
        raise HTTPException(status_code=500, detail=(
            f"The training run {task['id']} ended with {task['status']} and left no record; "
            "GET /train/?all=true shows its output, and the server log has the rest."))
    if last.get("status") == "failed":
        error = last.get("error") or "it wrote no reason"
        on_what_is_held = error.startswith("ValueError: ")
        if on_what_is_held:
            error = error[len("ValueError: "):]
        raise HTTPException(status_code=409 if on_what_is_held else 500, detail=(
            f"The training run {task['id']} failed: {error.rstrip('.')}. "
            f"{unchanged.capitalize()} GET /info/ has the run's record (train_stats)."))
    return {**last, "task": ended}


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _unknown_task(kind: str, name: str, known, alternative: str = "") -> str:
    """The 404 sentence for a task, strategy or method name the server does not offer."""
    if not known:
        return f"{kind} '{name}' is unknown; this server offers none."
    return f"{kind} '{name}' is unknown; use one of {', '.join(sorted(known))}{alternative}."


def _check_batch_and_scoring_requests() -> None:
    """MONAI Label 0.8.5 starts a batch inference (`POST /batch/infer/{model}`) or a scoring
    run (`POST /scoring/{method}`) for any name and any params, and they fail, if at all,
    inside the run: an unknown scoring method answered 200 "SUBMITTED" and then "ERROR" with a
    traceback in `GET /scoring/`. The app wraps the endpoints' `run` and `run_method`: an
    unknown task or method gets a 404 sentence, and a batch's question is checked as one
    infer request checks it where that needs no image (`params.check_question`: a missing
    prompt, a closer look's options sent to another task): 400 with its sentence. No run is
    started then. A batch runs on a thread of this process (`lib.batch`: without `run_sync`
    MONAI Label started a process that loaded the model again; with it, it ran outside the
    task table), and `DELETE /batch/infer` stops it after the slices it is asking; while it
    runs, another batch gets a 429 sentence. A `run_sync` request waits for its batch."""
    from lib import batch
    from lib.params import check_question

    from monailabel.endpoints import batch_infer, scoring
    from monailabel.interfaces.utils.app import app_instance

    def make_batch(original):
        def run(model, images=None, params=None, run_sync=False):
            infers = getattr(app_instance(), "_infers", {})
            if model not in infers:
                raise HTTPException(status_code=404,
                                    detail=_unknown_task("task", model, infers))
            task = getattr(infers[model], "task", None)
            if task:
                check_question(params or {}, task)  # a RequestError: its 400 sentence
            if not run_sync:
                return batch.start(app_instance(), model, images, params)
            return batch.run_and_wait(app_instance(), model, images, params)
        return run

    def make_stop(original):
        def stop():
            run = batch.running()
            return run.stop() if run else original()
        return stop

    def make_scoring(original):
        def run_method(method, params=None, run_sync=False):
            methods = getattr(app_instance(), "_scoring_methods", {})
            if method not in methods:
                raise HTTPException(status_code=404, detail=_unknown_task(
                    "scoring method", method, methods))
            return original(method, params, run_sync)
        return run_method

    _patch_once(batch_infer, "run", make_batch)
    _patch_once(batch_infer, "stop", make_stop)
    _patch_once(scoring, "run_method", make_scoring)


def _run_to_its_end(call, values: dict):
    """Run the coroutine function `call`, which awaits nothing, in this thread (no event loop)."""
    coroutine = call(**values)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError(f"{call.__name__} awaits; it must run on the event loop")


def _run_off_the_event_loop() -> None:
    """MONAI Label 0.8.5's endpoints are `async def` functions that call the app directly, on
    the server's one event loop: while the model answered one question (`POST
    /infer/{model}`), a `run_sync` batch or an active-learning pick (which asks slices), or
    while a correction was merged and sent to the PACS, an upload written or a dataset ZIP
    made, the server took no other request of anyone's: no connection test, image download or
    correction. The endpoints of questions, batches, active learning, the datastore, training
    (a `run_sync` run waits there for its process), sign-in (it waits for the sign-in server,
    up to 30 s), info, logs, model files, scoring and sessions now run on a worker thread; the
    model itself still answers one question at a time (the engine's turns; a slice range
    takes them 8 slices at a time), and the datastore changes its index under its mutex. The
    endpoints await nothing, so each runs to its end on the thread with no event loop. Only in
    the server's process (the training process has no routes)."""
    if "monailabel.app" not in sys.modules:
        return
    from starlette.concurrency import run_in_threadpool

    from monailabel.endpoints import (activelearning, batch_infer, datastore, infer, info,
                                      login, logs, model, scoring, session, train, wsi_infer)

    # the endpoint modules' own routes: FastAPI 0.165 includes a router by reference and
    # builds each included route's handler from `route.endpoint` at its first request
    # (the OHIF viewer's files stay on the loop; the DICOMweb proxy:
    # `_dicomweb_proxy_off_the_event_loop`)
    for module in (infer, batch_infer, activelearning, datastore, info, login, logs, model,
                   scoring, session, train, wsi_infer):
        for route in module.router.routes:
            call = getattr(route, "endpoint", None)
            if (not inspect.iscoroutinefunction(call) or call.__module__ != module.__name__
                    or getattr(call, "_citrusv_threaded", False)):
                continue

            @functools.wraps(call)  # the same signature: the same parameters are parsed
            async def on_a_thread(_call=call, **values):
                return await run_in_threadpool(_run_to_its_end, _call, values)
            on_a_thread._citrusv_threaded = True
            route.endpoint = route.dependant.call = on_a_thread


# what the proxy does not pass on from the PACS's answer (Starlette sets the length; the body is
# passed on decoded)
_NOT_PASSED_ON = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                  "proxy-authenticate", "proxy-authorization", "content-length",
                  "content-encoding"}


def _ask_pacs_for_the_viewer(method: str, op: str, path: str, query: str,
                             headers: dict[str, str], body: bytes | None):
    """One DICOMweb request of `/proxy/dicom/{op}/{path}` passed on to the PACS (blocking)."""
    import requests
    from starlette.responses import Response

    pacs = settings.MONAI_LABEL_STUDIES.rstrip("/")
    prefixes = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                "stow": settings.MONAI_LABEL_STOW_PREFIX}
    # as MONAI Label: some OHIF versions ask for metadata with QIDO
    prefix = prefixes["wado" if op == "qido" and path.endswith("metadata") else op] if op else ""
    url = "/".join(part.strip("/") for part in (pacs, prefix or "", path) if part)
    user, password = (settings.MONAI_LABEL_DICOMWEB_USERNAME,
                      settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    wait_s = settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT
    try:
        r = requests.request(method, url + (f"?{query}" if query else ""), headers=headers,
                             data=body, auth=(user, password) if user and password else None,
                             timeout=(wait_s, wait_s))
    except requests.Timeout:
        raise HTTPException(status_code=504, detail=(
            f"The PACS ({pacs}) did not answer the viewer's request within {wait_s:g} s "
            "(MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT); check that it is running, then try "
            "again.")) from None
    except requests.RequestException as e:
        raise HTTPException(status_code=503, detail=(
            f"The PACS ({pacs}) could not be asked for the viewer ({type(e).__name__}); check "
            "that it is running and reachable from this server, then try again.")) from None
    return Response(content=r.content, status_code=r.status_code, headers={
        k: v for k, v in r.headers.items() if k.lower() not in _NOT_PASSED_ON})


def _notice_clients_leaving() -> None:
    """Wrap the server's ASGI app (`lib.leaving.NoticeLeaving`) so that a question over a
    slice range stops before its next slices once its client has gone. Starlette built the
    app's middleware stack for its start (the lifespan, where this app is made): it is wrapped
    as built, or as it will be built. Only in the server's process."""
    if "monailabel.app" not in sys.modules:
        return
    from lib.leaving import NoticeLeaving

    server = sys.modules["monailabel.app"].app
    stack = server.middleware_stack
    if isinstance(stack, NoticeLeaving):
        return
    if stack is None:
        build = server.build_middleware_stack
        server.build_middleware_stack = lambda: NoticeLeaving(build())
    else:
        server.middleware_stack = NoticeLeaving(stack)


def _dicomweb_proxy_off_the_event_loop() -> None:
    """`/proxy/dicom/{wado,qido,stow}/...`, MONAI Label's DICOMweb proxy to the PACS (the OHIF
    viewer's way to it): MONAI Label 0.8.5 asked the PACS with `requests` on the server's one
    event loop and with no time limit, so while the PACS answered (a series' images take
    seconds) the server took no one else's request, and a PACS that hung held the whole server;
    it dropped the query string (a QIDO search's filters: every series came back), passed the
    client's own headers to the PACS on a POST (its sign-in token among them), and answered a
    PACS it could not reach, or any proxy request on a server of a studies folder, with 500
    and a traceback. Now each request is passed on from a worker thread with its query string
    and only its `Accept` and `Content-Type` headers, waits for the PACS at most
    `MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT` seconds (MONAI Label's setting, 30 s, which it did not
    use) to connect and between bytes (then 504), and a PACS it cannot reach is a 503; on a
    studies folder there is no PACS: 404. A Google Healthcare URL keeps MONAI Label's own proxy
    (its token comes from Google's library)."""
    if "monailabel.app" not in sys.modules:
        return
    from starlette.concurrency import run_in_threadpool

    from monailabel.endpoints import proxy

    def make(original):
        async def proxy_dicom(request, op: str, path: str):
            studies = settings.MONAI_LABEL_STUDIES
            if "googleapis.com" in studies:
                return await original(request, op, path)
            if not studies.startswith(("http://", "https://")):
                raise HTTPException(status_code=404, detail=(
                    "This server's studies are a folder, not a PACS: it has no DICOMweb to "
                    "pass requests on to (start it with --studies the PACS's DICOMweb URL)."))
            body = await request.body() if request.method == "POST" else None
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("accept", "content-type")}
            return await run_in_threadpool(_ask_pacs_for_the_viewer, request.method, op, path,
                                           request.url.query, headers, body)
        return proxy_dicom

    _patch_once(proxy, "proxy_dicom", make)


def _send_dataset_and_delete_it() -> None:
    """`GET /datastore/dataset`: MONAI Label 0.8.5 left each downloaded ZIP in the temporary
    folder (a copy of every labelled image per download). The app wraps the endpoint's
    `download_dataset`: the ZIP (`CorrectionsDatastore.get_dataset_archive`) is deleted once
    sent, and a disk that fills while it is written answers 507 with a sentence."""
    from fastapi.responses import FileResponse
    from starlette.background import BackgroundTask

    from monailabel.endpoints import datastore as endpoint
    from monailabel.interfaces.utils.app import app_instance

    def make(original):
        def download_dataset(limit_cases=None):
            path = app_instance().datastore().get_dataset_archive(limit_cases)
            return FileResponse(path, media_type="application/zip", filename="dataset.zip",
                                background=BackgroundTask(os.unlink, path))
        return _storage_errors_as_507("writing the dataset ZIP", ": ask IT to free space on "
                                      "the server, then ask again.", image_arg=1)(download_dataset)

    _patch_once(endpoint, "download_dataset", make)


def _gpu_info_without_nvidia_smi() -> None:
    """`GET /logs/gpu` runs nvidia-smi, and on a server without it (no NVIDIA driver: a CPU
    server) MONAI Label 0.8.5 answered 500 (FileNotFoundError). The endpoint's module is given a
    `subprocess` whose `run` answers 404 with a sentence then; all else is the real module."""
    import subprocess
    import types

    from monailabel.endpoints import logs

    def run(args, **kwargs):
        try:
            return subprocess.run(args, **kwargs)
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail=(
                "nvidia-smi is not installed on this server, so it cannot report GPUs; "
                "GET /info/ says where the model runs (citrusv.device).")) from None

    if isinstance(logs.subprocess, types.ModuleType):  # once per process
        shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess)
                                        if not k.startswith("__")})
        shim.run = run
        logs.subprocess = shim


MAX_SENDER = 128  # characters of a claimed sender's name


def _claimed_sender(body: dict) -> str | None:
    """The name a client gives for who sent a correction (`claimed_by`, the Slicer user's name)
    when nobody signs in: trimmed, 1 to MAX_SENDER printable characters, else a 400 sentence."""
    claim = body.get("claimed_by")
    if claim is None:
        return None
    name = claim.strip() if isinstance(claim, str) else ""
    if not name or len(name) > MAX_SENDER or not name.isprintable():
        raise HTTPException(status_code=400, detail=(
            f"params.claimed_by must be the sender's name as text, 1 to {MAX_SENDER} printable "
            'characters (e.g. "Dr. A. Lee"), or left out.'))
    return name


def _record_who_corrected() -> None:
    """MONAI Label 0.8.5's `PUT /datastore/label` knows the signed-in user but does not hand it
    to the datastore. The app wraps the endpoint's module-level `save_label` (looked up at call
    time): with authentication on, it puts that user into the label's params as `user`, over
    anything the client wrote there, so each corrected structure records who sent it. Without
    sign-in nobody is known, and the name the client gives (`claimed_by`) is kept under that
    key, never as `user`; with sign-in a claim is dropped. Params that are not a JSON object get
    a 400 sentence (MONAI Label answered 500)."""

    from monailabel.endpoints import datastore as endpoint

    def make(original):
        def save_label(background_tasks, image, params="{}", tag="final", label=None, user=None):
            body = _json_object(params, '{"label_info": [{"name": "liver", "idx": 1}], '
                                        '"prompt": "..."}')
            signed_in = settings.MONAI_LABEL_AUTH_ENABLE
            claim = None if signed_in else _claimed_sender(body)
            # only the server says who sent a correction, and which PACS SEGs a label came
            # from or went to
            for entry in [body, *(e for e in body.get("label_info") or [] if isinstance(e, dict))]:
                for key in (*SERVER_KEYS, "claimed_by"):
                    entry.pop(key, None)
            if signed_in and user:
                body["user"] = user
            elif claim:
                body["claimed_by"] = claim
            return original(background_tasks, image, json.dumps(body), tag, label, user)
        return save_label

    _patch_once(endpoint, "save_label", make)


# signature algorithms accepted for access tokens: the identity provider's public-key ones
# (Keycloak signs RS256 by default); never "none" or the shared-secret HS*, which a public key
# must not verify
TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def _check_tokens_with_pyjwt2() -> None:
    """MONAI Label 0.8.5 checks access tokens with `jwt.decode(token, key, options=...)` and no
    `algorithms`, which PyJWT 2 (what its unpinned `pyjwt` requirement installs) refuses, so
    with authentication on every token was answered 401. Its auth module gets a `jwt` whose
    `decode` names the algorithms; everything else (key, roles, expiry) stays MONAI Label's."""
    import jwt

    from monailabel.endpoints.user import auth

    class _Jwt:
        def __getattr__(self, name):
            return getattr(jwt, name)

        @staticmethod
        def decode(token, key=None, options=None, **kw):
            kw.setdefault("algorithms", TOKEN_ALGORITHMS)
            return jwt.decode(token, key, options=options, **kw)

    _patch_once(auth, "jwt", lambda original: _Jwt())


class SignInServerError(HTTPException):
    """503: the sign-in server (Keycloak, `MONAI_LABEL_AUTH_REALM_URI`) did not answer as one."""

    def __init__(self, what: str, error: BaseException | str) -> None:
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(status_code=503, detail=(
            f"The sign-in server ({settings.MONAI_LABEL_AUTH_REALM_URI}) could not be asked "
            f"{what} ({why}); ask IT to check it (MONAI_LABEL_AUTH_REALM_URI), then try again."))


class SignedIn(BaseModel):
    """What `POST /auth/token` and `POST /auth/token/refresh` answer: MONAI Label's `Token`
    (`access_token`, `token_type`; both null with sign-in off) and, from the sign-in server's
    answer, how long the token lasts and the refresh token that gets the next one, so that a
    client stays signed in without keeping the password. Keycloak's other keys (`id_token`,
    `session_state`, `scope`, ...) are not passed on."""
    access_token: str | None = None
    token_type: str | None = None
    expires_in: int | None = None
    refresh_token: str | None = None
    refresh_expires_in: int | None = None


SIGNED_OUT = ("Your sign-in has run out or was ended: sign in again with your user name and "
              "password")


def _answer_sign_in_failures_with_sentences() -> None:
    """With sign-in on (`MONAI_LABEL_AUTH_ENABLE`), MONAI Label 0.8.5 answered a wrong user
    name or password at `POST /auth/token` with 500 and a traceback (Keycloak's 401 raised as
    it came), and a sign-in server that was down or answered no JSON with 500 to every request
    that carried a token (the realm's key is fetched at the first one); a JSON error answered
    where the OpenID configuration should be was kept for good, so sign-in failed until a
    restart.
    Now a refused sign-in is
    a 401 with a sentence and Keycloak's own words, and a sign-in server that cannot be asked is
    a 503 that names it (`SignInServerError`); a key fetched once is kept, as before.
    MONAI Label 0.8.5 answered a sign-in with the access token alone, so a client had to keep
    the password to sign in again when the token ran out (Keycloak's default: 5 minutes).
    The answer now carries the refresh token too (`SignedIn`), and `POST /auth/token/refresh`
    (form field `refresh_token`) gets a new token with it (Keycloak's refresh grant); a refresh
    token that ran out or whose session was ended is a 401 that says to sign in again."""
    import requests

    from monailabel.endpoints import login
    from monailabel.endpoints.user import auth

    def make_open_id_configuration(original):
        found = {}  # MONAI Label cached any JSON answer, also an error, for good

        def open_id_configuration(realm_uri):
            if realm_uri not in found:
                try:
                    r = requests.get(f"{realm_uri}/.well-known/openid-configuration",
                                     timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
                    r.raise_for_status()
                    config = r.json()
                except (requests.RequestException, ValueError) as e:
                    raise SignInServerError("for its token address", e) from None
                if not isinstance(config, dict) or not config.get("token_endpoint"):
                    raise SignInServerError("for its token address",
                                            "its OpenID configuration names no token_endpoint")
                found[realm_uri] = config
            return found[realm_uri]
        return open_id_configuration

    class _SignIn:
        def __getattr__(self, name):
            return getattr(requests, name)

        @staticmethod
        def post(url, **kwargs):
            try:
                r = requests.post(url, **kwargs)
            except requests.RequestException as e:
                raise SignInServerError("to sign in", e) from None
            if r.status_code in (400, 401):  # Keycloak: "invalid_grant", "Invalid user credentials"
                try:
                    body = r.json()
                    said = body.get("error_description") or body.get("error")
                except (ValueError, AttributeError):  # not JSON, or not an object
                    said = None
                refreshing = (kwargs.get("data") or {}).get("grant_type") == "refresh_token"
                refused = (SIGNED_OUT if refreshing else "Sign-in refused: the user name or "
                           "password is wrong, or the account may not sign in this way")
                raise HTTPException(status_code=401, detail=refused + (
                    f" (the sign-in server said: {said})." if said else "."))
            if r.status_code >= 400:
                raise SignInServerError("to sign in", f"it answered {r.status_code}")
            return r

    def make_public_key(original):
        def get_public_key(realm_uri):
            try:
                return original(realm_uri)
            except (requests.RequestException, ValueError, KeyError) as e:
                raise SignInServerError("for its key, so no token can be checked", e) from None
        return get_public_key

    _patch_once(auth, "open_id_configuration", make_open_id_configuration)
    _patch_once(login, "requests", lambda original: _SignIn())
    _patch_once(auth, "get_public_key", make_public_key)

    def refresh_sign_in(refresh_token: str = Form("")) -> dict:
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return {"access_token": None, "token_type": None}
        if not refresh_token.strip():
            raise HTTPException(status_code=400, detail=(
                "Send the form field refresh_token: the one the sign-in (POST /auth/token) or "
                "the last refresh answered with."))
        return login.requests.post(
            auth.token_uri(), headers={"Content-Type": "application/x-www-form-urlencoded"},
            data={"client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID,
                  "grant_type": "refresh_token", "refresh_token": refresh_token.strip()},
            timeout=30).json()

    # the routes are read at their first request (FastAPI 0.165 includes a router by
    # reference), so the answer's model and the new route count from the first sign-in
    for route in login.router.routes:
        if getattr(route, "path", "") == "/auth/token":
            route.response_model = SignedIn
    if not any(getattr(r, "path", "") == "/auth/token/refresh" for r in login.router.routes):
        login.router.add_api_route(
            "/token/refresh", refresh_sign_in, methods=["POST"], response_model=SignedIn,
            summary="Get a new access token with the refresh token of a sign-in")


def _stop_for_setting(e: ConfError) -> None:
    """A `--conf` setting the server cannot start with: its sentence alone in the log (MONAI
    Label and uvicorn would print it under a traceback) and exit status EXIT_CONF (78), on
    which the systemd unit does not restart (`RestartPreventExitStatus`)."""
    logger.error("Citrus-V cannot start: %s", e)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CONF)


class CitrusVApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        try:
            self._init(app_dir, studies, conf)
        except ConfError as e:
            _stop_for_setting(e)

    def _init(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        _answer_missing_image_with_400()
        _name_missing_images()
        _no_whole_slide_inference()
        _record_who_corrected()
        _check_training_options()
        _check_batch_and_scoring_requests()
        _run_off_the_event_loop()
        _dicomweb_proxy_off_the_event_loop()
        _notice_clients_leaving()
        _send_dataset_and_delete_it()
        _gpu_info_without_nvidia_smi()
        _answer_full_disk_with_507()  # after the wrappers above: it wraps them too
        _receive_uploads_with_507()
        _check_tokens_with_pyjwt2()
        _answer_sign_in_failures_with_sentences()
        self.model_dir = resolve_model_dir(app_dir, conf.get("model_dir"))

        self.configs: dict[str, TaskConfig] = {}
        for path in sorted(get_class_names(lib.configs, "TaskConfig")):
            module, cls = path.rsplit(".", 1)
            name = module.split(".")[-1].lower()
            config: TaskConfig = getattr(importlib.import_module(module), cls)()
            config.init(name, self.model_dir, conf, None)
            self.configs[name] = config
            logger.info("+++ Adding config: %s => %s", name, path)

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Citrus-V",
            description="Citrus-V: segment, detect, report and take a closer look, by prompt",
            version=monailabel.__version__,
        )

    # -- discovery -------------------------------------------------------------------------
    def _collect(self, method: str) -> dict[str, Any]:
        tasks: dict[str, Any] = {}
        for name, config in self.configs.items():
            found = getattr(config, method)()
            if found is None:
                continue
            tasks.update(found if isinstance(found, dict) else {name: found})
        return tasks

    def init_infers(self) -> dict[str, InferTask]:
        return self._collect("infer")

    def init_trainers(self) -> dict[str, TrainTask]:
        return self._collect("trainer")

    def init_strategies(self) -> dict[str, Strategy]:
        return self._collect("strategy")

    def init_scoring_methods(self) -> dict:
        return {}

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # DICOMweb: see _init_dicomweb_datastore
        extensions = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *EXTENSIONS]))
        store = CorrectionsDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        for uid, n in store.loose_series().items():
            note = (f"{n} DICOM files directly in the studies folder are slices of one series "
                    f"({uid}): each is served as an image of its own; move them into a folder of "
                    "their own (<studies>/<name>/) to serve them as one volume, named <name>.")
            store.start_notes.append(note)
            logger.warning("%s (in %s)", note, self.studies)
        for note in store.below_notes():  # as the first refresh found them
            (logger.info if " served as " in note else logger.warning)("%s (in %s)", note,
                                                                      self.studies)
        return store

    def _init_dicomweb_datastore(self) -> Datastore:
        """A PACS over DICOMweb (Orthanc, dcm4chee, ...): MONAI Label's client settings
        (MONAI_LABEL_DICOMWEB_USERNAME/PASSWORD, QIDO/WADO/STOW prefixes, cache path), our
        datastore (`lib.datastore.PacsDatastore`: corrections kept locally first)."""
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=self.studies, session=session,
                                 qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        # dicomweb-client retries 5 times over ~30 s; a radiologist waits on each of these
        # calls, so give up after ~1.5 s (the cache and the local corrections carry on)
        client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        # MONAI Label's default filter lists CT series only; Citrus-V also reads X-ray and MR,
        # so that default becomes "every image series" (any other filter is used as given)
        search = settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
        if search == MONAI_LABEL_DEFAULT_SEARCH:
            search = {}
        datastore = PacsDatastore(client=client, search_filter=search,
                                  cache_path=cache or None,
                                  fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                                  convert_to_nifti=True)
        datastore.cache_limit_bytes = pacs_cache_bytes(self.conf.get("pacs_cache_gb"))
        return datastore

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label downloads dcmqi from GitHub here (for DICOM SEG); a hospital server has
        no such access and pydicom-seg writes the SEG (`PacsDatastore`), so nothing is fetched."""

    # -- requests --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        meta = super().info()
        for name, config in self.configs.items():
            model = getattr(config, "model", None)
            if model is not None:
                meta[name] = model.info()
        return meta

    def infer(self, request: dict, datastore=None) -> dict:
        task = request.get("model")
        if task not in self._infers:
            raise RequestError(_unknown_task("task", task, self._infers), status_code=404)
        image = request.get("image")
        if isinstance(image, str):
            if os.path.exists(image):
                request = {**request, "image_id": "upload"}
            elif not (store := datastore or self.datastore()).get_image_uri(image):
                raise RequestError(_no_such_image(image, store), status_code=404)
            else:
                request = {**request, "image_id": image}
        return super().infer(request, datastore)

    def batch_infer(self, request: dict, datastore=None, run=None) -> dict:
        """`POST /batch/infer/{model}`: the same question asked about each image (params as
        for one infer request; `images` all, labeled or unlabeled), each answer's label map
        saved under `label_tag` (MONAI Label's default "original", never the radiologists'
        "final"). MONAI Label 0.8.5 hands the images out to the CUDA devices and on a server
        with none divided by zero (500); there the model's own device answers. An image whose
        request is refused (a slice it lacks, a 2D image asked over a range) gets `{"error":
        sentence}` in the result, and the others are asked; MONAI Label stopped the batch there.
        `run`: the `lib.batch.BatchRun` of the batch (None: called directly, as MONAI Label's
        own batch process would), which gets a line per image and is checked for a stop
        before each."""
        request = dict(request)
        if request.get("multi_gpu", True) and not _cuda_devices():
            request.update(multi_gpu=False, device="cpu")

        def infer_one(one: dict, store) -> dict:
            image = one.get("image")
            if run:
                run.check(image)
            try:
                out = self.infer(one, store)
            except HTTPException as e:
                said = f"{image}: not asked: {e.detail}"
                if run:
                    run.note(said)  # logged there
                else:
                    logger.warning("Batch inference: %s", said)
                return {"error": e.detail}
            if run:
                run.answer(image, one.get("label_tag"))
            return out

        return self._batch_infer(request, datastore or self.datastore(), infer_one)

    def next_sample(self, request: dict) -> dict:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise RequestError(_unknown_task("strategy", strategy, self._strategies),
                               status_code=404)
        return super().next_sample(request)
