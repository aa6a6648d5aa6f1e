"""The one Citrus-V engine of this process: loaded lazily, shared by every task, versioned.

`model_dir` holds the released checkpoint; fine-tuning writes `model_dir/versions/N` (complete
checkpoints, renamed into place atomically), and the newest one is served without a restart.
MONAI Label re-imports the app in its training subprocess: nothing here loads weights until a
task actually asks for the engine, so that import stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from .errors import ModelNotInstalled

logger = logging.getLogger(__name__)

NOT_INSTALLED = "model not installed yet"
VERSION_DIR = re.compile(r"^\d+$")
TRAIN_STATS = "train_stats.json"
LAST_RUN = "last_run.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path` and rename it over: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class SharedModel:
    """Checkpoint directory + versions + the loaded engine (one per process)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._engine = None
        self._loaded: tuple[str, Path] | None = None  # (version name, path)
        self._load_error: str | None = None
        self._failed: set[str] = set()  # versions that would not load: never retried

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

    def serving(self) -> tuple[str, Path]:
        """(version name, checkpoint dir) that infer tasks should use right now."""
        numbers = [n for n in self.version_numbers() if str(n) not in self._failed]
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

    def not_installed_sentence(self) -> str:
        return (f"{NOT_INSTALLED}: no Citrus-V checkpoint in {self.model_dir}; install models/nano "
                "or start the server with --conf model_dir DIR.")

    def versions_info(self) -> list[dict]:
        out = []
        for n in self.version_numbers():
            stats = read_json(self.versions_dir / str(n) / TRAIN_STATS)
            out.append({"version": str(n), **{k: stats.get(k) for k in
                        ("created", "train_loss", "val_dice", "val_dice_before", "samples")}})
        return out

    def last_run(self) -> dict:
        return read_json(self.versions_dir / LAST_RUN)

    def info(self) -> dict:
        name, path = self.serving()
        return {
            "status": self.status(),
            "model_dir": str(self.model_dir),
            "serving_version": name if self.installed() else None,
            "device": self.device,
            "dtype": self.dtype or "auto",
            "versions": self.versions_info(),
            "skipped_versions": sorted(self._failed, key=int),
            "load_error": self._load_error,
            "last_training": self.last_run(),
        }

    # -- engine ----------------------------------------------------------------------------
    def load_engine(self, path: Path):
        """A fresh engine from `path` (used by the trainer, which must not touch the shared one)."""
        try:
            from citrusv import Engine
        except ImportError as e:
            raise ModelNotInstalled(f"{NOT_INSTALLED}: the citrusv engine is not importable ({e}).")
        return Engine.load(str(path), device=self.device, dtype=self.dtype)

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
                    self._failed.add(version)
                    continue
                self._engine, self._loaded = engine, (version, path)
                return engine, version


_shared: dict[tuple, SharedModel] = {}
_shared_lock = threading.Lock()


def shared_model(model_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> SharedModel:
    """The process-wide SharedModel for these settings (all tasks get the same object)."""
    key = (str(Path(model_dir).expanduser().resolve()), device, dtype)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SharedModel(*key)
        return _shared[key]
