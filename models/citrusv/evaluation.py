"""Score a Citrus-V checkpoint on the held-out slice blocks of the sample CT.

`citrusv eval --model models/nano` asks, on every held-out axial slice, one segmentation and one
detection question per structure and one report question, through the public `Engine`, and
prints Dice per structure (summed over the held-out slices), detection precision@IoU0.5,
report citation precision (cited structures really on the slice) and cited-box IoU. Where the
engine has a closer look, it also asks one at the model's own mask of each structure on the
slice, as the Slicer module does, and scores the refined mask against the same reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .nano_data import (HELD_OUT_BLOCKS, MIN_AREA_PX, NAMES, CTStudy, eval_window, load_study,
                        mask_box)

SEGMENT_PROMPT = "Please segment the {s} in this scan."
DETECT_PROMPT = "Locate the {s}, output its bbox coordinates using JSON format."
REPORT_PROMPT = "Write a report for this CT slice. Think step by step."
# detection is also scored on the boxes whose score (the model's probability of the box's
# numbers) is at least this: how well the score tells right boxes from wrong ones
SCORE_LINE = 0.5
TARGETS = {"mean_dice": 0.75, "dice_lungs_liver": 0.85, "detection_precision": 0.6,
           "citation_precision": 0.8}


def held_out_slices() -> list[int]:
    return [k for a, b in HELD_OUT_BLOCKS for k in range(a, b + 1)]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise_label(label: str) -> str:
    """Model labels -> our structure names ('Left Kidney', 'kidney_left' -> 'left kidney')."""
    low = " ".join(label.lower().replace("_", " ").split())
    if low in NAMES:
        return low
    parts = low.split()
    if len(parts) == 2 and " ".join(parts[::-1]) in NAMES:
        return " ".join(parts[::-1])
    for name in NAMES:
        if name in low:
            return name
    return low


def _summed_dice(inter: int, total: int) -> float | None:
    """Dice from overlap and size sums over many slices; None where both masks are empty."""
    return 2.0 * inter / total if total else None


def _union(masks, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for m in masks:
        out |= np.asarray(m.array, dtype=bool)
    return out


def _written(box) -> list[float] | None:
    """The box as the model wrote it (with box_source "mask" the engine returns another);
    None for a box the model did not write (a mask's box where its answer said "No ...")."""
    if getattr(box, "text_xyxy", None) is not None:
        return box.text_xyxy
    return None if getattr(box, "source", "text") == "mask" else box.xyxy


class _Detections:
    """Detection tallies over the held-out questions for one kind of box."""

    def __init__(self, structures: list[str]) -> None:
        self.right = self.boxes = 0
        self.found_by = {s: [0, 0] for s in structures}  # [present slices found, present]
        self.ious: list[float] = []

    def add(self, asked: str, boxes: list[tuple[str, list[float]]], ref_box) -> list[bool]:
        """Score the boxes answered to a question about `asked` (`ref_box` None: absent)."""
        rights = []
        for label, xyxy in boxes:
            iou = box_iou(xyxy, ref_box) if ref_box is not None else 0.0
            rights.append(normalise_label(label) == asked and iou >= 0.5)
            if ref_box is not None:
                self.ious.append(iou)
        self.boxes += len(boxes)
        self.right += sum(rights)
        if ref_box is not None:
            self.found_by[asked][0] += int(any(rights))
            self.found_by[asked][1] += 1
        return rights

    def scores(self, prefix: str) -> dict:
        found = sum(f for f, _ in self.found_by.values())
        present = sum(n for _, n in self.found_by.values())
        return {f"{prefix}_precision": self.right / self.boxes if self.boxes else None,
                f"{prefix}_recall": found / present if present else None,
                f"{prefix}_found": self.found_by,
                f"{prefix}_boxes": self.boxes,
                f"{prefix}_mean_iou": float(np.mean(self.ious)) if self.ious else None}


def evaluate(engine, study: CTStudy, slices: list[int] | None = None,
             structures: list[str] | None = None, report: bool = True,
             progress=None, window: str | None = None) -> dict:
    """Run the held-out protocol through `engine.ask`; return all scores as a dict.
    `window`: one CT window for every question (as a radiologist who keeps one); None, the
    protocol's: lung for the lungs, abdomen for the rest and for the report.

    Closer looks (when `engine` has `closer_look`): for each structure on the slice (>=
    MIN_AREA_PX) whose segmentation mask is not empty, `engine.closer_look` with that mask;
    Dice of the masks before and after, summed over those looks, and how many looks the
    engine warned about (its "the closer look ..." sentences)."""
    slices = held_out_slices() if slices is None else list(slices)
    structures = NAMES if structures is None else list(structures)
    t0 = time.perf_counter()
    inter = {s: 0 for s in structures}
    sums = {s: 0 for s in structures}
    ref_px = {s: 0 for s in structures}
    det = _Detections(structures)  # the boxes the engine returns
    written = _Detections(structures)  # the boxes as the model wrote them (box_source "text")
    det_scored: list[tuple[float | None, bool]] = []  # (box score, right) for every box
    found_scored = 0  # present structures with a right box scored >= SCORE_LINE
    cite_ok = cite_total = 0
    cite_ious: list[float] = []
    written_cite_ious: list[float] = []
    present_total = present_cited = 0
    steps_with_box = steps_total = 0
    looks = {s: {"looks": 0, "warned": 0, "inter_before": 0, "sum_before": 0,
                 "inter_after": 0, "sum_after": 0} for s in structures}
    closer = getattr(engine, "closer_look", None)
    for n, k in enumerate(slices):
        image = study.volume[k]
        refs = {s: study.mask(s, k) for s in structures}
        on = {s for s in structures if refs[s].sum() >= MIN_AREA_PX}
        for s in structures:
            shown = window or eval_window(s)
            res = engine.ask(image, SEGMENT_PROMPT.format(s=s), window=shown, task="segment",
                             max_new_tokens=24)
            pred = _union(res.masks, image.shape)
            ref = refs[s]
            inter[s] += int(np.logical_and(pred, ref).sum())
            sums[s] += int(pred.sum() + ref.sum())
            ref_px[s] += int(ref.sum())
            if closer is not None and s in on and pred.any():
                look = closer(image, "", mask=pred, label=s, window=shown)
                after = _union(look.masks, image.shape)
                tally = looks[s]
                tally["looks"] += 1
                tally["warned"] += int(any(w.startswith("the closer look")
                                           for w in look.warnings))
                for when, m in (("before", pred), ("after", after)):
                    tally[f"inter_{when}"] += int(np.logical_and(m, ref).sum())
                    tally[f"sum_{when}"] += int(m.sum() + ref.sum())

            res = engine.ask(image, DETECT_PROMPT.format(s=s), window=shown, task="detect",
                             max_new_tokens=48)
            ref_box = mask_box(ref) if s in on else None
            rights = det.add(s, [(b.label, b.xyxy) for b in res.boxes], ref_box)
            written.add(s, [(b.label, xyxy) for b in res.boxes
                            if (xyxy := _written(b)) is not None], ref_box)
            det_scored += [(b.score, r) for b, r in zip(res.boxes, rights)]
            found_scored += int(any(r and b.score is not None and b.score >= SCORE_LINE
                                    for b, r in zip(res.boxes, rights)))
        if report:
            res = engine.ask(image, REPORT_PROMPT, window=window or "abdomen", task="report",
                             max_new_tokens=400)
            boxes = {b.id: b for b in res.boxes}
            cited_names = set()
            for step in res.reasoning:
                steps_total += 1
                steps_with_box += int(bool(step.box_ids))
                for bid in step.box_ids:
                    box = boxes.get(bid)
                    if box is None:
                        continue
                    name = normalise_label(box.label)
                    cite_total += 1
                    cited_names.add(name)
                    if name in on:
                        cite_ok += 1
                        cite_ious.append(box_iou(box.xyxy, mask_box(refs[name])))
                        written_cite_ious.append(box_iou(_written(box), mask_box(refs[name])))
                    else:
                        cite_ious.append(0.0)
                        written_cite_ious.append(0.0)
            present_total += len(on)
            present_cited += len(on & cited_names)
        if progress is not None:
            progress(n + 1, len(slices))
    dice = {s: _summed_dice(inter[s], sums[s]) for s in structures}
    scored = [v for v in dice.values() if v is not None]
    det_present = sum(n for _, n in det.found_by.values())
    kept = [right for score, right in det_scored if score is not None and score >= SCORE_LINE]
    out = {
        "slices": slices,
        "dice": dice,
        "reference_pixels": ref_px,
        "mean_dice": float(np.mean(scored)) if scored else None,
        "box_source": getattr(engine, "box_source", "text"),
        **det.scores("detection"),
        **written.scores("written_detection"),
        "detection_box_scores": det_scored,
        "scored_detection_precision": sum(kept) / len(kept) if kept else None,
        "scored_detection_recall": found_scored / det_present if det_present else None,
        "scored_detection_boxes": len(kept),
        "citation_precision": cite_ok / cite_total if cite_total else None,
        "citation_recall": present_cited / present_total if present_total else None,
        "cited_box_iou": float(np.mean(cite_ious)) if cite_ious else None,
        "written_cited_box_iou": float(np.mean(written_cite_ious)) if written_cite_ious else None,
        "cited_boxes": cite_total,
        "steps_citing_boxes": steps_with_box / steps_total if steps_total else None,
        "closer_look": {s: {"looks": t["looks"], "warned": t["warned"],
                            **{f"dice_{when}": _summed_dice(t[f"inter_{when}"], t[f"sum_{when}"])
                               for when in ("before", "after")}}
                        for s, t in looks.items()} if closer is not None else None,
        "window": window,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _target_line(name: str, value, target: float) -> str:
    if value is None:
        return f"| {name} | n/a | ≥ {target} | missed |"
    return f"| {name} | {value:.3f} | ≥ {target} | {'met' if value >= target else 'MISSED'} |"


def format_table(scores: dict) -> str:
    """Markdown tables: Dice per structure, then the other metrics against the issue targets."""
    lines = [f"Every question in the {scores['window']} window (the targets are set for lung "
             "for the lungs, abdomen otherwise).", ""] if scores.get("window") else []
    lines += ["| structure | Dice | reference px | detected (IoU ≥ 0.5) / slices present: boxes "
              "returned | boxes as written |", "|---|---|---|---|---|"]
    written = scores.get("written_detection_found") or scores["detection_found"]
    for s, v in scores["dice"].items():
        found, present = scores["detection_found"][s]
        lines.append(f"| {s} | {_fmt(v)} | {scores['reference_pixels'][s]} | {found} / {present} "
                     f"| {written[s][0]} / {present} |")
    lines.append(f"| **mean** | **{_fmt(scores['mean_dice'])}** | | | |")
    lines += ["", "| metric | value | target | |", "|---|---|---|---|"]
    lines.append(_target_line("mean Dice (10 structures)", scores["mean_dice"],
                              TARGETS["mean_dice"]))
    for s in ("right lung", "left lung", "liver"):
        lines.append(_target_line(f"Dice {s}", scores["dice"].get(s),
                                  TARGETS["dice_lungs_liver"]))
    source = scores.get("box_source", "text")
    lines.append(_target_line(f"detection precision@IoU0.5, boxes returned (box_source "
                              f"{source})", scores["detection_precision"],
                              TARGETS["detection_precision"]))
    lines.append(_target_line("detection precision@IoU0.5, boxes as the model wrote them",
                              scores["written_detection_precision"],
                              TARGETS["detection_precision"]))
    lines.append(_target_line("report citation precision", scores["citation_precision"],
                              TARGETS["citation_precision"]))
    lines.append(f"| detection recall@IoU0.5, returned / as written | "
                 f"{_fmt(scores['detection_recall'])} / "
                 f"{_fmt(scores['written_detection_recall'])} | | |")
    lines.append(f"| detection mean IoU (boxes on present structures), returned / as written | "
                 f"{_fmt(scores['detection_mean_iou'])} / "
                 f"{_fmt(scores['written_detection_mean_iou'])} | | |")
    lines.append(f"| detection precision / recall, boxes scored ≥ {SCORE_LINE} "
                 f"({scores['scored_detection_boxes']} boxes) | "
                 f"{_fmt(scores['scored_detection_precision'])} / "
                 f"{_fmt(scores['scored_detection_recall'])} | | |")
    lines.append(f"| report cited-box IoU, returned / as written | "
                 f"{_fmt(scores['cited_box_iou'])} / "
                 f"{_fmt(scores['written_cited_box_iou'])} | | |")
    lines.append(f"| report citation recall (present structures cited) | "
                 f"{_fmt(scores['citation_recall'])} | | |")
    lines.append(f"| report steps that cite a box | {_fmt(scores['steps_citing_boxes'])} | | |")
    if scores.get("closer_look"):
        lines += ["", "| closer look at the model's own mask | looks | Dice before -> after | "
                  "looks warned about |", "|---|---|---|---|"]
        for s, t in scores["closer_look"].items():
            lines.append(f"| {s} | {t['looks']} | {_fmt(t['dice_before'])} -> "
                         f"{_fmt(t['dice_after'])} | {t['warned']} |")
        total = {k: sum(t[k] for t in scores["closer_look"].values())
                 for k in ("looks", "warned")}
        lines.append(f"| **all** | **{total['looks']}** | | **{total['warned']}** |")
    if list(scores["slices"]) == held_out_slices():
        where = "Held-out axial slices " + ", ".join(f"{a}–{b}" for a, b in HELD_OUT_BLOCKS)
    else:
        where = "Axial slices " + ", ".join(str(k) for k in scores["slices"])
    lines.append("")
    lines.append(f"{where} ({len(scores['slices'])} slices); Dice summed "
                 f"over those slices; {scores['detection_boxes']} detection boxes, "
                 f"{scores['cited_boxes']} cited report boxes; {scores['seconds']} s.")
    return "\n".join(lines)


def missed_targets(scores: dict) -> list[str]:
    """The issue's targets these scores miss, as sentences; the boxes the engine returns stand
    for detection (the rule models/nano was shipped by). Empty: all met."""
    checks = [("mean Dice", scores.get("mean_dice"), TARGETS["mean_dice"])]
    checks += [(f"{s} Dice", scores["dice"].get(s), TARGETS["dice_lungs_liver"])
               for s in ("right lung", "left lung", "liver")]
    checks += [("detection precision@IoU0.5 (boxes returned)", scores.get("detection_precision"),
                TARGETS["detection_precision"]),
               ("report citation precision", scores.get("citation_precision"),
                TARGETS["citation_precision"])]
    return [_shortfall(name, value, target) if value is not None
            else f"{name} n/a (target {target})"
            for name, value, target in checks if value is None or value < target]


def _shortfall(name: str, value: float, target: float) -> str:
    return f"{name} {_fmt(value)} < {target} (by {target - value:.3f})"


def written_detection_miss(scores: dict) -> str | None:
    """The boxes as the model writes them against the detection target, as `missed_targets`
    words a miss; None when they meet it or were not scored."""
    value, target = scores.get("written_detection_precision"), TARGETS["detection_precision"]
    if value is None or value >= target:
        return None
    return _shortfall("precision@IoU0.5", value, target)


def evaluate_model(model_dir, threads: int = 1, slices: list[int] | None = None,
                   json_path=None, progress=None, device: str = "cpu", dtype=None,
                   sample_data=None, window: str | None = None) -> dict:
    """Load `model_dir`, score it on the held-out blocks (or `slices`), write JSON if asked."""
    from .engine import Engine

    study = load_study(sample_data)
    torch.set_num_threads(threads)
    engine = Engine.load(model_dir, device=device, dtype=dtype)
    scores = evaluate(engine, study, slices=slices, progress=progress, window=window)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(scores, indent=1))
    return scores


def _progress(i: int, n: int) -> None:
    print(f"\rslice {i}/{n}", end="", flush=True)


def eval_cli(args) -> int:
    """`citrusv eval --model DIR`: print the table (and write JSON with --json)."""
    from .errors import InputError
    from .imaging import WINDOWS

    if args.window is not None and args.window not in WINDOWS:
        raise InputError("window", f"--window must be one of {', '.join(sorted(WINDOWS))}, not "
                         f"{args.window!r}.")
    scores = evaluate_model(args.model, args.threads, json_path=args.json, progress=_progress,
                            device=args.device, dtype=args.dtype, sample_data=args.sample_data,
                            window=args.window)
    print()
    print(format_table(scores))
    return 0
