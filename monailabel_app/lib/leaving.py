"""A question whose client has gone stops before its next slices.

A question over a slice range (on the 8B a CT's 133 slices take minutes) went on to its last
slice after its client had gone: Slicer's Cancel, a script's time limit, a closed laptop, a
dropped network. It took its turns at the model all the same, so everyone else's questions
were answered at half the pace for nothing. The server's ASGI app is wrapped
(`NoticeLeaving`): for `POST /infer/...`, once the request's body has been read, it listens
for the client closing its connection, and `CLIENT_GONE` (an event, seen by the question's
worker thread) is set when it does. The question's range checks it before each chunk of
slices (`lib.infers.citrusv`) and stops there, and the log says so."""

from __future__ import annotations

import asyncio
import threading
from contextvars import ContextVar

# set for the request being answered (None outside a watched request)
CLIENT_GONE: ContextVar[threading.Event | None] = ContextVar("citrusv_client_gone",
                                                             default=None)

WATCHED = ("/infer/",)  # the questions; a batch is a task of its own (DELETE /batch/infer)


class NoticeLeaving:
    """ASGI app wrapper: sets `CLIENT_GONE` for a watched request whose client closes its
    connection before the answer has been sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(WATCHED):
            await self.app(scope, receive, send)
            return
        gone = threading.Event()
        listening: asyncio.Task | None = None

        def noticed(message: dict) -> dict:
            if message.get("type") == "http.disconnect":
                gone.set()
            return message

        async def listen() -> dict:
            return noticed(await receive())

        async def receive_noticing() -> dict:
            nonlocal listening
            if listening is not None:  # asked again after the body (Starlette's own check)
                return await asyncio.shield(listening)
            message = noticed(await receive())
            if message.get("type") == "http.request" and not message.get("more_body", False):
                # the body is read: the server's next message is the client leaving (or the
                # answer having been sent)
                listening = asyncio.get_running_loop().create_task(listen())
            return message

        token = CLIENT_GONE.set(gone)
        try:
            await self.app(scope, receive_noticing, send)
        finally:
            CLIENT_GONE.reset(token)
            if listening is not None and not listening.done():
                listening.cancel()
