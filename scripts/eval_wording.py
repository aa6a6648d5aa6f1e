"""How models/nano segments when asked in wording it was not trained on, as typed and with the
engine asking again (docs/api.md, "Asked again"): Dice summed over the held-out slices (all
30, every structure, as `citrusv eval` sums it) for
- one structure in other words ("Delineate the liver.", "Outline ...", "Contour ..."),
- nano's own question ("Please segment the liver in this scan."), for comparison,
- names with capitals ("Segment the Liver.", "Please segment the Right Kidney in this
  scan."; nano was taught names in lower case),
- "Highlight the liver." and "How big is the liver?" (segmentation questions since
  2026-12-05: the mask's area in mm² answers the size),
- "Label the liver." and "Draw the liver." (segmentation questions since 2026-12-05's
  twenty-sixth session: an annotation tool's verb opening a question),
- names with a typo, a letter left out ("Segment the lier.", "Please segment the left kidey
  in this scan."; read as the names they are close to since 2026-12-05's fourth session),
- task words with a typo ("Segent the liver.", "Delieate the liver."; read as the task
  words they are close to since the same session),
- names alone with the task given, as the Slicer module sends the task chosen ("liver",
  "Right Kidney?" with Segment; asked again about the structures they name since the
  fourth 2026-12-05 session),
- sides shortened, for the four sided structures, lungs and kidneys ("Segment the rt
  kidney.", "Please segment the L lung in this scan."; read as "right" and "left" since the
  same session),
- a part of a structure nano marks only as a whole ("Segment the left upper lobe.", "...
  the RLL.", "... the left ventricle.", "... the caudate lobe."), scored against the whole
  (asked again for the whole since 2026-12-05's twenty-sixth session),
- one question listing every structure on the slice ("Segment the right lung, the heart and
  the aorta."; on a slice with none of them, not asked, so scored as an empty mask),
- "Segment all organs." (naming none: the engine asks the model's report which are there,
  since the third 2026-12-05 session),
- both of a pair ("Segment both kidneys.", "Segment both lungs."), and a pair's name with no
  side ("Segment the kidney.", "Segment the lung."),
and how many answers came with no mask at all. One thread.

    .venv/bin/python scripts/eval_wording.py [--only "annotation verbs" ...]

`--only` scores the rows named (each question is asked on its own, so a row's figures are
the same alone or with the others).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from citrusv import Engine
from citrusv.evaluation import held_out_slices
from citrusv.nano_data import (HELD_OUT_BLOCKS, MIN_AREA_PX, NAMES, PAIRS, eval_window,
                               load_study)

NANO = Path(__file__).resolve().parents[1] / "models" / "nano"


def typo(name: str) -> str:
    """The name with the middle letter of its longest word left out ("liver" -> "lier",
    "left kidney" -> "left kidey", "spinal cord" -> "spial cord")."""
    words = name.split()
    i = max(range(len(words)), key=lambda j: len(words[j]))
    w = words[i]
    words[i] = w[:len(w) // 2] + w[len(w) // 2 + 1:]
    return " ".join(words)


def swap(name: str) -> str:
    """The name with the two middle letters of its longest word swapped ("liver" -> "lievr",
    "left kidney" -> "left kindey")."""
    words = name.split()
    i = max(range(len(words)), key=lambda j: len(words[j]))
    w, k = words[i], (len(words[i]) - 1) // 2
    words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2:]
    return " ".join(words)


ONE = {"other words": ["Delineate the {s}.", "Outline the {s}.", "Contour the {s}."],
       "nano's question": ["Please segment the {s} in this scan."],
       "names with capitals": ["Segment the {S}.", "Please segment the {S} in this scan."],
       "highlight, size words": ["Highlight the {s}.", "How big is the {s}?"],
       "annotation verbs": ["Label the {s}.", "Draw the {s}."],
       "names with a typo": ["Segment the {t}.", "Please segment the {t} in this scan."],
       "task words with a typo": [f"{typo('Segment')} the {{s}}.",
                                  f"{typo('Delineate')} the {{s}}."]}
PAIR_WORDINGS = {"both of a pair": "Segment both {pair}.", "a pair's name with no side":
                 "Segment the {one}."}
# a part of a structure nano marks only as a whole (`citrusv.parsing.whole_of`), scored against
# the whole: the engine asks again for the whole and says the mask is the whole's
PART_OF = {"left lung": "left upper lobe", "right lung": "RLL", "heart": "left ventricle",
           "liver": "caudate lobe", "stomach": "gastric fundus",
           "left kidney": "left renal pelvis", "right kidney": "right renal pelvis"}
PARTS = {"a part, scored as its whole": "Segment the {part}."}
# asked with the task given, as the Slicer module sends the task chosen
CHOSEN = {"names alone, task chosen": ["{s}", "{S}?"]}
SIDED = [s for s in NAMES if s.split()[0] in ("left", "right")]
SHORT = {"sides shortened": ["Segment the {rt}.", "Please segment the {R} in this scan."]}


def short_sides(name: str) -> dict[str, str]:
    """The name with its side shortened two ways ("right lung" -> rt="rt lung", R="R lung")."""
    side, rest = name.split(" ", 1)
    return {"rt": f"{side[0]}t {rest}", "R": f"{side[0].upper()} {rest}"}


class Tally:
    def __init__(self) -> None:
        self.inter = {s: 0 for s in NAMES}
        self.sums = {s: 0 for s in NAMES}
        self.asked = self.no_mask = 0

    def add(self, name: str, pred: np.ndarray, ref: np.ndarray) -> None:
        self.inter[name] += int(np.logical_and(pred, ref).sum())
        self.sums[name] += int(pred.sum() + ref.sum())

    def answer(self, res) -> None:
        self.asked += 1
        self.no_mask += int(not res.masks)

    def mean(self, names=NAMES) -> float:
        return float(np.mean([2 * self.inter[s] / self.sums[s] if self.sums[s] else 1.0
                              for s in names]))


def masks_of(res, name: str, shape) -> np.ndarray:
    """The answer's masks whose label is the structure (or, for a side, its pair's name)."""
    pair = next((p for p, sides in PAIRS.items() if name in sides), None)
    out = np.zeros(shape, dtype=bool)
    for m in res.masks:
        if m.label == name or (pair and m.label == pair):
            out |= m.array
    return out


ROWS = [*ONE, *CHOSEN, *SHORT, *PARTS, "one question listing all", "all organs",
        *PAIR_WORDINGS]


def run(engine: Engine, study, slices, only=None) -> dict[str, Tally]:
    tallies = {k: Tally() for k in ROWS if only is None or k in only}
    for k in slices:
        image = study.volume[k]
        refs = {s: study.mask(s, k) for s in NAMES}
        for kind, phrasings in ONE.items():
            if kind not in tallies:
                continue
            for s in NAMES:
                for p in phrasings:
                    res = engine.ask(image, p.format(s=s, S=s.title(), t=typo(s)),
                                     window=eval_window(s))
                    tallies[kind].answer(res)
                    tallies[kind].add(s, masks_of(res, s, image.shape), refs[s])
        for kind, phrasings in CHOSEN.items():
            if kind not in tallies:
                continue
            for s in NAMES:
                for p in phrasings:
                    res = engine.ask(image, p.format(s=s, S=s.title()), window=eval_window(s),
                                     task="segment")
                    tallies[kind].answer(res)
                    tallies[kind].add(s, masks_of(res, s, image.shape), refs[s])
        for kind, phrasings in SHORT.items():
            if kind not in tallies:
                continue
            for s in SIDED:
                for p in phrasings:
                    res = engine.ask(image, p.format(**short_sides(s)), window=eval_window(s))
                    tallies[kind].answer(res)
                    tallies[kind].add(s, masks_of(res, s, image.shape), refs[s])
        for kind, wording in PARTS.items():
            if kind not in tallies:
                continue
            for s, part in PART_OF.items():
                res = engine.ask(image, wording.format(part=part), window=eval_window(s))
                tallies[kind].answer(res)
                tallies[kind].add(s, masks_of(res, s, image.shape), refs[s])
        if "one question listing all" in tallies:
            on = [f"the {s}" for s in NAMES if refs[s].sum() >= MIN_AREA_PX]
            listed = None
            if on:
                names = on[0] if len(on) == 1 else ", ".join(on[:-1]) + " and " + on[-1]
                listed = engine.ask(image, f"Segment {names}.", window="abdomen")
                tallies["one question listing all"].answer(listed)
            for s in NAMES:
                pred = (masks_of(listed, s, image.shape) if listed is not None
                        else np.zeros_like(refs[s]))
                tallies["one question listing all"].add(s, pred, refs[s])
        if "all organs" in tallies:
            every = engine.ask(image, "Segment all organs.", window="abdomen")
            tallies["all organs"].answer(every)
            for s in NAMES:
                tallies["all organs"].add(s, masks_of(every, s, image.shape), refs[s])
        for kind, wording in PAIR_WORDINGS.items():
            if kind not in tallies:
                continue
            for pair, sides in PAIRS.items():
                res = engine.ask(image, wording.format(pair=pair, one=pair[:-1]),
                                 window=eval_window(sides[0]))
                tallies[kind].answer(res)
                for s in sides:
                    tallies[kind].add(s, masks_of(res, s, image.shape), refs[s])
    return tallies


def both_ways(run) -> dict:
    """`run(engine, study, slices)` over the held-out slices, with the engine asking again
    (True) and not (False), one thread; prints the slices and the time taken after it."""
    torch.set_num_threads(1)
    study = load_study()
    slices = held_out_slices()
    t0 = time.perf_counter()
    results = {again: run(Engine.load(NANO, ask_again=again), study, slices)
               for again in (False, True)}
    print(f"Held-out slices: {len(slices)} ({', '.join(f'{a}-{b}' for a, b in HELD_OUT_BLOCKS)}); "
          f"{time.perf_counter() - t0:.0f} s.\n")
    return results


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=ROWS, default=None, metavar="ROW",
                        help="score only these rows: " + "; ".join(ROWS))
    only = parser.parse_args().only
    results = both_ways(lambda engine, study, slices: run(engine, study, slices, only))
    print("| question | mean Dice as typed | mean Dice asked again | answers with no mask, "
          "as typed / asked again |")
    print("|---|---|---|---|")
    for kind in results[True]:
        typed, again = results[False][kind], results[True][kind]
        names = ([s for p in PAIRS.values() for s in p] if kind in PAIR_WORDINGS
                 else SIDED if kind in SHORT else list(PART_OF) if kind in PARTS else NAMES)
        print(f"| {kind} | {typed.mean(names):.3f} | {again.mean(names):.3f} | "
              f"{typed.no_mask} / {again.no_mask} of {again.asked} |")


if __name__ == "__main__":
    main()
