"""Engine: the one public entry. Load a checkpoint once, then ask questions about slices.

    engine = Engine.load("models/nano")
    res = engine.ask(slice_hu, "Please segment the liver in this scan.", window="abdomen")
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from . import imaging
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BOX_SOURCES
from .errors import InputError
from .generation import (
    Generation,
    generate_capturing,
    generate_capturing_batch,
    image_embeddings,
    prefix_length,
    span_score,
    teacher_force,
    token_char_ends,
)
from .imaging import FrameMap
from .parsing import (SEG_TOKEN, TASKS, absent_labels, answers_about, asks_for_everything,
                      asks_for_report, asks_for_volume, asks_to_compare, asks_to_measure,
                      excluded_structures, garbled_warning, infer_task, known_named,
                      language_warning, listed, misspelt_as_answered, misspelt_names,
                      named_structures, names_slices, parse_output, parts_named,
                      prompt_targets, respelled, segment_structure, size_mismatches,
                      unasked_warning, untaught, untaught_warning, whole_of, whole_warning)
from .prompting import pixel_inputs, stop_token_ids, text_inputs
from .result import Box, Mask, Result, Step
from .slice_cache import SliceCache, SliceState, content_hash
from .training import dice_score
from .turns import TurnLock

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
AXIS_NAMES = {v: k for k, v in AXES.items()}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}
# refused with their reason: Qwen2.5 was trained in bf16 and its activations can overflow to
# inf/NaN in fp16 (QwenLM/Qwen3#868), so the answers would be garbage, not an error
_FP16 = ("float16", "fp16", "half")
# box_source "mask": the question that gets the model's mask of a box's label, and how much of
# that mask the box spans: every connected part at least this share of the largest part
# (a few stray pixels away from the structure would otherwise stretch the box; the share was
# picked on training slices, see models/nano/MODEL_CARD.md)
GROUND_PROMPT = "Please segment the {label} in this scan."
GROUND_MIN_PART = 0.25
GROUND_MAX_NEW_TOKENS = 64
# a written box is replaced by its mask's box, and a structure the answer says is not visible
# gets one, only from a mask this large; a smaller one is named in a warning: the line at which
# the evaluation counts a structure as on a slice (MIN_AREA_PX), not tuned
GROUND_MIN_ABSENT_PX = 40
# a closer look's square: the box grown by this share of its side on each side
CLOSER_LOOK_MARGIN = 0.15
# what closer_look asks when given no prompt (with no label: "the structure", which names
# nothing, so its answer is not checked against the question)
CLOSER_LOOK_PROMPT = "Please segment the {label} in this image."
# a closer look takes one model pass per box: at most this many in one request
MAX_CLOSER_LOOK_ROIS = 8
# what a structure a segmentation or detection answer leaves out is asked again with, alone
# (`Engine._ask_rest`; nano's phrasing, the segmentation one that boxes are grounded with)
FOLLOW_UP_PROMPTS = {"segment": GROUND_PROMPT,
                     "detect": "Locate the {label}, output its bbox coordinates using JSON format."}
# what a report question answered with no report is asked again with, after the question
# (`Engine._ask_for_report`; Citrus-V's reports are step-by-step reasoning)
REPORT_FOLLOW_UP = "Think step by step."
# what it is asked when that gives no report either, or the question says "step by step"
# already ("Write a Report, Think Step by Step.": nano, taught lower-case words, writes a
# left-lung box); nano's phrasing, its trained "Write a report for this CT slice. Think step
# by step." with "image", which it also answers on a radiograph
REPORT_AGAIN_PROMPT = "Write a report for this image. Think step by step."


def small_mask_warning(label: str, pixels: int, spacing=None) -> str:
    """Said when a mask of one slice marks under GROUND_MIN_ABSENT_PX pixels: too little to take
    as the structure's cross-section (nano's right-kidney mask on held-out slice 25, where the
    reference has no right kidney: 16 pixels)."""
    area = "" if spacing is None else f", {pixels * spacing[0] * spacing[1]:.0f} mm²"
    return (f"the {label} mask marks only {pixels} px{area}, too few to be taken as the {label}: "
            "the model may not have found it here; treat that mask as unconfirmed.")


def empty_mask_warning(label: str, slices: int | None = None) -> str:
    """Said when a [SEG] mask marks no pixel, so "Sure, the liver is [SEG]" with nothing drawn
    is not left unexplained (on nano's held-out CT slices 144 of the 150 empty masks were for
    a structure that is not there)."""
    where = "the image" if slices is None else f"any of the {slices} slices asked"
    return (f"the {label} mask is empty: the model marks no {label} pixel in {where}, "
            "so the structure may not be in view.")


# how a sentence on what the model wrote begins; WRITTEN_ANSWER where the answer returned is
# the engine's own sentence (a size measured or compared on the masks), the model's in `text`
ANSWER_SAYS = "the answer says "
WRITTEN_ANSWER = "the model's written answer says "


def absent_box_warning(said: str, label: str, verb: str = "is", kind: str = "box") -> str:
    """box_source "mask": the answer said `said` is (or, for a pair, are) not visible, the
    model's mask of it (or of one of the pair) marks `label`, so that mask's box is returned.
    kind "mask": a segmentation answer said so, and the mask the model gave when asked for
    `label` alone (`Engine._ask_rest`) is returned. No box id or pixel count in it, so that
    over a slice range the same sentence comes once for all its slices."""
    returned = (f"the {label} box returned is the box of that mask, not one the model wrote"
                if kind == "box" else f"the {label} mask returned is the one it gives when "
                f"asked for the {label} alone")
    return (f"{ANSWER_SAYS}no {said} {verb} visible, but the model's own segmentation marks "
            f"the {label} in the image; {returned}.")


# paired organs an answer may call not visible together ("No kidneys are visible"): each side
# is asked for on its own. Other plurals ("No gallstones are visible") are left alone.
PAIRED_ORGANS = {"kidneys": "kidney", "lungs": "lung", "adrenal glands": "adrenal gland",
                 "ureters": "ureter", "ovaries": "ovary", "breasts": "breast"}


def absent_members(label: str, verb: str) -> list[str]:
    """What to ask the model's masks about for a structure an answer calls not visible:
    itself ("liver", "is"), both sides of a paired organ ("kidneys", "are" -> right and left
    kidney), or nothing (another plural)."""
    if verb == "is":
        return [label]
    one = PAIRED_ORGANS.get(label.strip().lower())
    return [f"right {one}", f"left {one}"] if one else []


def asked_members(target: str) -> list[str]:
    """What `Engine._ask_rest` asks about, one at a time, for a structure a question names:
    both sides of a paired organ named in the plural or with no side ("kidneys", "the
    kidney" -> right kidney, left kidney), the whole of a part (`whole_of`: "LUL" -> left
    lung, "left ventricle" -> heart), else the structure itself."""
    target = whole_of(target) or target
    one = PAIRED_ORGANS.get(target) or (target if target in PAIRED_ORGANS.values() else None)
    return [f"right {one}", f"left {one}"] if one else [target]


def untaught_modality(res: Result, modality: str | None, taught: list[str],
                      picture: bool = False) -> None:
    """A model taught to segment only some kinds of image (`CitrusVConfig.mask_modalities`;
    nano: CT), asked on another kind (`modality`, the image's DICOM Modality; nano on the
    demo radiograph, CR): its masks there are untaught guesses, and an empty one does not
    mean the structure is absent. The "may not be in view" sentences of its empty masks go,
    and one sentence says so. `picture`: the image is a picture file (PNG, JPEG ...), which
    names no kind and is often a radiograph or a screenshot: one sentence says the masks are
    guesses if it is not of a taught kind (the other sentences stay: it may be a CT slice).
    Nothing when the modality is taught, otherwise unknown (NIfTI, NRRD, a bare array), or
    there is no mask."""
    code = (modality or "").strip().upper()
    if (picture or code) and NOT_CT_BY_VALUES in res.warnings:  # said better below, or CT
        res.warnings.remove(NOT_CT_BY_VALUES)
    if taught and picture and not code and res.masks:
        kinds = listed(taught, "or")
        res.warnings.append(
            f"this image is a picture file, which does not say what kind of image it is, and "
            f"this model was taught to segment {listed(taught, 'and')} images only: if it is "
            f"not {kinds}, its masks are guesses it was never taught, and an empty one does not "
            f"mean the structure is absent.")
        return
    if not taught or not code or code in taught or not res.masks:
        return
    empty = {empty_mask_warning(m.label, len(m.slices) if m.array.ndim == 3 else None)
             for m in res.masks}
    res.warnings = [w for w in res.warnings if w not in empty]
    res.warnings.append(
        f"this model was taught to segment {listed(taught, 'and')} images only, and this image "
        f"is {code} by its DICOM header: its masks here are guesses it was never taught, and "
        f"an empty one does not mean the structure is absent.")


# masks of a model taught CT only, on an image whose values are no CT's and whose kind no
# header names (a bare array, NIfTI or NRRD: an MR volume, a radiograph's pixels)
NOT_CT_BY_VALUES = ("this image has no values below -500, as a CT's air has, and nothing says "
                    "what kind of image it is; this model was taught to segment CT images "
                    "only: its masks here are likely guesses it was never taught, and an empty "
                    "one does not mean the structure is absent.")


def untaught_by_values(res: Result, values: np.ndarray, window, taught: list[str]) -> None:
    """A model taught to segment CT only (`CitrusVConfig.mask_modalities` ["CT"]), asked with
    no window about an image that is not 8-bit and has no values below -500 (no CT: its air
    is about -1000 HU; `imaging.looks_like_ct`, the rule that picks percentile scaling): its
    masks are likely untaught guesses. The "may not be in view" sentences of its empty masks
    go, and NOT_CT_BY_VALUES says why. `untaught_modality` puts its own sentence in this one's
    place where a DICOM header or a picture file says more."""
    if (set(taught) != {"CT"} or not res.masks or window not in (None, "auto")
            or values.dtype == np.uint8 or values.ndim == 3 and values.shape[-1] in (3, 4)
            or imaging.looks_like_ct(np.asarray(values))):
        return
    empty = {empty_mask_warning(m.label, len(m.slices) if m.array.ndim == 3 else None)
             for m in res.masks}
    res.warnings = [w for w in res.warnings if w not in empty] + [NOT_CT_BY_VALUES]


def unconfirmed_boxes_warning(labels: list[str], few: dict[str, int] | None = None) -> str:
    """box_source "mask": said when some boxes' labels get no mask, so those boxes stay as the
    model wrote them, with nothing to check them against. `few`: labels whose mask marks under
    GROUND_MIN_ABSENT_PX pixels ({label: pixels}), which is not taken as the structure (on
    held-out slice 25, where the reference has no right kidney, nano's report cites one and its
    right-kidney mask there is one pixel, whose box, 1 x 1 px, took the written box's place)."""
    boxes, it = ("that box is", "it") if len(labels) == 1 else ("those boxes are", "them")
    if few:
        marked = listed([f"{n} px of the {label}" for label, n in few.items()], "and")
        return (f"the model's own segmentation marks only {marked} in the image, too few to box "
                f"(the structure may not be in view), so {boxes} as the model wrote {it}, not the "
                f"box of a mask; treat {it} as unconfirmed.")
    return (f"the model's own segmentation marks no {listed(labels, 'or')} in the image, so "
            f"{boxes} as the model wrote {it}, not the box of a mask; treat {it} as "
            "unconfirmed.")


def spelling_note(fixes: list[tuple[str, str]],
                  answered: list[tuple[str, str]] = ()) -> str:
    """Said when words of a question were read as others (`parsing.misspelt_names`: a
    misspelt name or task word, a shortened side; `answered`: a word read as the name the
    answer gives, `parsing.misspelt_as_answered`), first among the answer's warnings."""
    out = []
    if fixes:
        read = listed([f'"{typed}" as "{meant}"' for typed, meant in fixes])
        known = "a word" if len(fixes) == 1 else "words"
        out.append(f"read {read} in the question ({known} the engine knows) to check the "
                   "answer and to ask again.")
    if answered:
        read = listed([f'"{typed}" as "{meant}"' for typed, meant in answered])
        names = "the name" if len(answered) == 1 else "names"
        out.append(f"read {read} in the question ({names} the answer gives) to check the "
                   "answer.")
    return " ".join(out)


def size_warning(mismatches) -> str:
    """Said when sizes an answer gives are more than a fifth off its boxes' measured sizes
    (`citrusv.parsing.size_mismatches`): nano's written sizes are within 20 % of the
    reference on both sides for 56 % of the structures its held-out reports name."""
    items = "; ".join(f"{label} {w[0]:g} x {w[1]:g} mm written, box {r[0]:.0f} x {r[1]:.0f} mm"
                      for label, w, r in mismatches)
    return (f"the sizes the answer gives differ by more than a fifth from those of its boxes "
            f"({items}): the boxes' sizes are measured from the image's pixel spacing, the "
            f"answer's are as the model wrote them.")


def one_slice_warning(named: str, slice_index: int | None) -> str:
    """Said when a question about one slice names slices ("on slices 40 to 60", "in the
    whole volume"): the words do not choose them."""
    this = "the one slice sent" if slice_index is None else f"slice {slice_index}"
    return (f"the question says \"{named}\", but this answer is about {this} only: the slices "
            "asked about are chosen with the request's slice (in the Slicer module, its "
            "scope: slice range or whole volume), not by the question's words.")


# a volume question about one slice ("What is the volume of the spleen?")
ONE_SLICE_VOLUME = ("a volume needs a range of slices: this answer is one slice's mask, with its "
                    "area in mm²; ask over a slice range or the whole volume for its volume in "
                    "mL.")


def cut_at_range_ends(mask: Mask, first: int, last: int) -> str | None:
    """A sentence when a 3D mask has pixels on the first or the last slice asked: the
    structure may go on beyond the range, and its volume counts the slices asked only. Where
    that slice is the image's own first or last, the image cuts it, not the range."""
    n = mask.array.shape[mask.axis]
    ends = [k for k in dict.fromkeys((first, last))
            if np.take(mask.array, k, axis=mask.axis).any()]
    if not ends:
        return None

    def which(k: int) -> str:
        if k in (0, n - 1):
            return f"slice {k}, the image's {'first' if k == 0 else 'last'}"
        return f"slice {k}, the {'first' if k == first else 'last'} asked"

    said = f"the {mask.label} mask reaches " + ", and ".join(which(k) for k in ends)
    if all(k in (0, n - 1) for k in ends):
        return (f"{said}: the {mask.label} may go on past what the image holds, so "
                f"{mask.volume_ml:g} mL is its volume in the image only.")
    return (f"{said}: {mask.volume_ml:g} mL is its volume over the slices asked only; ask a "
            f"range that goes past the {mask.label} for all of it.")


def size_range_warning(off: dict[str, list[int]]) -> str:
    """`size_warning` over a slice range: each structure whose written size is more than a
    fifth off its box's, with the slices (one sentence, not one per slice)."""
    items = "; ".join(f"the {label} on {slice_list(ks)}" for label, ks in off.items())
    return (f"the sizes the answers give differ by more than a fifth from those of their "
            f"boxes for {items}: the boxes' sizes (size_mm) are measured from the image's "
            f"pixel spacing, the answers' are as the model wrote them.")


# a closer look whose mask overlaps the one before it less than this (Dice, inside the region
# looked at) is said to disagree with it. Refining a mask's edges keeps far more; nano before
# its crop round kept 0.52-0.58 of its lungs on held-out slices (MODEL_CARD.md, Limits)
CLOSER_LOOK_MIN_DICE = 0.7


def closer_look_warning(label: str, against: str, before_px: int, after_px: int,
                        dice: float | None) -> str | None:
    """Said when a closer look's mask loses the structure the mask before it marked, or agrees
    little with it: a model not trained on zoomed-in crops does that (models/nano did before
    its crop round; it still does for small structures such as the aorta), and the Slicer
    module would otherwise put it in place of the earlier mask without a word."""
    if before_px < GROUND_MIN_ABSENT_PX or dice is None:
        return None
    if not after_px:
        return (f"the closer look marks no {label} in the crop, where {against} marks "
                f"{before_px} pixels of it: the model may not handle zoomed-in crops well, so "
                "keep the earlier mask unless the crop really shows none.")
    if dice < CLOSER_LOOK_MIN_DICE:
        return (f"the closer look's {label} mask agrees little with {against} (Dice "
                f"{dice:.2f} inside the region looked at): the model may not handle zoomed-in "
                "crops well, so compare the two before keeping it.")
    return None


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """The torch device for `device`, or one sentence (naming the setting as `what`) when this
    process cannot use it: say so at load time, not with torch's words at the first question."""
    value = str(device)
    kind, _, index = value.partition(":")
    if kind not in ("cuda", "cpu", "mps") or (index and not index.isdigit()):
        raise InputError("device", f"{what} {value} is not a device; use cuda or cpu.")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device", f"{what} {value}: this process sees no CUDA GPU (check "
                             "the NVIDIA driver with nvidia-smi, and CUDA_VISIBLE_DEVICES), "
                             f"or use {what} cpu.")
        if index and int(index) >= torch.cuda.device_count():
            raise InputError("device", f"{what} {value}: this process sees "
                             f"{torch.cuda.device_count()} GPU(s), numbered from cuda:0.")
    return torch.device(value)


def resolve_dtype(dtype, device: str | torch.device, what: str = "dtype") -> torch.dtype:
    """None -> fp32 on CPU, bf16 on CUDA; strings like "bf16" accepted; else one sentence
    naming the setting as `what`."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() in _FP16:
            raise InputError("dtype", f"{what} {dtype} is not supported: Qwen2.5-VL was trained "
                             "in bf16 and can overflow in fp16; use bf16, or fp32 on a GPU "
                             "without bf16.")
        if dtype.lower() not in _DTYPES:
            raise InputError("dtype", f"{what} {dtype} is not supported; use bf16 or fp32.")
        return _DTYPES[dtype.lower()]
    return dtype


def square_roi(xyxy, height: int, width: int, margin: float = CLOSER_LOOK_MARGIN,
               min_side: int = 16
               ) -> list[int]:
    """A square around a box, grown by `margin` per side, kept inside the slice."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side = int(min(max(round(side), min_side), width, height))
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return [left, top, left + side, top + side]


def closer_look_image(image: np.ndarray, square, window=None, size: int = 256,
                      photometric: str | None = None) -> np.ndarray:
    """What a closer look shows the model: the slice windowed, cut to `square`, scaled to
    size x size RGB (training's closer-look crops are made by the same function)."""
    x1, y1, x2, y2 = (int(v) for v in square)
    crop = imaging.to_rgb_uint8(image, window, photometric)[y1:y2, x1:x2]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))


def mask_box(mask: np.ndarray) -> list[float] | None:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y = np.flatnonzero(rows)
    x = np.flatnonzero(cols)
    return [float(x[0]), float(y[0]), float(x[-1] + 1), float(y[-1] + 1)]


def main_parts(mask: np.ndarray | None, min_part: float = GROUND_MIN_PART
               ) -> list[np.ndarray]:
    """The connected parts of `mask` (8-connected) that are at least `min_part` times the
    size of its largest part, largest first; [] for an empty mask."""
    if mask is None or not np.any(mask):
        return []
    parts, n = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3)))
    sizes = np.bincount(parts.ravel())[1:]
    keep = 1 + np.flatnonzero(sizes >= min_part * sizes.max())
    return [parts == i for i in sorted(keep, key=lambda i: -sizes[i - 1])]


def main_parts_box(mask: np.ndarray | None, min_part: float = GROUND_MIN_PART
                   ) -> list[float] | None:
    """The box around the main parts of `mask` (`main_parts`); None for an empty mask."""
    parts = main_parts(mask, min_part)
    return mask_box(np.logical_or.reduce(parts)) if parts else None


def box_pixels(box, height: int, width: int) -> np.ndarray:
    """The pixels a box [x1, y1, x2, y2] (floats) touches: near edges rounded down, far edges
    up, at least one pixel; what a closer look both keeps its refined mask to and compares
    it in."""
    x1, y1 = int(box[0]), int(box[1])
    x2, y2 = max(int(np.ceil(box[2])), x1 + 1), max(int(np.ceil(box[3])), y1 + 1)
    out = np.zeros((height, width), dtype=bool)
    out[y1:y2, x1:x2] = True
    return out


def bounding_box(boxes: list) -> list[float]:
    """The box around boxes [x1, y1, x2, y2]."""
    return [min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _join_looks(res: Result, more: Result) -> Result:
    """Two closer-look passes (other squares of one slice) as one result: masks joined
    (`_add_masks`), boxes and warnings added, timings summed."""
    _add_masks(res, more)
    ids = {b.id for b in res.boxes}
    for b in more.boxes:
        while b.id in ids:
            b.id += "'"
        ids.add(b.id)
        res.boxes.append(b)
    return _add_warnings_and_times(res, more)


def _add_masks(res: Result, more: Result) -> None:
    """`more`'s masks into `res`: a label `res` has joined to its mask, a new one numbered
    after `res`'s labels (each answer numbers its own labels from 1)."""
    for m in more.masks:
        same = [k for k in res.masks if k.label == m.label]
        if same:
            same[0].array = same[0].array | m.array
        else:
            m.label_index = max((k.label_index for k in res.masks), default=0) + 1
            res.masks.append(m)


def _add_warnings_and_times(res: Result, more: Result) -> Result:
    """`more`'s warnings that `res` lacks added to it, and its timings summed into it."""
    res.warnings += [x for x in more.warnings if x not in res.warnings]
    _sum_times(res.timing_ms, more.timing_ms)
    return res


def _is_report(res: Result) -> bool:
    """An answer is a report when it has reasoning steps or an <answer> part."""
    return bool(res.reasoning) or "<answer>" in res.text


def _sum_times(timing: dict, more: dict) -> None:
    for k, v in more.items():
        timing[k] = timing.get(k, 0.0) + v


def _shown(res: Result) -> str:
    """What a reader is shown of an answer: its reasoning steps and its answer, else (neither
    written) the model's raw output."""
    shown = "\n".join([s.text for s in res.reasoning] + [res.answer]).strip()
    return shown or res.text


def _take_place(res: Result, new: Result) -> None:
    """Answers asked again (`Engine._ask_rest`, `_ask_garbled_again`) in place of the first:
    their text (the first's raw output first), answer, reasoning, boxes, masks, warnings."""
    res.text, res.answer, res.reasoning = new.text, new.answer, new.reasoning
    res.boxes, res.masks, res.warnings = new.boxes, new.masks, new.warnings


def _about(res: Result, absent: list[str], task: str) -> list[str]:
    """The structures an answer is about: its masks' for segmentation; for detection its
    boxes' and those it calls not visible (`absent`)."""
    if task == "segment":
        return [m.label for m in res.masks]
    return [b.label for b in res.boxes] + absent


def _join_answers(res: Result, more: Result) -> Result:
    """The answer to a follow-up question (`Engine._ask_rest`) added to the first: masks of a
    label joined, new labels numbered after the first's, boxes renumbered, the raw texts and
    the answers one after the other, warnings added, timings summed."""
    _add_masks(res, more)
    remap = {}
    for b in more.boxes:
        remap[b.id] = b.id = f"b{len(res.boxes) + 1}"
        res.boxes.append(b)
    res.reasoning += [Step(len(res.reasoning) + i + 1, s.text, [remap.get(x, x) for x in s.box_ids])
                      for i, s in enumerate(more.reasoning)]
    res.text = f"{res.text}\n{more.text}"
    res.answer = f"{res.answer}\n{more.answer}".strip()
    return _add_warnings_and_times(res, more)


def _drop_excluded(res: Result, left_out: list[str]) -> None:
    """A question for every structure that leaves some out ("Segment all organs except the
    liver.", `parsing.excluded_structures`): masks and boxes of those go (the model's first
    answer may be about one), masks renumbered, and one sentence says so."""
    def out(label: str) -> bool:
        return any(answers_about(x, [label]) for x in left_out)

    gone = list(dict.fromkeys(x.label for x in res.masks + res.boxes if out(x.label)))
    if not gone:
        return
    dropped = {b.id for b in res.boxes if out(b.label)}
    res.masks = [m for m in res.masks if not out(m.label)]
    res.boxes = [b for b in res.boxes if not out(b.label)]
    for step in res.reasoning:
        step.box_ids = [i for i in step.box_ids if i not in dropped]
    index: dict[str, int] = {}
    for m in res.masks:
        m.label_index = index.setdefault(m.label, len(index) + 1)
    it = "it is" if len(gone) == 1 else "they are"
    res.warnings.append(f"the model's answer had the {listed(gone)}, which the question leaves "
                        f"out, so {it} not returned.")


# what the distance from a mask's first slice to its last is, along each axis's slices
SPAN_NAMES = {0: "craniocaudal", 1: "anteroposterior", 2: "left to right"}


def range_answer(masks: list[Mask], boxes: list[Box], ks: list[int],
                 boxed_as: str = "boxed", unconfirmed: frozenset[str] = frozenset()
                 ) -> str | None:
    """The answer over a slice range, from what was marked rather than one slice's words
    (each slice's answer is in `text`): each structure's slices and, with a known spacing
    over contiguous slices, its volume and its span across the slices, first to last, each
    slice whole ("Over slices 0-132 (133 slices): liver marked on slices 4-62 (59 of them),
    1037.4 mL, 147.5 mm craniocaudal."), then the labels boxed with no mask (`boxed_as`
    "cited" for a report's boxes: "right lung cited on slices 60-69 (10 of them)"), with the
    slices where no mask confirms the box (`unconfirmed`: box ids; "liver cited on slices
    60-62, 66-69 (7 of them; no liver mask confirms it on slices 66-69)"). None when nothing
    was marked or boxed."""
    parts, masked = [], set()
    for m in masks:
        masked.add(m.label)
        on = [k for k in ks if np.take(m.array, k, axis=m.axis).any()]
        if not on:
            parts.append(f"no {m.label} marked on any of them")
            continue
        ml = f", {m.volume_ml:.1f} mL" if m.volume_ml is not None else ""
        if m.thickness is not None:  # from its first slice to its last, slices whole
            ml += (f", {(on[-1] - on[0] + 1) * m.thickness:.1f} mm "
                   f"{SPAN_NAMES[m.axis]}")
        parts.append(f"{m.label} marked on {slice_list(on)} ({len(on)} of them){ml}")
    boxed: dict[str, set[int]] = {}
    unsure: dict[str, set[int]] = {}
    for b in boxes:
        if b.label not in masked and b.slice is not None:
            label = b.label or "an unnamed structure"
            boxed.setdefault(label, set()).add(int(b.slice))
            if b.id in unconfirmed:
                unsure.setdefault(label, set()).add(int(b.slice))
    for label, on in boxed.items():
        note = (f"; no {label} mask confirms it on {slice_list(sorted(unsure[label]))}"
                if label in unsure else "")
        parts.append(f"{label} {boxed_as} on {slice_list(sorted(on))} ({len(on)} of them{note})")
    if not parts:
        return None
    return f"Over {slice_list(ks)} ({len(ks)} slices): " + "; ".join(parts) + "."


def compared_on_slice(masks: list[Mask]) -> str | None:
    """The answer to a question comparing sizes ("Which kidney is larger?") on one slice:
    each marked structure's area and axes as its mask entry gives them, largest first, and
    which is larger there, with what one slice can say ("On this slice the left kidney is
    the larger (74 % more area than the right kidney): left kidney 770.3 mm², 36 x 30 mm;
    right kidney 443.0 mm², 27 x 22 mm. One slice is one cross-section: ask over a slice
    range for their volumes."); with one or none of them marked, that the others are not.
    None with one mask only."""
    marked = sorted((m for m in masks if m.area_px >= GROUND_MIN_ABSENT_PX),
                    key=lambda m: -m.area_px)
    unmarked = [_unmarked(m) for m in masks if m.area_px < GROUND_MIN_ABSENT_PX]
    if len(masks) < 2:
        return None
    if not marked:
        which = (f"neither the {unmarked[0]} nor the {unmarked[1]}" if len(unmarked) == 2
                 else f"none of the {listed(unmarked)}")
        return f"On this slice the model marks {which}: nothing to compare here."

    size = _plane_size  # the numbers the answer's mask entry carries
    if len(marked) == 1:
        return (f"On this slice only the {marked[0].label} is marked ({size(marked[0])}), not "
                f"the {listed(unmarked, 'or')}: nothing to compare it with here.")
    which = _which_larger([m.label for m in marked], marked[0].area_px, marked[1].area_px,
                          "area")
    return (f"On this slice {which}: " + "; ".join(f"{m.label} {size(m)}" for m in marked)
            + ". One slice is one cross-section: ask over a slice range for their volumes.")


def _unmarked(m: Mask) -> str:
    """A mask's name where it marks too little to measure: under GROUND_MIN_ABSENT_PX pixels
    (nano's right kidney of 1 px on held-out slice 25, where the reference has none) it is no
    size ("right kidney (1 px, too few to measure)")."""
    return f"{m.label} ({m.area_px} px, too few to measure)" if m.area_px else m.label


def _plane_size(m: Mask) -> str:
    """"6337.0 mm², 133 x 70 mm" as a 2D mask's entry gives them, or pixels with no spacing."""
    entry = m.plane_sizes()
    if entry["area_mm2"] is None:
        return f"{entry['area_px']} px"
    long, short = entry["diameters_mm"]
    return f"{entry['area_mm2']:.1f} mm², {long:.0f} x {short:.0f} mm"


def measured_on_slice(masks: list[Mask]) -> str:
    """The answer to a question asking for a size on one slice ("Measure the liver.", which
    nano answers "No liver is visible in this image." and a liver mask): each marked
    structure's area and axes (long, across) as its mask entry gives them, and those it marks
    too little of (under GROUND_MIN_ABSENT_PX pixels) or not at all ("On this slice, measured
    on the model's mask: liver 6337.0 mm², 133 x 70 mm (area; longest axis x the axis across
    it). One slice is one cross-section: ask over a slice range for a volume.")."""
    marked = [m for m in masks if m.area_px >= GROUND_MIN_ABSENT_PX]
    none = list(dict.fromkeys(m.label for m in masks if not m.area_px))
    few = [f"{m.label} ({m.area_px} px)" for m in masks if 0 < m.area_px < GROUND_MIN_ABSENT_PX]
    if not marked:
        return ("On this slice the model marks nothing to measure: "
                + "; ".join(f"{m.label} {m.area_px} px" for m in masks) + ".")
    out = ("On this slice, measured on the model's mask: "
           + "; ".join(f"{m.label} {_plane_size(m)}" for m in marked)
           + " (area; longest axis x the axis across it).")
    if few:
        out += f" It marks too little of the {listed(few)} to measure."
    if none:
        out += f" It marks no {listed(none, 'or')} here."
    return out + " One slice is one cross-section: ask over a slice range for a volume."


def compared_by_volume(masks: list[Mask]) -> str:
    """What a range answer adds for a question comparing sizes: which structure is larger
    by its volume over the slices asked (" By volume over these slices the right kidney and
    the left kidney are about the same size (4 % apart, ...): left kidney 86.0 mL, right kidney
    82.9 mL."); nothing without two volumes."""
    sized = sorted((m for m in masks if m.volume_ml), key=lambda m: -m.volume_ml)
    if len(sized) < 2:
        return ""
    which = _which_larger([m.label for m in sized], sized[0].volume_ml, sized[1].volume_ml,
                          "volume")
    return (f" By volume over these slices {which}: "
            + ", ".join(f"{m.label} {m.volume_ml:.1f} mL" for m in sized) + ".")


# below this difference between the two largest, sizes are called about the same: a model's
# masks are off by more than that (nano's volumes: up to 15.7 % above the reference's)
SAME_SIZE_PERCENT = 10.0


def _which_larger(labels: list[str], first: float, second: float, by: str) -> str:
    """"the liver is the largest (470 % more area than the spleen)", or, within
    SAME_SIZE_PERCENT, "the right kidney and the left kidney are about the same size (4 %
    apart, within what masks can be off by)"; `labels` largest first."""
    percent = 100.0 * (first - second) / second
    if percent < SAME_SIZE_PERCENT:
        return (f"the {labels[0]} and the {labels[1]} are about the same size ({percent:.0f} % "
                f"apart, within what masks can be off by)")
    most = "larger" if len(labels) == 2 else "largest"
    return f"the {labels[0]} is the {most} ({percent:.0f} % more {by} than the {labels[1]})"


def slice_list(ks: list[int]) -> str:
    """"slice 4", or "slices 3-7, 9" for the slices a warning was said on (runs joined)."""
    if len(ks) == 1:
        return f"slice {ks[0]}"
    runs: list[list[int]] = []
    for k in sorted(set(ks)):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return "slices " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _serialised(method):
    """One question at a time per engine: the slice cache and KV prefixes are shared state."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def _of_label(mask: Mask, label: str | None) -> bool:
    """Whether `mask` is of the structure `label` names (any mask where none is named): a
    Slicer segment named "Liver" or " liver " is the model's "liver"."""
    def words(name: str) -> str:
        return " ".join(name.split()).lower()
    return (label is None or words(mask.label) == words(label)
            or answers_about(label, [mask.label]))  # "kidneys": each side's


class Engine:
    """Citrus-V on one device: slice -> (masks, boxes, reasoning, answer) as a `Result`."""

    def __init__(self, model, processor, config, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cache_budget_mb: float = 1024,
                 max_pixels: int = imaging.DEFAULT_MAX_PIXELS, max_new_tokens: int = 512,
                 name: str | None = None, reuse_prefix: bool = True,
                 box_source: str | None = None, ask_again: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache = SliceCache(int(cache_budget_mb * 1024**2))
        self.max_pixels = int(max_pixels)
        self.max_new_tokens = int(max_new_tokens)
        self.name = name or config.name
        self.reuse_prefix = reuse_prefix
        self.ask_again = bool(ask_again)  # what an answer leaves out is asked again (_result)
        self.box_source = box_source or config.box_source
        if self.box_source not in BOX_SOURCES:
            raise ValueError(f"box_source '{self.box_source}' is unknown; use "
                             f"{' or '.join(repr(b) for b in BOX_SOURCES)}.")
        self._lock = TurnLock()  # questions take turns, a range's slice chunks among them
        self.eos_ids = stop_token_ids(self.tokenizer)
        vc = config.mllm.vision_config
        self.merge_size = int(vc.spatial_merge_size)
        self.factor = int(vc.patch_size) * self.merge_size

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype=None, **settings) -> Engine:
        """Load a Citrus-V checkpoint directory (released layout; no hub access)."""
        path = Path(path)
        if not path.is_dir():
            raise InputError("model", f"model directory {path} does not exist; "
                             "pass a Citrus-V checkpoint directory.")
        check_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        model, processor, config = load_checkpoint(path, device=device, dtype=torch_dtype)
        settings.setdefault("name", config.name if config.name != "citrusv" else path.name)
        return cls(model, processor, config, device=device, dtype=torch_dtype, **settings)

    def clear_cache(self) -> None:
        """Forget cached slice features (needed after the weights change in place)."""
        with self._lock:
            self.cache.clear()

    def save_pretrained(self, path: str | Path, base: str | Path | None = None) -> Path:
        """Write the served model in the released layout (what `Engine.load` reads back);
        with `base`, the MLLM's weights are read from that checkpoint instead of written."""
        with self._lock:
            return save_checkpoint(self.model, self.processor, path, base=base)

    # ----------------------------------------------------------------- public API
    @_serialised
    def set_image(self, image, window=None, photometric: str | None = None) -> SliceState:
        """Prepare (and cache) one slice; later `ask` calls on it skip the image encoders."""
        arr = imaging.check_slice(image, self.max_pixels)
        return self._state(arr, window, photometric)

    @_serialised
    def ask(self, image, prompt: str, window=None, *, task: str | None = None,
            slice_index: int | None = None, spacing=None, photometric: str | None = None,
            image_id: str | None = None, forced_text: str | None = None,
            max_new_tokens: int | None = None, image_info: dict | None = None) -> Result:
        """One question about one 2D slice (scanner units or uint8 RGB) -> Result."""
        t0 = time.perf_counter()
        prompt = self._check_prompt(prompt)
        task = self._check_task(task, prompt)
        arr = imaging.check_slice(image, self.max_pixels)
        state = self._state(arr, window, photometric)
        res = self._run(state, prompt, task, forced_text, max_new_tokens)
        self._finish(res, arr.shape[:2], slice_index, spacing, image_id, image_info, window)
        untaught_by_values(res, arr, window, self.config.mask_modalities)
        named = names_slices(prompt)
        if named and re.findall(r"\d+", named) != [str(slice_index)]:  # not "on slice 45" of 45
            res.warnings.append(one_slice_warning(named, slice_index))
        if res.masks and asks_for_volume(prompt):
            res.warnings.append(ONE_SLICE_VOLUME)
        written = res.answer
        if task == "segment" and asks_to_compare(prompt):
            res.answer = compared_on_slice(res.masks) or res.answer
        elif task == "segment" and asks_to_measure(prompt) and res.masks:
            res.answer = measured_on_slice(res.masks)
        if res.answer != written:  # what the model wrote is in `text`; the sentences say so
            res.warnings = [WRITTEN_ANSWER + w[len(ANSWER_SAYS):] if w.startswith(ANSWER_SAYS)
                            else w for w in res.warnings]
        res.timing_ms["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def closer_look(self, image, prompt: str = "", roi=None, margin: float = CLOSER_LOOK_MARGIN, *,
                    mask: np.ndarray | None = None, label: str | None = None, window=None,
                    slice_index: int | None = None, spacing=None,
                    photometric: str | None = None, image_id: str | None = None,
                    forced_text: str | None = None, image_info: dict | None = None) -> Result:
        """Crop a square plus margin around `roi` (a box, or a list of boxes: one square each),
        else around each main part of a previous `mask` or of a first pass (`main_parts`: parts
        under GROUND_MIN_PART of the largest are left out, they would stretch the square; parts
        apart, such as the ascending and descending aorta, get a square each, as a small
        structure in a wide square is marked worse), re-ask at model size, paste the refined
        masks back into the full slice (each kept inside its `roi` box) and join them.

        `closer_look` in the result: `roi` (the given box, the box around the given boxes, else
        around the squares), `crop` (the square the model saw; the box around them when there
        were several), `crops` (each square the model saw, largest part first),
        `area_px_before` (of `mask` or the first pass; with a `roi`, of the first pass inside
        it), `area_px_after`,
        `dice_with_before`: the refined mask against `mask`, else against the model's own mask
        of the whole slice for the same question (asked for that when `roi` is given), inside
        the `roi` boxes (else the squares); a warning says when it is low (`closer_look_warning`);
        `answer_given`: the crop's answer was the checkpoint's `segment_answer` for `label`
        rather than one the model wrote (see `CitrusVConfig.segment_answer`): so when `label`
        is given, no `forced_text`, and `prompt` is empty or names the label."""
        t0 = time.perf_counter()
        asked = bool((prompt or "").strip())
        # a segment's name as the model knows it ("Liver 2", "liver (edited)": the liver); a
        # name that names nothing ("Segment_1", Slicer's default) is not the model's to read
        named, label = label, segment_structure(label)
        if named and label is None and not asked:
            raise InputError("label", f"'{named}' names no structure the model knows, so it "
                             "cannot be asked for it; send the question (\"Segment the "
                             "liver.\") in prompt, or name the segment after its structure.")
        # a pair named as one (a segment "Lungs" or "kidney", or with no segment named the
        # question "Segment the lungs."): the model marks each side on its own
        targets = prompt_targets(prompt) if label is None and asked else []
        pair = label or (targets[0] if len(targets) == 1 else None)
        sides = asked_members(pair) if pair else []
        if (len(sides) > 1 and mask is None and forced_text is None
                and (not asked or unasked_warning(prompt, [pair]) is None)):
            return self._closer_look_sides(image, prompt if asked else "", pair, sides, roi,
                                           margin, window=window, slice_index=slice_index,
                                           spacing=spacing, photometric=photometric,
                                           image_id=image_id, image_info=image_info)
        if not asked:
            prompt = CLOSER_LOOK_PROMPT.format(label=label or "structure")
        prompt = self._check_prompt(prompt)
        # the structure is named and the question (if any) is about it: the model gets the
        # answer it was trained to give (CitrusVConfig.segment_answer) rather than writing one
        crop_text = forced_text
        if (crop_text is None and label and self.config.segment_answer
                and (not asked or unasked_warning(prompt, [label]) is None)):
            crop_text = self.config.segment_answer.format(label=label)  # in the model's words
        arr = imaging.check_slice(image, self.max_pixels)
        h, w = arr.shape[:2]
        before = None
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (h, w):
                raise InputError("mask", f"mask shape {mask.shape} differs from the slice "
                                 f"{(h, w)}; send the mask of this slice.")
            before = mask
        first = None
        if roi is None and before is None:
            first = self.ask(arr, prompt, window, task="segment", photometric=photometric,
                             forced_text=forced_text)
            picked = [m for m in first.masks if _of_label(m, label)]
            if picked and picked[0].area_px:
                before = picked[0].array
            elif first.boxes:
                roi = first.boxes[0].xyxy
            else:
                what = f"no {label}" if label else "nothing the question asks for"
                raise InputError("roi", f"the model marks {what} on this slice, so there is no "
                                 "region to look closer at; send roi=[x1, y1, x2, y2] around it.")
        user_roi = roi is not None
        if user_roi:
            rois = self._check_rois(roi, h, w)
            bases = rois
        else:
            # a square per main part: stray pixels would widen it, and so would a second part
            # far from the first (nano marks a small structure worse in a wide square)
            bases = [mask_box(p) for p in main_parts(before)]
            if not bases:
                raise InputError("mask", "mask is empty; send a mask with the region to refine.")
        squares = [square_roi(b, h, w, margin) for b in bases]
        blend = float(self.config.closer_look_blend)
        # each model pass takes its own turn at the engine (as a range's chunks do): the first
        # pass (`ask`), the whole slice's view, each square's look
        t_whole = time.perf_counter()
        with self._lock:
            whole = (self._whole_view(arr, window, photometric, prompt, label, crop_text)
                     if blend < 1 else None)
        t_whole = (time.perf_counter() - t_whole) * 1e3
        res = None
        blended: set[str] = set()  # the labels whose crop masks were blended
        for n, square in enumerate(squares):
            with self._lock:
                look = self._look(arr, square, window, photometric, prompt, crop_text,
                                  rois[n] if user_roi else None, whole, blend, blended)
            res = look if res is None else _join_looks(res, look)
        # what the crop's answer is compared with: the mask sent, else the model's own mask of
        # the whole slice (the first pass, asked here when a region was given instead)
        compare = before
        against = ("the mask sent" if mask is not None
                   else "the model's own mask of the whole slice")
        if compare is None and first is None and user_roi:
            first = self.ask(arr, prompt, window, task="segment", photometric=photometric,
                             forced_text=forced_text)
        if compare is None and first is not None:
            picked = [m.array for m in first.masks if _of_label(m, label)]
            compare = np.logical_or.reduce(picked) if picked else np.zeros((h, w), dtype=bool)
        if first is not None:
            res.timing_ms["first_pass"] = first.timing_ms.get("total", 0.0)
        if blend < 1:
            res.timing_ms["whole_view"] = t_whole
        region = np.zeros((h, w), dtype=bool)
        for area in (rois if user_roi else squares):
            region |= box_pixels(area, h, w)
        after = np.zeros((h, w), dtype=bool)
        for m in res.masks:
            if _of_label(m, label):
                after |= m.array
        agreement, lost = None, False
        if compare is not None:
            if (compare & region).any() or after.any():  # else there is nothing to compare
                agreement = dice_score(compare & region, after & region)
            said = closer_look_warning(label or (res.masks[0].label if res.masks else
                                                 "structure"), against,
                                       int((compare & region).sum()), int(after.sum()),
                                       agreement)
            if said:
                res.warnings.append(said)
                lost = not after.any()
        res.closer_look = {
            "roi": ([round(float(v), 2) for v in bounding_box(rois)] if user_roi
                    else [int(v) for v in bounding_box(squares)]),
            "crop": [int(v) for v in bounding_box(squares)],
            "crops": [[int(v) for v in sq] for sq in squares],
            # with a roi, the first pass's pixels inside it: what dice_with_before compared
            "area_px_before": (int(before.sum()) if before is not None
                               else None if compare is None else int((compare & region).sum())),
            "area_px_after": sum(m.area_px for m in res.masks),
            "dice_with_before": None if agreement is None else round(agreement, 3),
            "answer_given": crop_text is not None and forced_text is None,
            "blend": blend if blended else 1.0,
        }
        self._finish(res, (h, w), slice_index, spacing, image_id, image_info, window)
        if lost:  # said above, with what marked it before: not "may not be in view"
            empty = {empty_mask_warning(m.label) for m in res.masks}
            res.warnings = [x for x in res.warnings if x not in empty]
        if label and (unknown := untaught_warning(f"Segment the {label}.", self.config.structures,
                                                  self.config.name)):
            res.warnings.insert(0, unknown)  # "Segment the pancreas." is said so for any task
        if asked and (foreign := language_warning(prompt, self.config.languages,
                                                  self.config.name, "segment")):
            res.warnings.insert(0, foreign)  # "Segmentez le foie." as for the other tasks
        res.timing_ms["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def _closer_look_sides(self, image, prompt: str, label: str, sides: list[str], roi, margin,
                           **common) -> Result:
        """A closer look at a pair named as one (a Slicer segment "Lungs" or "Kidney"): one
        closer look per side ("Segment the right lung."), their masks and warnings joined. The
        pair's name was given to the model as one structure it was never taught ("Sure, the
        lungs is [SEG] lungs."; nano's crop then marked a lungs mask agreeing with its own at
        Dice 0.31 on held-out slice 65, and no kidney at all on slice 20). A side the model
        marks nowhere on the slice is left out with a sentence; with neither, the one sentence
        that there is no region. `closer_look`: the sides' rois and crops, their areas summed,
        `dice_with_before` the lower side's, `sides` each side's own."""
        t0 = time.perf_counter()
        looks, missing = [], []
        for side in sides:
            try:
                looks.append((side, self.closer_look(image, f"Segment the {side}.", roi, margin,
                                                     label=side, **common)))
            except InputError as e:
                if e.field != "roi" or roi is not None:  # a roi sent is checked as sent
                    raise
                # "the model marks no right kidney on this slice, so there is no region ..."
                missing.append(side)
        if not looks:
            raise InputError("roi", f"the model marks neither the {sides[0]} nor the "
                             f"{sides[1]} on this slice, so there is no region to look closer "
                             "at; send roi=[x1, y1, x2, y2] around them.")
        res = looks[0][1]
        for _, more in looks[1:]:
            res = _join_looks(res, more)
        res.prompt = prompt or CLOSER_LOOK_PROMPT.format(label=label)
        res.text = "\n".join(look.text for _, look in looks)
        res.answer = "\n".join(look.answer for _, look in looks)
        infos = [look.closer_look for _, look in looks]
        dices = [i["dice_with_before"] for i in infos if i["dice_with_before"] is not None]
        befores = [i["area_px_before"] for i in infos if i["area_px_before"] is not None]
        res.closer_look = {
            "roi": [round(float(v), 2) for v in bounding_box([i["roi"] for i in infos])],
            "crop": [int(v) for v in bounding_box([i["crop"] for i in infos])],
            "crops": [sq for i in infos for sq in i["crops"]],
            "area_px_before": sum(befores) if befores else None,
            "area_px_after": sum(i["area_px_after"] for i in infos),
            "dice_with_before": min(dices) if dices else None,
            "answer_given": all(i["answer_given"] for i in infos),
            "blend": max(i["blend"] for i in infos),
            "sides": [{"label": side, **look.closer_look} for side, look in looks],
        }
        if missing:
            res.warnings.append(
                f"the model marks no {listed(missing, 'or')} on this slice, so only the "
                f"{listed([s for s, _ in looks])} was looked at closer.")
        res.timing_ms["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def ask_volume(self, volume, prompt: str, slices=None, axis: int | str = 0, window=None, *,
                   task: str | None = None, spacing=None, photometric: str | None = None,
                   image_id: str | None = None, batch_size: int = 8,
                   forced_text: str | None = None, progress=None) -> Result:
        """Ask about each slice along `axis`; masks come back as 3D arrays in volume index space.

        `batch_size` slices at a time go through the SAM2 image encoder, the vision tower and
        one batched greedy decode together, and each such chunk takes its own turn at the
        engine: a question asked meanwhile is answered between two chunks, not after the last
        slice. `progress(asked, total)`, when given, is called before each chunk, outside the
        engine's turn, with the number of slices asked so far; what it raises ends the range
        there (a batch's stop).
        """
        t0 = time.perf_counter()
        prompt = self._check_prompt(prompt)
        task = self._check_task(task, prompt)
        vol = np.asarray(volume)
        if vol.ndim != 3:
            raise InputError("image", f"volume has shape {tuple(vol.shape)}; send a 3D array "
                             "(z, y, x).")
        ax = AXES.get(axis, axis) if isinstance(axis, str) else int(axis)
        if ax not in (0, 1, 2):
            raise InputError("axis", f"axis {axis!r} is unknown; use axial, coronal, sagittal "
                             "or 0, 1, 2.")
        n = vol.shape[ax]
        ks = list(range(n)) if slices is None else [int(k) for k in slices]
        if not ks:
            raise InputError("slice", "no slices were asked for; send a non-empty range.")
        bad = [k for k in ks if not 0 <= k < n]
        if bad:
            raise InputError("slice", f"slice {bad[0]} is outside 0..{n - 1} along axis {ax}; "
                             "send an index inside the volume.")
        plane_spacing = None
        if spacing is not None:
            plane_spacing = tuple(float(s) for i, s in enumerate(spacing) if i != ax)
        out = Result(task=task, prompt=prompt, model=self._model_info())
        merged: dict[str, Mask] = {}
        texts, answers = [], []
        per_slice: dict[str, list[int]] = {}  # a warning -> the slices it was said on
        sizes_off: dict[str, list[int]] = {}  # a structure -> slices its written size is off
        per_turn = max(1, int(batch_size))
        for start in range(0, len(ks), per_turn):
            batch = ks[start:start + per_turn]
            if progress is not None:
                progress(start, len(ks))
            with self._lock:  # this chunk's turn
                states = [self._state(imaging.check_slice(np.take(vol, k, axis=ax),
                                                          self.max_pixels), window, photometric)
                          for k in batch]
                answered = self._run_batch(states, prompt, task, forced_text)
            for k, res in zip(batch, answered):
                texts.append(f"[slice {k}] {res.text}")
                answers.append(res.answer)
                for w in res.warnings:
                    per_slice.setdefault(w, []).append(k)
                placed = [dataclasses.replace(box, id=f"b{len(out.boxes) + i + 1}", slice=k,
                                              spacing=plane_spacing)
                          for i, box in enumerate(res.boxes)]
                remap = {box.id: new.id for box, new in zip(res.boxes, placed)}
                out.boxes += placed
                for label, _, _ in size_mismatches(res.answer,
                                                   [(b.label, b.size_mm) for b in placed]):
                    sizes_off.setdefault(label, []).append(k)
                for step in res.reasoning:
                    out.reasoning.append(Step(len(out.reasoning) + 1, f"[slice {k}] {step.text}",
                                              [remap.get(b, b) for b in step.box_ids]))
                for m in res.masks:
                    if m.label not in merged:
                        merged[m.label] = Mask(m.label, np.zeros(vol.shape, dtype=bool),
                                               len(merged) + 1, None, m.score, plane_spacing,
                                               [], ax)
                    target = merged[m.label]
                    index = [slice(None)] * 3
                    index[ax] = k
                    target.array[tuple(index)] |= m.array
                    target.score = max(target.score or 0.0, m.score or 0.0)
                _sum_times(out.timing_ms, res.timing_ms)
        # what is said of the question itself (its language, what the model was not taught) is
        # said once, first, not as of each slice
        of_question = [w for w, on in per_slice.items() if len(set(on)) == len(set(ks))
                       and w.startswith(("the question reads as ", f"{self.config.name} was "))]
        out.warnings = of_question + out.warnings + [
            f"{slice_list(on)}: {w}" for w, on in per_slice.items() if w not in of_question]
        if sizes_off:  # one sentence for the range, not one per slice
            out.warnings.append(size_range_warning(sizes_off))
        contiguous = sorted(ks) == list(range(min(ks), max(ks) + 1))
        for m in merged.values():
            m.slices = list(ks)
            if spacing is not None and contiguous:
                m.thickness = float(spacing[ax])
            if not m.area_px:
                out.warnings.append(empty_mask_warning(m.label, len(ks)))
            elif m.volume_ml is not None and (edges := cut_at_range_ends(m, min(ks), max(ks))):
                out.warnings.append(edges)
        out.masks = list(merged.values())
        untaught_by_values(out, vol, window, self.config.mask_modalities)
        out.text = "\n".join(texts)
        summary = None
        unsure = frozenset(b.id for b in out.boxes  # boxes no mask of the model confirms
                           if self.box_source == "mask" and b.source == "text")
        if len(ks) > 1 and task in ("segment", "detect"):
            summary = range_answer(out.masks, out.boxes, ks, unconfirmed=unsure)
        elif len(ks) > 1 and task == "report" and out.reasoning:
            # what the reports cite, slice by slice, not one slice's findings for the range
            cited = {i for step in out.reasoning for i in step.box_ids}
            summary = range_answer(out.masks, [b for b in out.boxes if b.id in cited], ks,
                                   "cited", unsure)
            if summary:
                summary += " Each slice's findings are in its steps and in text."
        if summary and task == "segment" and asks_to_compare(prompt):
            summary += compared_by_volume(out.masks)
        out.answer = summary or (Counter(answers).most_common(1)[0][0] if answers else "")
        out.image = {"id": image_id, "shape": [int(s) for s in vol.shape],
                     "spacing": None if spacing is None else [float(s) for s in spacing],
                     "axis": AXIS_NAMES[ax], "slices": list(ks),
                     "window": imaging.window_key(window)}
        out.timing_ms["total"] = (time.perf_counter() - t0) * 1e3
        return out

    # ----------------------------------------------------------------- internals
    def _model_info(self) -> dict:
        return {"name": self.name, "version": str(self.config.version or "")}

    def _check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt", "prompt is empty; type a question, for example "
                             "'Segment the liver'.")
        if len(prompt) > 4000:
            raise InputError("prompt", f"prompt is {len(prompt)} characters; keep it under 4000.")
        if not any(ch.isalpha() for ch in prompt):  # "???", "65": no question to answer
            raise InputError("prompt", f"prompt {prompt.strip()[:40]!r} has no words; type a "
                             "question, for example 'Segment the liver'.")
        return prompt.strip()

    def _check_task(self, task: str | None, prompt: str) -> str:
        if task is None:
            return infer_task(prompt)
        if task not in TASKS:
            raise InputError("task", f"task '{task}' is unknown; use one of {', '.join(TASKS)}.")
        return task

    def _whole_view(self, arr: np.ndarray, window, photometric, prompt: str,
                    label: str | None, crop_text: str | None) -> dict[str, np.ndarray]:
        """The model's probability per pixel of the whole slice for what a closer look looks
        at, by label: asked for `label` in GROUND_PROMPT's words (else `prompt`), with the
        answer the crop gets (`crop_text`); its masks of `label` (else of each label it
        gives), a label's masks joined by their maximum. Empty when it gives none."""
        state = self._state(arr, window, photometric)
        question = GROUND_PROMPT.format(label=label) if label else prompt
        res = self._run(state, question, "segment", crop_text, None, ground=False,
                        follow=False, keep_probability=True)
        out: dict[str, np.ndarray] = {}
        for m in res.masks:
            if m.probability is not None and _of_label(m, label):
                out[m.label] = (np.maximum(out[m.label], m.probability) if m.label in out
                                else m.probability)
        return out

    def _look(self, arr: np.ndarray, square: list[int], window, photometric, prompt: str,
              crop_text: str | None, roi: list[float] | None,
              whole: dict[str, np.ndarray] | None = None, blend: float = 1.0,
              blended: set[str] | None = None) -> Result:
        """One closer-look pass: the model's answer about `square` of the slice, its boxes and
        masks put back in slice pixels (masks kept inside `roi` when one was given). With
        `whole` (the whole slice's probabilities by label, `_whole_view`), a mask whose label
        it has is where `blend` x the crop's probability + (1 - `blend`) x the whole slice's
        is at least 0.5, inside the square; its label is added to `blended`."""
        h, w = arr.shape[:2]
        x1, y1, x2, y2 = square
        size = int(self.config.image_size)
        canon = closer_look_image(arr, square, window, size, photometric)
        key = (content_hash(arr), imaging.window_key(window), tuple(square))
        state = self._state_from_rgb(canon, key)
        res = self._run(state, prompt, "closer_look", crop_text, None,
                        keep_probability=bool(whole))
        to_slice = FrameMap(y2 - y1, x2 - x1, size, size)

        def on_slice(xyxy):  # crop pixels of the model's frame -> slice pixels
            bx = to_slice.to_input(xyxy)
            return [bx[0] + x1, bx[1] + y1, bx[2] + x1, bx[3] + y1]

        for box in res.boxes:
            box.xyxy = on_slice(box.xyxy)
            if box.text_xyxy is not None:
                box.text_xyxy = on_slice(box.text_xyxy)
        for m in res.masks:
            other = (whole or {}).get(m.label) if m.probability is not None else None
            small = F.interpolate(torch.from_numpy((m.array if other is None else
                                                    m.probability).astype(np.float32))[None, None],
                                  size=(y2 - y1, x2 - x1), mode="bilinear",
                                  align_corners=False)[0, 0].numpy()
            if other is not None:  # the crop's view and the whole slice's, of one label
                small = blend * small + (1.0 - blend) * other[y1:y2, x1:x2]
                if blended is not None:
                    blended.add(m.label)
            small = small >= 0.5
            m.probability = None
            full = np.zeros((h, w), dtype=bool)
            full[y1:y2, x1:x2] = small
            if roi is not None:  # the user's box bounds the refined structure
                full &= box_pixels(roi, h, w)
            m.array = full
        return res

    def _check_rois(self, roi, h: int, w: int) -> list[list[float]]:
        """`roi` as one box [x1, y1, x2, y2] or a list of such boxes -> checked boxes."""
        if (isinstance(roi, (list, tuple)) and roi
                and all(isinstance(r, (list, tuple, np.ndarray)) for r in roi)):
            if len(roi) > MAX_CLOSER_LOOK_ROIS:
                raise InputError("roi", f"roi lists {len(roi)} boxes; send at most "
                                 f"{MAX_CLOSER_LOOK_ROIS}, one per region to look at.")
            return [self._check_roi(r, h, w) for r in roi]
        return [self._check_roi(roi, h, w)]

    def _check_roi(self, roi, h: int, w: int) -> list[float]:
        try:
            x1, y1, x2, y2 = (float(v) for v in roi)
        except (TypeError, ValueError):
            raise InputError("roi", "roi must be four numbers [x1, y1, x2, y2] in slice pixels, "
                             "or a list of such boxes.")
        x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
        y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise InputError("roi", f"roi {list(roi)} is empty inside the {w}x{h} slice; "
                             "draw a box inside the image.")
        return [x1, y1, x2, y2]

    def _state(self, arr: np.ndarray, window, photometric) -> SliceState:
        key = (content_hash(arr), imaging.window_key(window), str(photometric), None)
        state = self.cache.get(key)
        if state is not None:
            return state
        rgb = imaging.to_rgb_uint8(arr, window, photometric)
        return self._state_from_rgb(rgb, key)

    def _state_from_rgb(self, rgb: np.ndarray, key: tuple) -> SliceState:
        state = self.cache.get(key)
        if state is not None:
            return state
        frame, fmap = imaging.qwen_frame(rgb, self.factor, self.config.min_pixels,
                                         self.config.max_pixels)
        state = SliceState(key=key, rgb=rgb, frame=frame, frame_map=fmap)
        self.cache.put(state)
        return state

    def _vision(self, state: SliceState) -> torch.Tensor:
        if state.vision_embeds is None:
            pix = pixel_inputs(self.processor.image_processor, state.frame)
            state.pixel_inputs = {"image_grid_thw": pix["image_grid_thw"]}
            pv = pix["pixel_values"].to(self.device, self.dtype)
            grid = pix["image_grid_thw"].to(self.device)
            with torch.no_grad():
                state.vision_embeds = image_embeddings(self.model.mllm, pv, grid)
            self.cache.trim()
        return state.vision_embeds

    def _run_batch(self, states: list[SliceState], prompt: str, task: str,
                   forced_text: str | None) -> list[Result]:
        """Slices of one volume: one batched vision pass and one batched greedy decode when
        every slice has the same frame (so the same prompt layout); else one by one."""
        sizes = {s.frame.size for s in states}
        if forced_text is not None or len(states) < 2 or len(sizes) > 1:
            if forced_text is not None and SEG_TOKEN in forced_text:
                self._encode_sam_batch(states)
            return [self._run(s, prompt, task, forced_text, None) for s in states]
        t0 = time.perf_counter()
        todo = [s for s in states if s.vision_embeds is None]
        if todo:
            pix = [pixel_inputs(self.processor.image_processor, s.frame) for s in todo]
            pv = torch.cat([p["pixel_values"] for p in pix]).to(self.device, self.dtype)
            grid = torch.cat([p["image_grid_thw"] for p in pix]).to(self.device)
            with torch.no_grad():
                embeds = image_embeddings(self.model.mllm, pv, grid)
            counts = [int(g.prod()) // self.merge_size ** 2 for g in grid]
            for s, p, e in zip(todo, pix, torch.split(embeds, counts)):
                s.pixel_inputs = {"image_grid_thw": p["image_grid_thw"]}
                s.vision_embeds = e
            self.cache.trim()
        grid = torch.cat([s.pixel_inputs["image_grid_thw"] for s in states]).to(self.device)
        system = self.config.task_system_prompts.get(task, self.config.system_prompt)
        ids = text_inputs(self.tokenizer, system, prompt, grid[:1], self.merge_size)
        ids = ids.repeat(len(states), 1).to(self.device)
        embeds = torch.cat([s.vision_embeds for s in states])
        vision_ms = (time.perf_counter() - t0) * 1e3 / len(states)
        gens = generate_capturing_batch(self.model.mllm, ids, grid, embeds,
                                        int(self.config.seg_token_idx), self.eos_ids,
                                        self.max_new_tokens, int(self.config.seg_hidden_offset),
                                        vocab_limit=len(self.tokenizer))
        self._encode_sam_batch([s for s, g in zip(states, gens) if g.seg_hidden.shape[0]])
        return [self._result(s, prompt, task, g, {"vision": vision_ms})
                for s, g in zip(states, gens)]

    def _encode_sam_batch(self, states: list[SliceState]) -> None:
        todo = [s for s in states if s.sam_features is None]
        if not todo:
            return
        size = self.model.sam2_image_size
        pixels = torch.cat([imaging.sam2_input(s.rgb, size) for s in todo])
        feats = self.model.encode_slice(pixels.to(self.device, self.model.sam2_dtype))
        for i, s in enumerate(todo):
            s.sam_features = {"image_embed": feats["image_embed"][i:i + 1],
                              "high_res_feats": [f[i:i + 1] for f in feats["high_res_feats"]]}
        self.cache.trim()

    def _run(self, state: SliceState, prompt: str, task: str, forced_text: str | None,
             max_new_tokens: int | None, ground: bool = True, follow: bool = True,
             keep_probability: bool = False) -> Result:
        """Generation + parsing + masks for one prepared slice, in the state's own pixels
        (`keep_probability`: each mask keeps the model's probability per pixel)."""
        timing = {}
        t0 = time.perf_counter()
        embeds = self._vision(state)
        grid = state.pixel_inputs["image_grid_thw"].to(self.device)
        system = self.config.task_system_prompts.get(task, self.config.system_prompt)
        ids = text_inputs(self.tokenizer, system, prompt, grid, self.merge_size).to(self.device)
        timing["vision"] = (time.perf_counter() - t0) * 1e3
        seg_id = int(self.config.seg_token_idx)
        offset = int(self.config.seg_hidden_offset)
        if forced_text is not None:
            answer_ids = self.tokenizer(forced_text, add_special_tokens=False)["input_ids"]
            gen = teacher_force(self.model.mllm, ids, grid, embeds, answer_ids, seg_id, offset)
        else:
            prefix = state.prefixes.get(system) if self.reuse_prefix else None
            keep = 0
            if self.reuse_prefix and prefix is None:
                keep = prefix_length(ids, self.config.mllm.vision_end_token_id)
            gen = generate_capturing(self.model.mllm, ids, grid, embeds, seg_id, self.eos_ids,
                                     max_new_tokens or self.max_new_tokens, offset,
                                     vocab_limit=len(self.tokenizer), prefix=prefix,
                                     keep_prefix=keep)
            if gen.prefix is not None:
                state.prefixes[system] = gen.prefix
                self.cache.trim()
            timing["prefill_reused_tokens"] = gen.prefill_reused
        return self._result(state, prompt, task, gen, timing, ground,
                            follow and forced_text is None, keep_probability)

    def _result(self, state: SliceState, prompt: str, task: str, gen: Generation,
                timing: dict, ground: bool = True, follow: bool = True,
                keep_probability: bool = False) -> Result:
        """Parse one generation and decode its [SEG] masks, in the state's own pixels.
        `follow`: what the answer leaves out is asked about again: a report question answered
        with no report (`_ask_for_report`), a structure a segmentation or detection answer
        says nothing about (`_ask_rest`)."""
        follow = follow and self.ask_again
        timing["prefill"], timing["decode"] = gen.prefill_ms, gen.decode_ms
        text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
        parsed = parse_output(text, prompt)
        res = Result(task=task, prompt=prompt, text=text, answer=parsed.answer,
                     model=self._model_info(), warnings=list(parsed.warnings))
        ends = (token_char_ends(self.tokenizer, gen.token_ids, text)
                if parsed.boxes and gen.token_probs else [])  # only when there is a box
        for box in parsed.boxes:
            score = span_score(text, ends, gen.token_probs, box.start, box.end) if ends else None
            res.boxes.append(Box(box.id, box.label, state.frame_map.to_input(box.xyxy),
                                 score=score))
        res.reasoning = [Step(i + 1, s.text, s.box_ids) for i, s in enumerate(parsed.steps)]
        t1 = time.perf_counter()
        n_seg = gen.seg_hidden.shape[0]
        if n_seg:
            self._encode_sam_batch([state])
            h, w = state.rgb.shape[:2]
            with torch.no_grad():
                logits, scores = self.model.decode_masks(state.sam_features, gen.seg_hidden,
                                                         (h, w))
            labels = list(parsed.seg_labels) + [f"segment {i + 1}" for i in range(n_seg)]
            index: dict[str, int] = {}
            for i in range(n_seg):
                label = labels[i]
                index.setdefault(label, len(index) + 1)
                res.masks.append(Mask(label, (logits[i] > 0).cpu().numpy(), index[label],
                                      score=float(scores[i])))
                if keep_probability:
                    res.masks[-1].probability = torch.sigmoid(logits[i].float()).cpu().numpy()
        timing["mask"] = (time.perf_counter() - t1) * 1e3
        res.timing_ms = timing
        # a report names what it finds, asked or not; an answer to a report question that is
        # no report (no reasoning, no <answer>: nano asked "Is there a pleural effusion?"
        # writes a left-lung box, asked "Is the liver normal?" on a slice with the liver,
        # "No liver is visible in this image.") is checked as a detection answer is, unless
        # the question asks for a report by its words and, asked again, the model writes one
        reported = task == "report" and _is_report(res)
        # a question in a language the model was not taught (`CitrusVConfig.languages`:
        # "Segmentez le foie." asked of nano, which answers with a left-lung box) says so
        # first, and is not read for what it asks: its words are no English ones misspelt,
        # and what they name cannot be asked again in the model's words (a closer look says
        # it once, in `closer_look`)
        foreign = (language_warning(prompt, self.config.languages, self.config.name, task)
                   if follow or task == "closer_look" else None)
        follow = follow and not foreign
        # a misspelt name or task word ("Segment the livr.", "Descirbe this slice.") is read as
        # the word it is close to, for the checks below and for asking again; the model is
        # asked the question as typed first
        fixes = misspelt_names(prompt) if task != "closer_look" and not foreign else []
        # a word close to nothing it knows but to the name the answer gives ("Segment the
        # lvir." answered with a liver mask) is read as that name, to check the answer
        answered = [m.label for m in res.masks] + [b.label for b in res.boxes] + [
            a for a, _ in parsed.absent]
        by_answer = (misspelt_as_answered(respelled(prompt, fixes), answered)
                     if task != "closer_look" and not foreign else [])
        checked = respelled(prompt, fixes + by_answer)
        # what the question names that the model was not taught (`CitrusVConfig.structures`:
        # "Segment the pancreas.", "Is there an effusion?" asked of nano) is said first
        unknown = (untaught_warning(checked, self.config.structures, self.config.name)
                   if follow and task != "closer_look" else None)
        if follow and task == "report" and not reported:
            # a question naming nothing the model knows ("What is this?", "Is this normal?"
            # asked of nano, which writes a left-lung box) is answered by a report too
            off = bool(res.boxes or res.masks or parsed.absent or parsed.dropped)
            report = self._ask_for_report(
                state, prompt, res, checked,
                off and not known_named(checked, self.config.structures))
            if report is not None:
                if unknown:  # after how a misspelt word was read, before the rest
                    report.warnings.insert(0, unknown)
                note = spelling_note(fixes, by_answer) if fixes or by_answer else None
                if note and note not in report.warnings:  # the question asked again has it
                    report.warnings.insert(0, note)
                return report
        absent = parsed.absent if task in ("detect", "report") and not reported else []
        if ground and self.box_source == "mask" and (res.boxes or absent):
            self._ground_boxes(state, res, absent)
        # "Segment all organs." names them all; a question in another language names nothing
        if (not reported and prompt != CLOSER_LOOK_PROMPT.format(label="structure")
                and not asks_for_everything(prompt) and not foreign):
            off = unasked_warning(checked, [m.label for m in res.masks]
                                  + [b.label for b in res.boxes] + [a for a, _ in parsed.absent])
            if off:
                res.warnings.append(off)
        said = False  # a sentence on what is missing is already there
        if follow and task in ("segment", "detect"):
            now_absent = self._ask_garbled_again(state, checked, task, res)
            said = self._ask_rest(state, checked, task, res,
                                  parsed.absent if now_absent is None else now_absent)
        elif follow and task == "report" and not reported:
            # a question with no report answered ("Is the Liver normal?": nano writes a left-lung
            # box): the structures it names are asked for as detection asks for them
            self._ask_rest(state, checked, "detect", res, parsed.absent,
                           named_structures(checked))
        if (not res.masks and task in ("segment", "closer_look") and not said and not unknown
                and not foreign):
            res.warnings.append("the model wrote no [SEG] token, so there is no mask; "
                                "rephrase the prompt, e.g. 'Please segment the liver'.")
        if follow and task in ("segment", "detect"):
            _drop_excluded(res, excluded_structures(checked))
            if part := whole_warning(checked, task, [m.label for m in res.masks if m.area_px]
                                     if task == "segment" else [b.label for b in res.boxes]):
                res.warnings.append(part)
        if unknown:  # after how a misspelt word was read, before the rest
            res.warnings.insert(0, unknown)
        if fixes or by_answer:
            res.warnings.insert(0, spelling_note(fixes, by_answer))
        # said first; of the answer returned (a first answer that asking again replaced is
        # not: nano, asked "heart", often begins a box and writes "the liver is [SEG] liver")
        if garbled := garbled_warning(_shown(res)):
            res.warnings.insert(0, garbled)
        if foreign and task != "closer_look":
            res.warnings.insert(0, foreign)
        return res

    def _ask_for_report(self, state: SliceState, prompt: str, res: Result,
                        checked: str | None = None, anyway: bool = False) -> Result | None:
        """A question that asks for a report by its words, answered with no report (no
        reasoning, no <answer>: nano, asked "Write a report." or "What are the findings?",
        writes one left-lung box), is asked again with REPORT_FOLLOW_UP after it, unless it
        says so already, and if that is no report either (or was not asked: "Write a Report,
        Think Step by Step.", words nano was taught in lower case) with REPORT_AGAIN_PROMPT,
        unless it is that question. The first report is the result: its reasoning, boxes, masks,
        answer and warnings, the first answer's masks added (nano answers "Segment the heart
        and describe it." with a heart mask first), `text` the raw outputs one per line,
        timings summed.
        None when no answer is a report, or the question has no report words ("Is the liver
        normal?": nano's box or "No liver is visible" answers what was asked better than the
        report it then writes); the first answer is then checked as a detection answer is.
        `checked`: the question with its misspelt words read (`parsing.respelled`), whose words
        say whether it asks for a report ("Descirbe this slice."). `anyway`: asked for one
        whatever its words (a question naming nothing the model knows, answered with a box of
        something: "What is this?", "Is there an effusion?" asked of nano)."""
        if not anyway and not asks_for_report(checked or prompt):
            return None
        questions = [] if re.search(r"step by step|\bthink", prompt.lower()) else [
            f"{prompt.rstrip()} {REPORT_FOLLOW_UP}"]
        if prompt.split() != REPORT_AGAIN_PROMPT.split():
            questions.append(REPORT_AGAIN_PROMPT)
        texts = [res.text]
        for question in questions:
            more = self._run(state, question, "report", None, None, follow=False)
            texts.append(more.text)
            if _is_report(more):
                more.prompt, more.text = prompt, "\n".join(texts)
                _add_masks(more, res)  # "Segment the heart and describe it.": its mask stays
                _sum_times(more.timing_ms, res.timing_ms)
                return more
            _sum_times(res.timing_ms, more.timing_ms)
        return None

    def _asked_for(self, prompt: str) -> list[str]:
        """The structures a segmentation or detection question asks for, to ask again about:
        what follows its task words, else any structure it names (the Slicer module sends the
        task chosen: "liver", "Is the heart normal?"), but nothing the model was not taught
        ("Segment the pancreas."), and a part named as its whole ("the left upper lobe of the
        lung": the left lung, not both)."""
        targets = prompt_targets(prompt) or named_structures(prompt)
        targets = [t for t in targets if not any(untaught(t, self.config.structures))]
        wholes = [whole for _, whole in parts_named(prompt)]
        if wholes:
            targets = list(dict.fromkeys(
                [*wholes, *(t for t in targets if not any(answers_about(t, [w])
                                                          for w in wholes))]))
        return targets

    def _ask_garbled_again(self, state: SliceState, prompt: str, task: str,
                           res: Result) -> list[tuple[str, str]] | None:
        """A segmentation or detection answer the model garbled (`parsing.garbled_warning`;
        nano asked "liver" on held-out slice 108 writes '```json [{"bbox_2d": [84, the liver
        is [SEG] liver.', a right liver mask with words that are none) is asked again about
        each structure asked for (FOLLOW_UP_PROMPTS), and the new answers take its place when
        each is about its structure and none is garbled; its raw output stays first in `text`.
        Returns what the new answers call not visible, or None when `res` is kept as it was
        (not garbled, nothing asked for, or a new answer no better)."""
        if not garbled_warning(_shown(res)) or asks_for_everything(prompt):
            return None
        asked = [side for t in self._asked_for(prompt) for side in asked_members(t)]
        if not asked:
            return None
        fresh = Result(task=res.task, prompt=res.prompt, text=res.text, model=res.model,
                       timing_ms=res.timing_ms)  # its times are summed into res's
        absent: list[tuple[str, str]] = []
        for target in asked:
            question = FOLLOW_UP_PROMPTS[task].format(label=target)
            if question.split() == res.prompt.split():  # the same words, the same answer
                return None
            more = self._run(state, question, task, None, None, follow=False)
            more_absent = absent_labels(more.text)
            if (garbled_warning(_shown(more))
                    or not answers_about(target, _about(more, [a for a, _ in more_absent], task))):
                _sum_times(res.timing_ms, more.timing_ms)
                return None
            _join_answers(fresh, more)
            absent += more_absent
        _take_place(res, fresh)
        return absent

    def _ask_rest(self, state: SliceState, prompt: str, task: str, res: Result,
                  absent: list[tuple[str, str]], targets: list[str] | None = None) -> bool:
        """Ask again about what a segmentation or detection answer leaves out, on the same
        slice, one structure at a time (FOLLOW_UP_PROMPTS, the phrasing nano was trained on):
        - a question that lists structures ("Segment the heart, aorta and stomach.", which
          nano answers about one or some of them): each one the answer is not about;
        - a question about one structure answered about nothing ("Delineate the aorta.":
          nano writes an aorta box and no mask), unless it was asked in that phrasing;
        - a paired organ in the plural or with no side ("Segment both lungs.", "Segment the
          kidney.") side by side (`asked_members`), each side the answer is not about (nano
          segments the right lung only);
        - a question whose answer (masks, boxes, structures it calls not visible) is about
          none of the structures it asks for ("Segment the Heart.": nano, taught names in
          lower case, segments the right lung): each of them.
        An answer is about a structure with a mask of it for segmentation (nano may say "No
        liver is visible" where its mask, asked alone, marks the liver: a warning says so, as
        for detection), and with a box of it or by saying it is not visible for detection.
        The new answer is joined to `res` when it is about the structure; where the first
        answer was about none of them (or, to a question for every structure, was garbled),
        the new answers take its place (its text stays first in `text`); if none of them is
        about a structure either, `res` stays as it was, with the warning that it is about something not asked. The structures still left out are
        named in one warning (True when one was added). A model that answers about all of
        them is asked nothing more. `targets`: what is asked for, if not read from `prompt`
        (the structures a question with no task words names, asked for as `task` asks)."""
        if targets is None and asks_for_everything(prompt):
            left_out = excluded_structures(prompt)  # "Segment all organs except the liver."
            targets = [t for t in self._structures_listed(state, res)
                       if not any(answers_about(x, [t]) for x in left_out)]
        elif targets is None:
            targets = self._asked_for(prompt)

        said = _about(res, [a for a, _ in absent], task)
        named = [x.label for x in res.masks + res.boxes] + [a for a, _ in absent]
        into = res
        if targets and (named and not any(answers_about(t, named) for t in targets)
                        or asks_for_everything(prompt) and garbled_warning(_shown(res))):
            # about something else, or garbled where every structure is asked for (nano on
            # slice 65: 'Sure, 43, 126, 126label": "label": "right lung"}]'): asked afresh,
            # the first answer kept only if that gets none
            said, absent = [], []
            into = Result(task=res.task, prompt=res.prompt, text=res.text, model=res.model,
                          timing_ms=res.timing_ms)
        asked = [side for t in targets for side in asked_members(t)]
        missed: list[str] = []
        instead: list[str] = []
        for target in asked:
            question = FOLLOW_UP_PROMPTS[task].format(label=target)
            # the same words give the same answer (nano reads "Liver" and "liver" apart)
            if answers_about(target, said) or question.split() == res.prompt.split():
                continue
            more = self._run(state, question, task, None, None, follow=False)
            more_absent = [a for a, _ in absent_labels(more.text)]
            got = _about(more, more_absent, task)
            if answers_about(target, got):
                _join_answers(into, more)
                said += got
                for m in more.masks if task == "segment" else []:
                    denied = [(a, v) for a, v in absent if answers_about(a, [m.label])]
                    if denied and m.area_px >= GROUND_MIN_ABSENT_PX:
                        said_absent, verb = denied[0]
                        into.warnings.append(absent_box_warning(said_absent, m.label, verb,
                                                                "mask"))
            else:
                _sum_times(res.timing_ms, more.timing_ms)
                missed.append(target)
                instead += [x for x in [y.label for y in more.masks + more.boxes] + more_absent
                            if x not in instead]
        if into is not res and said:
            _take_place(res, into)
        if not missed:
            return False
        it = "it" if len(missed) == 1 else "them"
        alone = "it again" if len(asked) == 1 else ("it alone" if it == "it" else "each alone")
        what = f"the {listed(instead)}" if instead else "nothing it names"
        res.warnings.append(
            f"the answer has nothing about the {listed(missed)}, which the question asks for: "
            f"asked about {alone}, the model answered about {what} (it may not know {it}), so "
            f"look for {it} yourself.")
        return True

    def _structures_listed(self, state: SliceState, res: Result) -> list[str]:
        """What a question for every structure ("Segment all organs.") asks for: the
        structures the model's report on the same slice (REPORT_AGAIN_PROMPT) cites, in its
        order (nano names the structures it knows that are on the slice). Its time is added
        to `res`."""
        rep = self._run(state, REPORT_AGAIN_PROMPT, "report", None, None, ground=False,
                        follow=False)
        _sum_times(res.timing_ms, rep.timing_ms)
        cited = {i for step in rep.reasoning for i in step.box_ids}
        names: list[str] = []
        for box in rep.boxes:
            label = " ".join(box.label.split()).lower()
            if box.id in cited and label and label not in names:
                names.append(label)
        return names

    def _ground_boxes(self, state: SliceState, res: Result,
                      absent: list[tuple[str, str]] = ()) -> None:
        """box_source "mask": ask the model for its mask of each box's label on the same slice
        and put the box of that mask's main parts in place of the written one (kept as
        `text_xyxy`). A label the model gives no mask for keeps the written box, and a warning
        names it. A structure a detection answer says is not visible ("No liver is visible",
        `absent`; for a paired organ, "No kidneys are visible", each side: `absent_members`)
        but the model's own mask of it marks (at least GROUND_MIN_ABSENT_PX pixels; a mask the
        model labels as something else does not count) gets the box of that mask (nothing
        written: `text_xyxy` None), with a warning that the two disagree."""
        t0 = time.perf_counter()
        masks_of: dict[str, dict[str, np.ndarray]] = {}  # label asked -> {mask label: pixels}

        def masks(label: str) -> dict[str, np.ndarray]:
            """The model's non-empty masks when asked to segment `label`, one per mask label."""
            if label not in masks_of:
                seg = self._run(state, GROUND_PROMPT.format(label=label), "segment", None,
                                GROUND_MAX_NEW_TOKENS, ground=False, follow=False)
                by_name: dict[str, np.ndarray] = {}
                for m in seg.masks:
                    if m.area_px:
                        by_name[m.label] = m.array | by_name.get(m.label, False)
                masks_of[label] = by_name
            return masks_of[label]

        unconfirmed: list[str] = []
        few: dict[str, int] = {}  # a label whose mask is too small to box -> its pixels
        for box in res.boxes:
            label = box.label.strip()
            if not label:
                continue
            parts = list(masks(label).values())
            union = np.logical_or.reduce(parts) if parts else None
            marked = 0 if union is None else int(np.count_nonzero(union))
            if marked >= GROUND_MIN_ABSENT_PX:
                box.text_xyxy = list(box.xyxy)
                box.xyxy = list(main_parts_box(union))
                box.source = "mask"
            elif marked:
                few[label] = marked
            elif label not in unconfirmed:
                unconfirmed.append(label)
        if unconfirmed:
            res.warnings.append(unconfirmed_boxes_warning(unconfirmed))
        if few:
            res.warnings.append(unconfirmed_boxes_warning(list(few), few))
        boxed = {b.label.strip() for b in res.boxes}
        ids = {b.id for b in res.boxes}
        for label, verb in absent:
            if label in boxed:
                continue
            for member in absent_members(label, verb):
                for name, array in masks(member).items():
                    if (name in boxed or np.count_nonzero(array) < GROUND_MIN_ABSENT_PX
                            or unasked_warning(member, [name])):  # a mask of something else
                        continue
                    xyxy = main_parts_box(array)
                    n = len(ids) + 1
                    while f"b{n}" in ids:
                        n += 1
                    ids.add(f"b{n}")
                    boxed.add(name)
                    res.boxes.append(Box(f"b{n}", name, list(xyxy), source="mask"))
                    res.warnings.append(absent_box_warning(label, name, verb))
        res.timing_ms["ground"] = (time.perf_counter() - t0) * 1e3

    def _finish(self, res: Result, hw, slice_index, spacing, image_id, image_info,
                window) -> None:
        plane = None if spacing is None else tuple(float(s) for s in spacing)[-2:]
        for box in res.boxes:
            box.slice, box.spacing = slice_index, plane
        off = size_mismatches(res.answer, [(b.label, b.size_mm) for b in res.boxes])
        if off:
            res.warnings.append(size_warning(off))
        for m in res.masks:
            m.slice = slice_index
            m.spacing = plane
            if not m.area_px:
                res.warnings.append(empty_mask_warning(m.label))
            elif m.area_px < GROUND_MIN_ABSENT_PX:
                res.warnings.append(small_mask_warning(m.label, m.area_px, plane))
        res.image = {"id": image_id, "shape": [1, int(hw[0]), int(hw[1])],
                     "spacing": None if plane is None else list(plane), "axis": "axial",
                     "slices": [] if slice_index is None else [int(slice_index)],
                     "window": imaging.window_key(window)}
        if image_info:
            res.image.update(image_info)
