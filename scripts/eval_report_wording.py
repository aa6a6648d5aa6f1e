"""How models/nano answers report questions in wording it was not trained on, as typed and
with the engine asking again (docs/api.md, "Asked again"), over the held-out slices, one
question per slice and wording:
- nano's own question ("Write a report for this CT slice. Think step by step."),
- the same in capitals ("Write a Report for this CT Slice. Think Step by Step."; nano was
  taught lower-case words),
- no "step by step" ("Write a report.", "What are the findings?"),
- what is on the slice ("What structures are visible?", "What do you see?"; report questions
  by their words since the third 2026-12-05 session),
- two letters swapped in the report word ("Write a reprot.", "What are the fidnings?"; read
  as "report" and "findings" since the fourth 2026-12-05 session),
- a letter left out of the report word ("Write a repor.", "What are the findngs?"; read as
  "report" and "findings" since the fifth 2026-12-05 session).
For each: how many answers are reports (reasoning or an <answer>), and citation precision as
`citrusv eval` scores it (cited structures that are on the slice). The task is picked from
the words. One thread.

    .venv/bin/python scripts/eval_report_wording.py
"""

from __future__ import annotations

from eval_wording import both_ways

from citrusv import Engine
from citrusv.evaluation import REPORT_PROMPT, normalise_label
from citrusv.nano_data import MIN_AREA_PX, NAMES

WORDINGS = {"nano's question": [REPORT_PROMPT],
            "capitals": ["Write a Report for this CT Slice. Think Step by Step."],
            "no \"step by step\"": ["Write a report.", "What are the findings?"],
            "what is on the slice": ["What structures are visible?", "What do you see?"],
            "letters swapped": ["Write a reprot.", "What are the fidnings?"],
            "a letter dropped": ["Write a repor.", "What are the findngs?"]}


class Reports:
    def __init__(self) -> None:
        self.asked = self.reports = self.cited = self.cited_ok = 0

    def add(self, res, on: set[str]) -> None:
        self.asked += 1
        self.reports += int(bool(res.reasoning) or "<answer>" in res.text)
        boxes = {b.id: b for b in res.boxes}
        for step in res.reasoning:
            for bid in step.box_ids:
                if bid in boxes:
                    self.cited += 1
                    self.cited_ok += int(normalise_label(boxes[bid].label) in on)

    def precision(self) -> str:
        return f"{self.cited_ok / self.cited:.3f}" if self.cited else "-"


def run(engine: Engine, study, slices) -> dict[str, Reports]:
    tallies = {k: Reports() for k in WORDINGS}
    for k in slices:
        image = study.volume[k]
        on = {s for s in NAMES if study.mask(s, k).sum() >= MIN_AREA_PX}
        for kind, phrasings in WORDINGS.items():
            for p in phrasings:
                tallies[kind].add(engine.ask(image, p, window="abdomen", max_new_tokens=400),
                                  on)
    return tallies


def main() -> None:
    results = both_ways(run)
    print("| question | reports, as typed / asked again | citation precision as typed | "
          "asked again | cited boxes, as typed / asked again |")
    print("|---|---|---|---|---|")
    for kind in WORDINGS:
        typed, again = results[False][kind], results[True][kind]
        print(f"| {kind} | {typed.reports} / {again.reports} of {again.asked} | "
              f"{typed.precision()} | {again.precision()} | {typed.cited} / {again.cited} |")


if __name__ == "__main__":
    main()
