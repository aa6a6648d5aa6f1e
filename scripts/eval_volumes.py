"""How near models/nano's volumes over a slice range (`volumes_ml`, docs/api.md) are to the
reference: for each of the ten structures, `Engine.ask_volume` over the slices the reference
marks it on, two more on each side (clipped to the CT), with nano's question ("Please
segment the liver in this scan.") in the window `citrusv eval` asks it in; the volume of
nano's masks against the reference's over the same slices, the span from the first slice
marked to the last (the range answer's "... mm craniocaudal"), and whether the answer says
the mask reaches an end of the range. These ranges are mostly training slices (the held-out
blocks are 20-29, 60-69, 100-109): this checks the measuring, not nano's quality on unseen
slices. One thread.

    .venv/bin/python scripts/eval_volumes.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from citrusv import Engine
from citrusv.evaluation import SEGMENT_PROMPT
from citrusv.nano_data import NAMES, eval_window, load_study

NANO = Path(__file__).resolve().parents[1] / "models" / "nano"


def main() -> None:
    torch.set_num_threads(1)
    engine, study = Engine.load(NANO), load_study()
    n = study.volume.shape[0]
    voxel_ml = float(np.prod(study.spacing)) / 1000
    t0 = time.perf_counter()
    print("| structure | slices | reference mL | nano mL | off | span mm, reference / nano "
          "| said cut at an end |")
    print("|---|---|---|---|---|---|---|")
    offs = []
    for s in NAMES:
        on = [k for k in range(n) if study.mask(s, k).any()]
        a, b = max(on[0] - 2, 0), min(on[-1] + 2, n - 1)
        res = engine.ask_volume(study.volume, SEGMENT_PROMPT.format(s=s), slices=range(a, b + 1),
                                window=eval_window(s), spacing=study.spacing)
        ref = sum(int(study.mask(s, k).sum()) for k in range(a, b + 1)) * voxel_ml
        got = res.to_json().get("volumes_ml", {}).get(s, 0.0)
        cut = any("mask reaches" in w for w in res.warnings)
        offs.append(abs(got - ref) / ref)
        marked = [k for k in range(a, b + 1) if res.masks and res.masks[0].array[k].any()]
        span = (marked[-1] - marked[0] + 1) * study.spacing[0] if marked else 0.0
        print(f"| {s} | {a}-{b} | {ref:.1f} | {got:.1f} | {(got - ref) / ref:+.1%} | "
              f"{(on[-1] - on[0] + 1) * study.spacing[0]:.1f} / {span:.1f} | "
              f"{'yes' if cut else 'no'} |")
    print(f"\nmedian |off| {np.median(offs):.1%}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
