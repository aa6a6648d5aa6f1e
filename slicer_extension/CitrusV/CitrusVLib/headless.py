"""Slicer-less twin of the widget: ask the server about one slice, write the overlay PNG."""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

from .client import CitrusVClient, infer_params
from .errors import CitrusVError
from .geometry import AXES, get_slice
from .label_io import read_label_volume
from .overlay import fullest_slice, render_overlay
from .result import Result

# Display windows (level, width) for the PNG; the server applies its own for the model.
DISPLAY_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (60.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# The engine's rule (`citrusv.parsing.infer_task`, which Slicer's Python cannot import), so
# that `citrusv ask` routes a question alike with --server and with --model: the first task in
# this order whose words the question has ("Where is the spleen? Output its mask." is a
# segmentation question), else "report". tests/app/test_readers_agree.py keeps them equal.
_TASK_WORDS = (
    ("report", re.compile(r"\breport|\bdescrib|\bfindings?\b|step by step|\bdiagnos"
                          r"|\bimpression|\bsummar"
                          r"|\b(?:what|which|list(?: the| all)?) (?:structures|organs|anatomy)\b"
                          r"|\bwhat do you see\b"
                          r"|\bwhat(?:'s| is) (?:on|in) (?:this|the) (?:slice|image|scan)\b", re.I)),
    ("segment", re.compile(r"\bsegment|\bmasks?\b|\bdelineat|\boutline|\bcontour|\bhighlight"
                           r"|\bhow (?:big|large)\b|\bsize\b|\bmeasur"
                           r"|\bvolumes? of\b|(?<!this )(?<!the )(?<!a )(?<!whole )(?<!entire )\bvolumes?\?"
                           r"|\bcompare\s+the\b|\b(?:which|what)\b[^.?!]*\b(?:larger|bigger|smaller"
                           r"|largest|biggest|smallest)\b|\b(?:larger|bigger|smaller)\s+than\s+the\b",
                           re.I)),
    ("detect", re.compile(r"\bdetect|\blocat|\bwhere\b|\bfind\b|\bidentif|\bb?box|\bbounding"
                          r"|\bshow (?:me )?(?:the|both|all)\b|\bpoint (?:out|to)\b"
                          r"|\bhow many\b|\bcount\b", re.I)),
    ("segment", re.compile(r"^\s*(?:(?:please|pls|can you|could you|would you)\s+)?"
                           r"(?:draw|mark|label|annotate|paint|trace|seg)\b", re.I)),
)


# a misspelt task word opening a question with no task words ("Segmnet the liver."): the
# engine's `citrusv.parsing.misspelt_task_word`, read as the closest of these
_TASK_VERBS = {"segment": "segment", "delineate": "segment", "outline": "segment",
               "contour": "segment", "highlight": "segment", "detect": "detect",
               "locate": "detect", "identify": "detect", "describe": "report",
               "summarise": "report", "summarize": "report"}
_NOT_TASK_TYPOS = frozenset({"identity", "relocate", "allocate", "outlive", "scribe"})
_OPENING = re.compile(r"\s*(?:(?:please|pls|can you|could you|would you)\s+)?([a-z]+)\b")
# task words typed with a slip of one key ("Write a reprot.", "Write a repor."): the engine's
# `citrusv.parsing._TASK_SPELLINGS`, `slips` and `slipped_letters`, and of its English words
# that are such a slip (`_NOT_SLIPS`), those of task words
_TASK_SPELLINGS = frozenset({
    "report", "describe", "findings", "finding", "diagnosis", "impression", "summary",
    "summarise", "summarize", "step", "segment", "mask", "delineate", "outline", "contour",
    "highlight", "measure", "detect", "locate", "where", "find", "identify", "bounding",
    "show", "point", "count", "structures", "organs", "anatomy"})
_NOT_TASK_SLIPS = frozenset({"bonding", "fining", "here", "organ", "pint", "steep", "structure",
                             "summaries", "were", "whee"})


def _slips(word: str) -> list[str]:
    out = [word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)
           if word[i] != word[i + 1]]
    out += [word[:i] + word[i + 1:] for i in range(1, len(word)) if word[i] == word[i - 1]]
    out += [word[:i] + c + word[i:] for i in range(len(word) + 1)
            for c in "abcdefghijklmnopqrstuvwxyz"]
    return list(dict.fromkeys(w for w in out if w != word))


def _unslipped(prompt: str) -> str:
    """The question in lower case, each word that is a task word with a slip of one key put
    right ("reprot" or "repor" -> "report")."""
    low = prompt.lower()
    for word in dict.fromkeys(re.findall(r"[a-z]{4,}", low)):
        if word in _TASK_SPELLINGS or word in _NOT_TASK_SLIPS:
            continue
        meant = next((w for w in _slips(word) if w in _TASK_SPELLINGS), None)
        if meant:
            low = re.sub(rf"\b{word}\b", meant, low)
    return low


def guess_task(prompt: str) -> str:
    """``report`` / ``segment`` / ``detect`` from the wording of a question."""
    low = _unslipped(prompt)
    for task, pattern in _TASK_WORDS:
        if pattern.search(low):
            return task
    m = _OPENING.match(prompt.lower())
    word = m.group(1) if m else ""
    if len(word) >= 5 and word not in _NOT_TASK_TYPOS:
        close = difflib.get_close_matches(word, _TASK_VERBS, n=1, cutoff=0.85)
        if close:
            return _TASK_VERBS[close[0]]
    return "report"


def to_uint8(plane: np.ndarray, window: str | Sequence[float] | None = None) -> np.ndarray:
    """Scanner values → 8-bit grey: a CT window (name or [level, width]) or 1–99 percentiles."""
    data = np.asarray(plane, dtype=np.float32)
    if isinstance(window, str):
        if window not in DISPLAY_WINDOWS:
            raise ValueError(
                f"window must be one of {', '.join(DISPLAY_WINDOWS)} or [level, width]."
            )
        level, width = DISPLAY_WINDOWS[window]
    elif window is not None:
        level, width = (float(v) for v in window)
    elif data.size and float(data.min()) < -500:  # looks like CT in Hounsfield units
        level, width = DISPLAY_WINDOWS["abdomen"]
    else:
        lo, hi = np.percentile(data, (1, 99)) if data.size else (0.0, 1.0)
        level, width = (lo + hi) / 2, max(hi - lo, 1e-6)
    lo = level - width / 2
    return (np.clip((data - lo) / max(width, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def ask_server(
    url: str,
    image_id: str,
    slice_index: int | None,
    prompt: str,
    png_path: str | os.PathLike | None,
    task: str | None = None,
    axis: str = "axial",
    window: str | Sequence[float] | None = None,
    token: str | None = None,
    image_path: str | os.PathLike | None = None,
    ca_certificate: str | os.PathLike | None = None,
    slices: Sequence[int] | str | None = None,
    roi: Sequence[float] | None = None,
) -> Result:
    """Run one question on the server and, where ``png_path`` is given, save masks/boxes/steps
    drawn on the slice as a PNG.

    The slice pixels come from ``image_path`` when given, else from the server's datastore.
    For a 2D image (X-ray) ``slice_index`` may be None and no slice is sent. ``slices``
    asks over a range instead, ``(first, last)`` or ``"all"``; the PNG then shows the slice
    where the answer's masks are largest. ``roi`` ([x1, y1, x2, y2] in slice pixels) asks
    for a closer look at that box of the slice instead.
    """
    if roi is not None and slices is not None:
        raise CitrusVError("A closer look is about one slice: give one slice index, not a "
                           "range.")
    client = CitrusVClient(url, token=token, ca_certificate=ca_certificate)
    task = "closer_look" if roi is not None else (task or guess_task(prompt))
    with tempfile.TemporaryDirectory() as tmp:
        volume = read_label_volume(image_path or client.download_image(image_id, tmp))
    is_2d = volume.array.shape[AXES.index(axis)] == 1
    if slices is not None and is_2d:
        what = "all" if slices == "all" else f"{slices[0]}-{slices[1]}"
        raise CitrusVError(f"'{image_id}' is one image, not a volume: a slice range ({what}) "
                           "does not apply to it; leave the range out.")
    if slices is not None:
        scope = "volume" if slices == "all" else "range"
        params = infer_params(prompt, axis, scope, None, window=window, is_2d=is_2d,
                              slice_range=None if scope == "volume" else slices)
        response = client.infer(task, image_id, params)
        first = 0 if scope == "volume" else min(int(v) for v in slices)
        index = fullest_slice(response.result, first)
    else:
        if slice_index is None and not is_2d:
            raise CitrusVError(f"'{image_id}' is a volume: give the slice index to ask about.")
        index = 0 if is_2d else int(slice_index)
        params = infer_params(prompt, axis, "slice", index, window=window, is_2d=is_2d,
                              roi=None if roi is None else [float(v) for v in roi])
        response = client.infer(task, image_id, params)
    if png_path is not None:
        image = to_uint8(get_slice(volume.array, axis, index), window)
        overlay = render_overlay(image, response.result, slice_index=None if is_2d else index)
        overlay.save(os.fspath(png_path))
    return response.result
