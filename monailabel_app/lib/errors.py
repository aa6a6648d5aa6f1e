"""HTTP errors with one plain sentence: FastAPI turns them into `{"detail": "..."}` 4xx replies.

MONAI Label wraps any other exception from a task into a 500, so every adapter raises these.
"""

from __future__ import annotations

from fastapi import HTTPException


class RequestError(HTTPException):
    """A bad request (4xx); `sentence` names the field and the fix."""

    def __init__(self, sentence: str, status_code: int = 400) -> None:
        super().__init__(status_code=status_code, detail=sentence)


class ConfError(ValueError):
    """A `--conf` setting the server cannot start with; the sentence names it and the fix.
    The app logs the sentence alone and exits with EXIT_CONF (main.py)."""


EXIT_CONF = 78  # EX_CONFIG (sysexits.h); scripts/citrusv-server.service does not restart on it


class ModelNotInstalled(HTTPException):
    """The checkpoint is missing: the server runs, the tasks answer 503 until it is installed."""

    def __init__(self, sentence: str) -> None:
        super().__init__(status_code=503, detail=sentence)
