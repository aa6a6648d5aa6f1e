"""The engine's sub-commands of `citrusv`: `ask` (one question, JSON + PNG overlay) and `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _window(value: str | None):
    if value is None or value.lower() == "auto":
        return None
    if "," in value:
        level, width = (float(v) for v in value.split(","))
        return [level, width]
    return value


def print_result(data: dict) -> None:
    """The result JSON as lines a person reads in a terminal (local engine or server alike)."""
    print(f"task: {data.get('task')}\ntext: {data.get('text')}\nanswer: {data.get('answer')}")
    for m in data.get("masks", []):
        score = "n/a" if m.get("score") is None else f"{m['score']:.3f}"
        area = "" if m.get("area_mm2") is None else f" ({m['area_mm2']:.1f} mm²)"
        axes = ("" if not m.get("diameters_mm")
                else f", {m['diameters_mm'][0]:.0f} x {m['diameters_mm'][1]:.0f} mm")
        print(f"mask '{m['label']}': {m['area_px']} px{area}{axes}, score {score}")
    for b in data.get("boxes", []):
        score = "" if b.get("score") is None else f", score {b['score']:.3f}"
        origin = ""
        if b.get("source") == "mask":
            written = ("nothing written" if b.get("text_xyxy") is None else
                       f"written {[round(v, 1) for v in b['text_xyxy']]}")
            origin = f" (from the '{b['label']}' mask; {written})"
        size = "" if not b.get("size_mm") else f", {b['size_mm'][0]:.0f} x {b['size_mm'][1]:.0f} mm"
        print(f"box {b['id']} '{b['label']}': {[round(v, 1) for v in b['xyxy']]}{size}{origin}"
              f"{score}")
    for step in data.get("reasoning", []):
        print(f"step {step['step']}: {step['text']} {step['box_ids']}")
    for w in data.get("warnings", []):
        print(f"warning: {w}")
    if (data.get("model") or {}).get("intended_use"):
        print(f"intended use: {data['model']['intended_use']}")


def ask_cli(args: argparse.Namespace) -> int:
    import torch

    from . import imaging
    from .checkpoint import read_intended_use
    from .engine import AXES, Engine, untaught_modality
    from .io import is_picture, read_study
    from .parsing import modality_warning

    if args.server:
        return _ask_server(args)
    if not args.model:
        print("error: pass --model DIR (local engine) or --server URL (a running server)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # bad input raises InputError: `citrusv` (cli.main) prints it as one sentence, exit 2
    study = read_study(args.image)
    window = _window(args.window)
    axis = AXES.get(args.axis, 0)
    slice_index = None
    spacing = study.spacing
    if study.kind == "volume" and study.array.ndim == 3:
        slice_index = study.array.shape[axis] // 2 if args.slice is None else args.slice
        plane = study.slice(slice_index, axis)
        spacing = None if study.spacing is None else tuple(
            s for i, s in enumerate(study.spacing) if i != axis)
    else:
        plane = study.array
    # what the model folder says it may be used for, as the server sends it with each answer;
    # read first, so a malformed intended_use.txt (CheckpointError, printed as one sentence by
    # cli.main) stops the command before the model is loaded and asked
    use = read_intended_use(args.model)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    kwargs = dict(slice_index=slice_index, spacing=spacing, photometric=study.photometric,
                  image_id=Path(args.image).name, forced_text=args.forced_text)
    if args.roi:
        roi = [float(v) for v in args.roi.split(",")]
        res = engine.closer_look(plane, args.prompt, roi=roi, window=window, **kwargs)
    else:
        res = engine.ask(plane, args.prompt, window, task=args.task, **kwargs)
    untaught_modality(res, study.modality, engine.config.mask_modalities,  # as the server does
                      picture=is_picture(args.image))
    data = res.to_json()
    if use is not None:
        data.setdefault("model", {})["intended_use"] = use
    if kind := modality_warning(res.answer or res.text, study.modality):
        data["warnings"].append(kind)  # as the server adds it
    if study.kind == "volume":
        data["image"].update({"shape": [int(s) for s in study.array.shape], "axis": args.axis,
                              "spacing": None if study.spacing is None else
                              [float(s) for s in study.spacing]})
    print_result(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    if args.png:
        from CitrusVLib.overlay import render_overlay  # the one renderer, shared with Slicer

        rgb = imaging.to_rgb_uint8(plane, window, study.photometric)
        render_overlay(rgb, data).save(args.png)
    return 0


def _ask_server(args: argparse.Namespace) -> int:
    """The headless twin of the Slicer module: same client, same overlay, no Slicer."""
    from CitrusVLib.errors import CitrusVError
    from CitrusVLib.headless import ask_server

    try:
        result = ask_server(args.server, args.image, args.slice, args.prompt, args.png,
                            task=args.task, axis=args.axis, window=_window(args.window),
                            ca_certificate=args.ca_cert)
    except CitrusVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_result(result.raw)
    if args.json:
        Path(args.json).write_text(json.dumps(result.raw, indent=2))
    if args.png:
        print(f"overlay: {args.png}")
    return 0


def bench_cli_args(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_cli

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape is None and args.model is None:
        print("error: pass --model DIR or --shape 8b", file=sys.stderr)
        return 2
    bench_cli(args.model, args.shape, args.device, args.dtype, args.size, args.new_tokens,
              args.repeats, args.finetune_steps)
    return 0


def add_commands(sub) -> None:
    """Register `ask` and `bench` on the `citrusv` sub-command parser."""
    p = sub.add_parser("ask", help="ask about one slice (local engine or a server); --json, --png")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Citrus-V checkpoint directory (runs the engine here)")
    where.add_argument("--server", help="MONAI Label server URL (then --image is a datastore id)")
    p.add_argument("--ca-cert", default=None,
                   help="with an https --server: the CA certificate (PEM) that signed its certificate")
    p.add_argument("--image", required=True,
                   help="NIfTI, NRRD, DICOM file or folder, PNG; with --server: the image id")
    p.add_argument("--slice", type=int, default=None, help="slice index (default: middle)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--prompt", required=True)
    p.add_argument("--task", default=None, choices=["segment", "detect", "report"])
    p.add_argument("--window", default=None,
                   help="abdomen, lung, bone, soft_tissue, 'level,width', or auto (percentiles)")
    p.add_argument("--roi", default=None, help="x1,y1,x2,y2: do a closer look at this box")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--png", default=None, help="write an overlay PNG here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default by device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--forced-text", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=ask_cli)
    p = sub.add_parser("bench", help="engine overheads: capture vs generate, cached mask step")
    p.add_argument("--model", default=None, help="Citrus-V checkpoint directory")
    p.add_argument("--shape", default=None, choices=["8b", "tiny-sam2l", "wide-llm"],
                   help="instead of --model: random-init model of the real 8B shape, a tiny "
                   "LLM with the real SAM2 Hiera-L, or a 0.4B LLM on the tiny SAM2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--size", type=int, default=512, help="slice side in pixels")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="instead: memory of N fine-tune steps with the training run's MLLM copy "
                   "kept vs released after its [SEG] states")
    p.set_defaults(func=bench_cli_args)
