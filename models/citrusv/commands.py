"""The engine's sub-commands of `citrusv`: `ask` (one question, JSON + PNG overlay) and `bench`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import InputError


def _window(value: str | None):
    if value is None or value.lower() == "auto":
        return None
    if "," in value:
        level, width = (float(v) for v in value.split(","))
        return [level, width]
    return value


def slice_arg(value: str) -> int | tuple[int, int] | str:
    """`--slice`: one index (65), a range of slices (26-54, both ends asked) or all."""
    text = value.strip().lower()
    if text == "all":
        return "all"
    first, dash, last = text.partition("-")
    if dash and first.strip().isdigit() and last.strip().isdigit():
        a, b = int(first), int(last)
        if b < a:
            raise argparse.ArgumentTypeError(f"slice range {value} is reversed; give the "
                                             f"first slice first ({b}-{a}).")
        return (a, b)
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"'{value}' is not a slice; give an index (65), a range "
                                     "(26-54) or all.")


def print_result(data: dict) -> None:
    """The result JSON as lines a person reads in a terminal (local engine or server alike)."""
    print(f"task: {data.get('task')}\ntext: {data.get('text')}\nanswer: {data.get('answer')}")
    ranged = len(data.get("image", {}).get("slices") or []) > 1
    for m in data.get("masks", []):
        if ranged and not m["area_px"]:
            continue  # over a range, the slices where it was marked
        score = "n/a" if m.get("score") is None else f"{m['score']:.3f}"
        area = "" if m.get("area_mm2") is None else f" ({m['area_mm2']:.1f} mm²)"
        axes = ("" if not m.get("diameters_mm")
                else f", {m['diameters_mm'][0]:.0f} x {m['diameters_mm'][1]:.0f} mm")
        where = f" slice {m.get('slice')}" if ranged else ""
        print(f"mask '{m['label']}'{where}: {m['area_px']} px{area}{axes}, score {score}")
    for label, ml in (data.get("volumes_ml") or {}).items():
        print(f"volume '{label}': {ml:.1f} mL over the slices asked")
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

    from .checkpoint import read_intended_use
    from .engine import AXES, Engine, untaught_modality
    from .io import is_picture, read_study
    from .parsing import modality_warning

    # a closer look (--roi) is one slice's, through the server or here
    if isinstance(args.slice, (tuple, str)) and args.roi:
        raise InputError("roi", "a closer look (--roi) is about one slice; give --slice one "
                         "index.")
    roi = _roi_arg(args.roi)
    if args.server:
        return _ask_server(args, roi)
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
    is_volume = study.kind == "volume" and study.array.ndim == 3
    if isinstance(args.slice, (tuple, str)):
        if not is_volume:
            raise InputError("slice", f"--slice {_slice_text(args.slice)} asks over slices, "
                             f"but {Path(args.image).name} is one image; leave --slice out.")
        return _ask_range(args, study, axis, window)
    if is_volume:
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
    if roi is not None:
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
    return _finish_cli(args, data, lambda _: plane, slice_index, window, study.photometric)


def _slice_text(value) -> str:
    return value if isinstance(value, str) else f"{value[0]}-{value[1]}"


def _finish_cli(args: argparse.Namespace, data: dict, plane_of, slice_index, window,
                photometric) -> int:
    """Print the result, write --json, and draw --png on `slice_index` (a range: the slice
    where the masks are largest)."""
    print_result(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    if args.png:
        from CitrusVLib.overlay import fullest_slice, render_overlay  # shared with Slicer

        from . import imaging

        if isinstance(slice_index, list):  # a range: the slice where the masks are largest
            slice_index = fullest_slice(data, slice_index[0])
            print(f"overlay: {args.png} shows slice {slice_index}")
        rgb = imaging.to_rgb_uint8(plane_of(slice_index), window, photometric)
        render_overlay(rgb, data, slice_index=slice_index).save(args.png)
    return 0


def _ask_range(args: argparse.Namespace, study, axis: int, window) -> int:
    """`--slice A-B` / `--slice all` with a local model: `Engine.ask_volume`, as the server
    answers a range (one question per slice, masks and volumes over the range)."""
    from .checkpoint import read_intended_use
    from .engine import Engine, untaught_modality
    from .parsing import modality_warning

    count = study.array.shape[axis]
    if args.slice == "all":
        ks = list(range(count))
    else:
        first, last = args.slice
        if last >= count:
            raise InputError("slice", f"slice {last} is out of range; this image has {count} "
                             f"{args.axis} slices, numbered 0 to {count - 1}.")
        ks = list(range(first, last + 1))
    use = read_intended_use(args.model)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    res = engine.ask_volume(study.array, args.prompt, slices=ks, axis=axis, window=window,
                            task=args.task, spacing=study.spacing,
                            photometric=study.photometric, image_id=Path(args.image).name,
                            forced_text=args.forced_text)
    untaught_modality(res, study.modality, engine.config.mask_modalities)
    data = res.to_json()
    if use is not None:
        data.setdefault("model", {})["intended_use"] = use
    if kind := modality_warning(res.answer or res.text, study.modality):
        data["warnings"].append(kind)
    return _finish_cli(args, data, lambda k: study.slice(k, axis), ks, window,
                       study.photometric)


def _roi_arg(text: str | None) -> list[float] | None:
    """`--roi x1,y1,x2,y2` as four numbers (None when not given); else one sentence."""
    if text is None:
        return None
    try:
        roi = [float(v) for v in str(text).split(",")]
    except ValueError:
        roi = []
    if len(roi) != 4 or not all(math.isfinite(v) for v in roi):
        raise InputError("roi", f"--roi {text} is not a box; give four numbers x1,y1,x2,y2 in "
                         "slice pixels, e.g. --roi 80,110,300,320.")
    return roi


def _ask_server(args: argparse.Namespace, roi: list[float] | None = None) -> int:
    """The headless twin of the Slicer module: same client, same overlay, no Slicer. With
    `roi` (`--roi`), a closer look at that box, as the module's closer look asks."""
    from CitrusVLib.errors import CitrusVError
    from CitrusVLib.headless import ask_server

    ranged = isinstance(args.slice, (tuple, str))
    try:
        result = ask_server(args.server, args.image, None if ranged else args.slice,
                            args.prompt, args.png, task=args.task, axis=args.axis,
                            window=_window(args.window), ca_certificate=args.ca_cert,
                            slices=args.slice if ranged else None, roi=roi)
    except CitrusVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_result(result.raw)
    if args.json:
        Path(args.json).write_text(json.dumps(result.raw, indent=2))
    if args.png and ranged:  # ask_server drew the slice where the masks are largest
        from CitrusVLib.overlay import fullest_slice

        first = 0 if args.slice == "all" else args.slice[0]
        print(f"overlay: {args.png} shows slice {fullest_slice(result, first)}")
    elif args.png:
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
    p.add_argument("--slice", type=slice_arg, default=None,
                   help="slice index (default: middle), a range 26-54 (one answer over the "
                   "slices, with volumes) or all")
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
