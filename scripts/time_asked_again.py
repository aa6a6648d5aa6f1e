"""What asking again costs on models/nano (docs/api.md, "Asked again"): the median time of
`Engine.ask` for questions nano answers at once and for ones the engine asks again, on
held-out slice 25 of the sample CT, its encoders cached (one thread, 5 repeats).

    .venv/bin/python scripts/time_asked_again.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from citrusv import Engine
from citrusv.nano_data import load_study

QUESTIONS = [
    "Please segment the liver in this scan.",
    "Segment the liver, the spleen and the stomach.",
    "Please segment the aorta in this scan.",
    "Delineate the aorta.",
    "Please segment the heart in this scan.",
    "Segment the Heart.",
    "Write a report for this CT slice. Think step by step.",
    "Write a report.",
    "Write a Report for this CT Slice. Think Step by Step.",
    "How big is the liver?",
    "Segment all organs.",
    "Segent the liver.",
]


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    engine = Engine.load(Path(__file__).resolve().parents[1] / "models" / "nano")
    image = load_study().volume[25]
    for q in QUESTIONS:  # warm-up: encoders cached, prefixes kept
        engine.ask(image, q, window="abdomen")
    for q in QUESTIONS:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = engine.ask(image, q, window="abdomen")
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{q!r}: median {statistics.median(times):.0f} ms "
              f"({len(res.masks)} masks, {len(res.boxes)} boxes)")


if __name__ == "__main__":
    main()
