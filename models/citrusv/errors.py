"""The one error type a caller can show to a user: bad input, said in one plain sentence."""

from __future__ import annotations


class InputError(ValueError):
    """Bad request: the message names the field and the fix (the server returns it as a 4xx)."""

    def __init__(self, field: str, sentence: str) -> None:
        self.field = field
        super().__init__(sentence)


class CheckpointError(RuntimeError):
    """A checkpoint directory that does not match the model it claims to hold."""
