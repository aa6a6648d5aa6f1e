"""The one Citrus-V engine of this process: loaded lazily, shared by every task, versioned.

`model_dir` holds the released checkpoint; fine-tuning writes `model_dir/versions/N` (what it
trained, saved on top of `model_dir`; renamed into place atomically), and the newest one is
served without a restart.
An admin can withdraw a version (`monailabel_app/versions.py withdraw N`): a `withdrawn.json`
mark in its folder, so the server goes back to the newest version that is not withdrawn on its
next request, and the next fine-tuning run starts from that one. Nothing is deleted, unless
the admin prunes old versions (`versions.py prune --keep N`, or `--conf keep_versions N` after
each published run): a pruned version loses its weights and keeps its record.
MONAI Label re-imports the app in its training subprocess: nothing here loads weights until a
task actually asks for the engine, so that import stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ModelNotInstalled

logger = logging.getLogger(__name__)

NOT_INSTALLED = "model not installed yet"
VERSION_DIR = re.compile(r"^\d+$")
TRAIN_STATS = "train_stats.json"
LAST_RUN = "last_run.json"
WITHDRAWN = "withdrawn.json"
PRUNED = "pruned.json"
KEPT_WHEN_PRUNED = (TRAIN_STATS, WITHDRAWN, PRUNED)
DEFAULT_MODEL_DIR = "models/nano"


def resolve_model_dir(app_dir: str | Path, value: str | None) -> str:
    """`--conf model_dir`: absolute, or relative to the working dir, else to the repository."""
    repo = Path(app_dir).resolve().parent
    path = Path(value or DEFAULT_MODEL_DIR).expanduser()
    if path.is_absolute():
        return str(path)
    if value and (Path.cwd() / path).exists():
        return str((Path.cwd() / path).resolve())
    return str((repo / path).resolve())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path` and rename it over: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class SharedModel:
    """Checkpoint directory + versions + the loaded engine (one per process)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | None = None,
                 ask_again: bool = True) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.device = device
        self.dtype = dtype
        self.ask_again = ask_again  # the engine's setting (--conf ask_again)
        self._lock = threading.Lock()
        self._engine = None
        self._loaded: tuple[str, Path] | None = None  # (version name, path)
        self._load_error: str | None = None
        # versions that would not load, with their config.json's mtime then: not retried
        # unless that file changes (a version folder removed and published again)
        self._failed: dict[str, int | None] = {}

    # -- versions --------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.model_dir / "versions"

    def version_numbers(self) -> list[int]:
        try:
            names = os.listdir(self.versions_dir)
        except OSError:
            return []
        return sorted(int(n) for n in names if VERSION_DIR.match(n) and (self.versions_dir / n).is_dir())

    def next_version(self) -> int:
        numbers = self.version_numbers()
        return (numbers[-1] + 1) if numbers else 1

    def _mark(self, version: str, name: str, damaged: dict) -> dict | None:
        """A mark file in a version's folder, or None; `damaged` when it cannot be read (it
        still counts)."""
        if not VERSION_DIR.match(str(version)):
            return None
        mark = self.versions_dir / str(version) / name
        if not mark.is_file():
            return None
        return read_json(mark) or damaged

    def withdrawn(self, version: str) -> dict | None:
        """The admin's withdrawal mark of `version` ({"at", "reason"}), or None."""
        return self._mark(version, WITHDRAWN, {"at": None, "reason": None})

    def pruned(self, version: str) -> dict | None:
        """The mark of a version whose weights were pruned ({"at", "by", "freed_bytes"}), or None."""
        return self._mark(version, PRUNED, {"at": None})

    def _stamp(self, version: str) -> int | None:
        try:
            return (self.versions_dir / version / "config.json").stat().st_mtime_ns
        except OSError:
            return None

    def failed(self, version: str) -> bool:
        return version in self._failed and self._failed[version] == self._stamp(version)

    def serving(self) -> tuple[str, Path]:
        """(version name, checkpoint dir) that infer tasks should use right now: the newest
        version that loads and is neither withdrawn nor pruned, else the released checkpoint
        ("base")."""
        numbers = [n for n in self.version_numbers() if not self.failed(str(n))
                   and self.withdrawn(str(n)) is None and self.pruned(str(n)) is None]
        if numbers:
            return str(numbers[-1]), self.versions_dir / str(numbers[-1])
        return "base", self.model_dir

    def installed(self) -> bool:
        _, path = self.serving()
        return (path / "config.json").is_file()

    def status(self) -> str:
        if not self.installed():
            return NOT_INSTALLED
        if self._engine is not None:
            return "loaded"
        if self._load_error:
            return f"failed to load: {self._load_error}"
        return "ready (loads on first request)"

    def example_prompts(self, task: str) -> list[str]:
        """The questions `model_dir` names for `task` (its example_prompts.json; [] when it
        names none, or when the file is malformed, which is logged)."""
        from citrusv.checkpoint import read_example_prompts

        return self._model_file(read_example_prompts, {}, "No example questions").get(task, [])

    def intended_use(self) -> str | None:
        """What `model_dir` says the model may be used for (its intended_use.txt; None when it
        says nothing, or when the file is malformed, which is logged)."""
        from citrusv.checkpoint import read_intended_use

        return self._model_file(read_intended_use, None, "No intended use")

    def box_source(self) -> str | None:
        """Where the served model's boxes come from: "text" (as the model wrote them) or "mask"
        (its own mask's box; docs/api.md). The loaded engine's setting, else the serving
        checkpoint's config.json; None when there is no readable config."""
        engine = self._serving_engine()
        if engine is not None:
            return engine.box_source
        value = self._serving_config("box_source", "text")
        return None if value is None else str(value)

    def structures(self) -> list[str] | None:
        """What the served model was taught to find, by name (`CitrusVConfig.structures`;
        nano: its ten structures); [] when its config.json lists none (the released model);
        None when there is no readable config."""
        return self._config_list("structures")

    def languages(self) -> list[str] | None:
        """The languages the served model was taught questions in, as ISO 639-1 codes
        (`CitrusVConfig.languages`; nano: ["en"]); [] when its config.json lists none (the
        released model); None when there is no readable config."""
        return self._config_list("languages")

    def _config_list(self, key: str) -> list[str] | None:
        """A list setting of the served model: the loaded engine's, else the serving
        checkpoint's config.json's ([] when absent); None when there is no readable config."""
        engine = self._serving_engine()
        if engine is not None:
            return list(getattr(engine.config, key))
        value = self._serving_config(key, [])
        return [str(x) for x in value] if isinstance(value, list) else None

    def _serving_engine(self):
        """The loaded engine when it is of the serving checkpoint, else None."""
        engine, loaded = self._engine, self._loaded
        return engine if engine is not None and loaded == self.serving() else None

    def _serving_config(self, key: str, default):
        """`key` of the serving checkpoint's config.json (`default` when absent); None when
        there is no readable config."""
        _, path = self.serving()
        try:
            return json.loads((path / "config.json").read_text()).get(key, default)
        except (OSError, ValueError, AttributeError):
            return None

    def _model_file(self, read, default, what: str):
        """`read(model_dir)`, read on each call (an admin's edit shows without a restart); a
        malformed file is logged as `what` and gives `default`."""
        from citrusv.errors import CheckpointError

        try:
            return read(self.model_dir)
        except CheckpointError as e:
            logger.warning("%s: %s", what, e)
            return default

    def not_installed_sentence(self) -> str:
        return (f"{NOT_INSTALLED}: no Citrus-V checkpoint in {self.model_dir}; install models/nano "
                "or start the server with --conf model_dir DIR.")

    def versions_info(self) -> list[dict]:
        out = []
        for n in self.version_numbers():
            stats = read_json(self.versions_dir / str(n) / TRAIN_STATS)
            out.append({"version": str(n), **{k: stats.get(k) for k in
                        ("created", "base_version", "train_loss", "val_dice", "val_dice_before",
                         "samples")}, "withdrawn": self.withdrawn(str(n)),
                        "pruned": self.pruned(str(n))})
        return out

    def last_run(self) -> dict:
        return read_json(self.versions_dir / LAST_RUN)

    def info(self) -> dict:
        name, path = self.serving()
        return {
            "status": self.status(),
            "model_dir": str(self.model_dir),
            "serving_version": name if self.installed() else None,
            "intended_use": self.intended_use(),
            "box_source": self.box_source(),
            "structures": self.structures(),
            "languages": self.languages(),
            "ask_again": self.ask_again,
            "device": self.device,
            "dtype": self.dtype or "auto",
            "versions": self.versions_info(),
            "skipped_versions": sorted((v for v in self._failed if self.failed(v)), key=int),
            "load_error": self._load_error,
            "last_training": self.last_run(),
        }

    # -- engine ----------------------------------------------------------------------------
    def load_engine(self, path: Path, device: str | None = None):
        """A fresh engine from `path` (used by the trainer, which must not touch the shared one),
        on `device` (default the server's) in the server's dtype."""
        try:
            from citrusv import Engine
            from citrusv.engine import resolve_dtype
        except ImportError as e:
            raise ModelNotInstalled(f"{NOT_INSTALLED}: the citrusv engine is not importable ({e}).")
        return Engine.load(str(path), device=device or self.device,
                           dtype=resolve_dtype(self.dtype, self.device), ask_again=self.ask_again)

    def engine(self):
        """(engine, version name); loads on first use and again when a newer version lands.

        A version that fails to load is skipped for the life of the process, so a broken
        training output never takes the serving model down.
        """
        while True:
            version, path = self.serving()
            if not (path / "config.json").is_file():
                raise ModelNotInstalled(self.not_installed_sentence())
            with self._lock:
                if self._engine is not None and self._loaded == (version, path):
                    return self._engine, version
                logger.info("Loading Citrus-V engine version %s from %s", version, path)
                try:
                    engine = self.load_engine(path)
                except ModelNotInstalled:
                    raise
                except Exception as e:
                    logger.exception("Citrus-V version %s failed to load", version)
                    self._load_error = f"version {version}: {e}"
                    if version == "base":
                        raise ModelNotInstalled(f"The model in {path} failed to load ({e}).") from e
                    self._failed[version] = self._stamp(version)
                    continue
                self._engine, self._loaded = engine, (version, path)
                return engine, version


def set_withdrawn(model_dir: str | Path, version: str, reason: str | None) -> str:
    """Withdraw (`reason` given, may be "") or restore (`reason` None) fine-tuned `version`.

    Returns what the server serves afterwards; raises ValueError with a sentence for a version
    that is not there. The mark is one file written atomically; the checkpoint is untouched.
    """
    model = SharedModel(model_dir)
    version = str(version).strip()
    if version == "base":
        raise ValueError("The released checkpoint ('base') cannot be withdrawn: it is what the "
                         "server falls back to. Point --conf model_dir at another checkpoint "
                         "instead.")
    if not VERSION_DIR.match(version) or int(version) not in model.version_numbers():
        have = ", ".join(str(n) for n in model.version_numbers()) or "none"
        raise ValueError(f"There is no fine-tuned version {version!r} in {model.versions_dir} "
                         f"(versions there: {have}).")
    gone = model.pruned(version)
    if reason is None and gone is not None:
        raise ValueError(f"Version {version} cannot be served again: its weights were pruned "
                         f"({gone.get('at') or 'at an unknown time'}); only its record is left.")
    mark = model.versions_dir / version / WITHDRAWN
    if reason is None:
        mark.unlink(missing_ok=True)
    else:
        write_json_atomic(mark, {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": reason})
    return model.serving()[0]


def prune_versions(model_dir: str | Path, keep: int, by: str) -> list[dict]:
    """Delete the weights of every fine-tuned version but the `keep` newest that are not
    withdrawn (the one served is among them, unless it fails to load); withdrawn versions are
    pruned too. Each pruned folder keeps its training record (and withdrawal mark) and gets a
    `pruned.json` mark, written before anything is deleted, so a server never loads half a
    version; numbers are never reused. Returns [{"version", "freed_bytes"}] of this call."""
    if int(keep) < 1:
        raise ValueError(f"keep must be at least 1 (got {keep}): the version served is kept. "
                         "To stop serving every fine-tuned version, withdraw them instead.")
    model = SharedModel(model_dir)
    alive = [str(n) for n in model.version_numbers() if model.pruned(str(n)) is None]
    kept = [v for v in alive if model.withdrawn(v) is None][-int(keep):]
    done = []
    for v in alive:
        if v in kept:
            continue
        folder = model.versions_dir / v
        doomed = [p for p in folder.iterdir() if p.name not in KEPT_WHEN_PRUNED]
        freed = sum(f.stat().st_size for p in doomed
                    for f in ([p] if not p.is_dir() else p.rglob("*")) if f.is_file())
        write_json_atomic(folder / PRUNED, {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "by": by,
                                            "freed_bytes": freed})
        for p in doomed:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        logger.info("Pruned Citrus-V version %s (%s): %.1f MB freed", v, by, freed / 1e6)
        done.append({"version": v, "freed_bytes": freed})
    return done


_shared: dict[tuple, SharedModel] = {}
_shared_lock = threading.Lock()


def shared_model(model_dir: str | Path, device: str = "cpu", dtype: str | None = None,
                 ask_again: bool = True) -> SharedModel:
    """The process-wide SharedModel for these settings (all tasks get the same object)."""
    key = (str(Path(model_dir).expanduser().resolve()), device, dtype, ask_again)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SharedModel(*key)
        return _shared[key]
