"""How right the sizes in models/nano's report answers are, against the boxes the engine
returns with them: over the held-out slices, nano's report question (as `citrusv eval` asks
it); for each structure its answer gives a size for ("liver (right side, 98 x 66 mm)") that
is on the slice, the worse side's relative error against the reference mask's box in mm, for
the size as written and for the returned box's `size_mm` (from nano's mask and the spacing).
Sizes given for structures not on the slice are counted apart, and the reports whose
warnings say their sizes are off their boxes' (`citrusv.engine.size_warning`). One thread.

    .venv/bin/python scripts/eval_report_sizes.py
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from citrusv import Engine
from citrusv.evaluation import REPORT_PROMPT, held_out_slices, normalise_label
from citrusv.nano_data import MIN_AREA_PX, NAMES, load_study, mask_box

NANO = Path(__file__).resolve().parents[1] / "models" / "nano"
SIZE = re.compile(r"([a-z ]+?) \((?:left side|right side|midline), (\d+) x (\d+) mm\)")


def worse_side(size: list[float], ref: list[float]) -> float:
    return max(abs(size[0] - ref[0]) / ref[0], abs(size[1] - ref[1]) / ref[1])


def main() -> None:
    torch.set_num_threads(1)
    engine, study = Engine.load(NANO), load_study()
    spacing = (study.spacing[1], study.spacing[2])
    written, returned, not_there, warned = [], [], 0, 0
    t0 = time.perf_counter()
    for k in held_out_slices():
        res = engine.ask(study.volume[k], REPORT_PROMPT, window="abdomen", spacing=spacing,
                         max_new_tokens=400)
        boxes = {normalise_label(b.label): b for b in res.boxes}
        warned += any(w.startswith("the sizes the answer gives") for w in res.warnings)
        for name, w, h in SIZE.findall(res.answer):
            name = normalise_label(name.strip())
            if name not in NAMES:
                continue
            ref = study.mask(name, k)
            if ref.sum() < MIN_AREA_PX:
                not_there += 1
                continue
            x1, y1, x2, y2 = mask_box(ref)
            ref_mm = [(x2 - x1) * spacing[1], (y2 - y1) * spacing[0]]
            written.append(worse_side([float(w), float(h)], ref_mm))
            if name in boxes and boxes[name].size_mm:
                returned.append(worse_side(boxes[name].size_mm, ref_mm))
    print(f"{len(held_out_slices())} held-out slices, {time.perf_counter() - t0:.0f} s; sizes "
          f"of structures on the slice: {len(written)}, of structures not on it: {not_there}")
    for kind, errors in (("as written", written), ("returned box size_mm", returned)):
        e = np.array(errors)
        print(f"{kind}: {len(e)} sizes, within 20 % on both sides {np.mean(e <= 0.2):.3f}, "
              f"median worse side off by {np.median(e):.3f}")
    print(f"reports warned that their sizes are off their boxes': {warned} of "
          f"{len(held_out_slices())}")


if __name__ == "__main__":
    main()
