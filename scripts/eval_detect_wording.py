"""How models/nano answers detection questions in wording it was not trained on, as typed and
with the engine asking again (docs/api.md, "Asked again"), scored as `citrusv eval` scores
detection (the boxes returned, box_source "mask"): precision@IoU 0.5 and recall over the
held-out slices, one question per structure and slice, for
- nano's own question ("Locate the liver, output its bbox coordinates using JSON format."),
- the same with the name capitalised ("Locate the Right Kidney, ..."; nano was taught names
  in lower case),
- other words ("Draw a box around the liver.", "Identify the liver."),
- "Show the liver." and "Point out the liver." (detection questions since 2026-12-05),
- names with a typo, a letter left out ("Locate the lier, ...", "Find the kidey."; read as
  the names they are close to since 2026-12-05's fourth session),
- sides shortened, for the four sided structures, lungs and kidneys ("Locate the rt
  kidney, ...", "Find the L lung."; read as "right" and "left" since the same session),
- task words with a typo ("Locte the liver.", "Idenify the liver."; read as the task words
  they are close to since the same session),
- names alone with the task given, as the Slicer module sends the task chosen ("liver",
  "Right Kidney?" with Detect),
- questions with no task words that name the structure ("Is the liver normal?", "Does the
  Liver look normal?"; report questions, whose structures are asked for as detection asks for
  them when the answer is no report, since the same session), and the same with two
  letters swapped in the name ("Is the lievr normal?") and with a letter of the name left out
  ("Is the lier normal?"; read as the name since 2026-12-05's fifth session),
The task is picked from the words, as for a radiologist's question. One thread.

    .venv/bin/python scripts/eval_detect_wording.py
"""

from __future__ import annotations

from eval_wording import SIDED, both_ways, short_sides, swap, typo

from citrusv import Engine
from citrusv.evaluation import DETECT_PROMPT, _Detections
from citrusv.nano_data import MIN_AREA_PX, NAMES, eval_window, mask_box

WORDINGS = {"nano's question": [DETECT_PROMPT],
            "names with capitals": [DETECT_PROMPT.replace("{s}", "{S}")],
            "other words": ["Draw a box around the {s}.", "Identify the {s}."],
            "show, point out": ["Show the {s}.", "Point out the {s}."],
            "names with a typo": [DETECT_PROMPT.replace("{s}", "{t}"), "Find the {t}."],
            "task words with a typo": [f"{typo('Locate')} the {{s}}.",
                                       f"{typo('Identify')} the {{s}}."],
            "no task words": ["Is the {s} normal?", "Does the {S} look normal?"],
            "no task words, letters swapped": ["Is the {w} normal?"],
            "no task words, a letter dropped": ["Is the {t} normal?"],
            "sides shortened": [DETECT_PROMPT.replace("{s}", "{rt}"), "Find the {R}."],
            "names alone, task chosen": ["{s}", "{S}?"]}


def run(engine: Engine, study, slices) -> dict[str, _Detections]:
    tallies = {k: _Detections(SIDED if k == "sides shortened" else NAMES) for k in WORDINGS}
    for k in slices:
        image = study.volume[k]
        for s in NAMES:
            ref = study.mask(s, k)
            ref_box = mask_box(ref) if ref.sum() >= MIN_AREA_PX else None
            for kind, phrasings in WORDINGS.items():
                if kind == "sides shortened" and s not in SIDED:
                    continue
                for p in phrasings:
                    words = short_sides(s) if s in SIDED else {}
                    res = engine.ask(image, p.format(s=s, S=s.title(), t=typo(s), w=swap(s),
                                                     **words),
                                     window=eval_window(s),
                                     task="detect" if kind == "names alone, task chosen" else None)
                    tallies[kind].add(s, [(b.label, b.xyxy) for b in res.boxes], ref_box)
    return tallies


def main() -> None:
    results = both_ways(run)
    print("| question | P@0.5 as typed | P@0.5 asked again | recall as typed | recall asked "
          "again | boxes, as typed / asked again |")
    print("|---|---|---|---|---|---|")
    for kind in WORDINGS:
        typed, again = results[False][kind].scores("d"), results[True][kind].scores("d")
        print(f"| {kind} | {typed['d_precision']:.3f} | {again['d_precision']:.3f} | "
              f"{typed['d_recall']:.3f} | {again['d_recall']:.3f} | "
              f"{typed['d_boxes']} / {again['d_boxes']} |")


if __name__ == "__main__":
    main()
