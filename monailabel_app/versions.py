"""List, withdraw and restore the fine-tuned Citrus-V versions a MONAI Label server serves.

    python monailabel_app/versions.py [--model-dir DIR]                       # list
    python monailabel_app/versions.py [--model-dir DIR] withdraw N --reason "why"
    python monailabel_app/versions.py [--model-dir DIR] restore N
    python monailabel_app/versions.py [--model-dir DIR] prune --keep N

`--model-dir` is the server's `--conf model_dir` (default models/nano). A withdrawn version
stays on disk with a `withdrawn.json` mark; a running server serves the newest version that is
not withdrawn from its next request on (no restart), and the next fine-tuning run starts from
that one. `prune --keep N` deletes the weights of every version but the N newest that are not
withdrawn (withdrawn ones included); their records stay, and they can never be served again.
Run it with the server's Python (`.venv/bin/python`); it loads no model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

from lib.cli import run, table  # noqa: E402
from lib.model import SharedModel, prune_versions, resolve_model_dir, set_withdrawn  # noqa: E402


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def list_versions(model_dir: str) -> str:
    model = SharedModel(model_dir)
    serving = model.serving()[0] if model.installed() else None
    rows = [("version", "created", "from", "val Dice before -> after", "state")]
    rows.append(("base", "-", "-", "-", "serving" if serving == "base" else ""))
    for v in model.versions_info():
        w, gone = v["withdrawn"], v["pruned"]
        state = ("serving" if v["version"] == serving else
                 f"withdrawn {w.get('at') or ''}: {w.get('reason') or 'no reason given'}" if w else "")
        if gone:
            state = f"pruned {gone.get('at') or ''}" + (f"; {state}" if state else "")
        rows.append((v["version"], _fmt(v["created"]), _fmt(v["base_version"]),
                     f"{_fmt(v['val_dice_before'])} -> {_fmt(v['val_dice'])}", state))
    head = f"{model.model_dir}: " + (f"serving {serving}" if serving else "no checkpoint installed")
    return f"{head}\n{table(rows)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None, help="the server's --conf model_dir")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("list", help="list versions and which one is served (the default)")
    p = sub.add_parser("withdraw", help="stop serving version N (kept on disk)")
    p.add_argument("version")
    p.add_argument("--reason", default="", help="why, for the other admins and /info/")
    p = sub.add_parser("restore", help="serve version N again if it is the newest")
    p.add_argument("version")
    p = sub.add_parser("prune", help="delete the weights of all but the N newest versions "
                       "that are not withdrawn (records kept)")
    p.add_argument("--keep", type=int, required=True, metavar="N")
    args = ap.parse_args(argv)
    model_dir = resolve_model_dir(APP_DIR, args.model_dir)

    def act() -> str:
        done = ""
        if args.cmd == "withdraw":
            now = set_withdrawn(model_dir, args.version, args.reason)
            done = f"Version {args.version} withdrawn; the server now serves {now}.\n"
        elif args.cmd == "restore":
            now = set_withdrawn(model_dir, args.version, None)
            done = f"Version {args.version} restored; the server now serves {now}.\n"
        elif args.cmd == "prune":
            gone = prune_versions(model_dir, args.keep, f"versions.py prune --keep {args.keep}")
            freed = sum(g["freed_bytes"] for g in gone) / 1e6
            done = (f"Pruned version{'s' if len(gone) > 1 else ''} "
                    f"{', '.join(g['version'] for g in gone)} ({freed:.1f} MB freed).\n"
                    if gone else "Nothing to prune.\n")
        return done + list_versions(model_dir)

    return run(act)


if __name__ == "__main__":
    sys.exit(main())
