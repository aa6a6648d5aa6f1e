"""How near the long and short axes of models/nano's masks (`diameters_mm`, docs/api.md) are
to the reference's: over the held-out slices, nano's question per structure on the slice
("Please segment the liver in this scan.", in the window `citrusv eval` asks it in); for each
structure on the slice (at least MIN_AREA_PX reference pixels) that nano marks, each axis's
error in mm against the reference mask's, per structure (median) and over all. One thread.

    .venv/bin/python scripts/eval_diameters.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from citrusv import Engine
from citrusv.evaluation import SEGMENT_PROMPT, held_out_slices
from citrusv.nano_data import MIN_AREA_PX, NAMES, eval_window, load_study
from citrusv.result import diameters_mm

NANO = Path(__file__).resolve().parents[1] / "models" / "nano"


def main() -> None:
    torch.set_num_threads(1)
    engine, study = Engine.load(NANO), load_study()
    spacing = tuple(study.spacing[1:])
    t0 = time.perf_counter()
    errors: dict[str, list[tuple[float, float]]] = {s: [] for s in NAMES}
    missed: dict[str, int] = {s: 0 for s in NAMES}
    for k in held_out_slices():
        for s in NAMES:
            ref = study.mask(s, k)
            if ref.sum() < MIN_AREA_PX:
                continue
            res = engine.ask(study.volume[k], SEGMENT_PROMPT.format(s=s), window=eval_window(s),
                             spacing=spacing)
            got = next((e["diameters_mm"] for e in res.to_json()["masks"]
                        if e["label"] == s and e["diameters_mm"]), None)
            if got is None:
                missed[s] += 1
                continue
            want = diameters_mm(ref, spacing)
            errors[s].append((got[0] - want[0], got[1] - want[1]))
    print("| structure | slices | no mask | long axis, median error mm | short axis | "
          "within 5 mm, both |")
    print("|---|---|---|---|---|---|")
    every = []
    for s in NAMES:
        e = np.array(errors[s]).reshape(-1, 2)
        every += errors[s]
        if not len(e):
            print(f"| {s} | 0 | {missed[s]} | - | - | - |")
            continue
        both = np.mean(np.abs(e).max(axis=1) <= 5.0)
        print(f"| {s} | {len(e)} | {missed[s]} | {np.median(e[:, 0]):+.1f} | "
              f"{np.median(e[:, 1]):+.1f} | {both:.0%} |")
    e = np.abs(np.array(every))
    print(f"\nall: {len(e)} masks, median |error| long {np.median(e[:, 0]):.1f} mm, short "
          f"{np.median(e[:, 1]):.1f} mm, both within 5 mm {np.mean(e.max(axis=1) <= 5.0):.0%}; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
