"""Training data for `models/nano`, built from the sample chest CT and its reference labels.

Axial slices (CT windows) with segment / detect / report questions in several phrasings, and
digitally reconstructed radiographs (DRRs, AP projection) with boxes projected from the 3D
masks and step-by-step reports. The split is by contiguous slice blocks (held-out blocks plus
guard bands that are used for nothing), so neighbouring slices cannot leak into evaluation.
Written to a work directory outside git (`work/nano_data`), never committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .imaging import FrameMap, smart_resize

# The ten structures, in the fixed anatomical reading order the report trace walks.
# name -> reference label names (sample_data/reference/chest_ct/labels.json) that make it up.
STRUCTURES: dict[str, tuple[str, ...]] = {
    "right lung": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "left lung": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "heart": ("heart",),
    "aorta": ("aorta",),
    "liver": ("liver",),
    "stomach": ("stomach",),
    "spleen": ("spleen",),
    "right kidney": ("kidney_right",),
    "left kidney": ("kidney_left",),
    "spinal cord": ("spinal_cord",),
}
NAMES = list(STRUCTURES)
LUNGS = ("right lung", "left lung")

HELD_OUT_BLOCKS = ((20, 29), (60, 69), (100, 109))  # inclusive slice ranges
GUARD = 2  # slices on each side of a held-out block that are used for nothing
MIN_AREA_PX = 40  # a structure is "on the slice" from this many pixels (512 x 512 grid)

# Qwen frame of the nano model: a 512 x 512 slice becomes 168 x 168 (6 x 6 merged tokens).
NANO_MIN_PIXELS = 112 * 112
NANO_MAX_PIXELS = 168 * 168
QWEN_FACTOR = 28

SEGMENT_PROMPTS = [
    "Please segment the {s} in this scan.",
    "Where is the {s}? Output its mask.",
    "Segment the {s}.",
    "Can you segment the {s} in this image?",
    "Please output the segmentation mask of the {s}.",
    "Outline the {s} in this CT slice.",
]
DETECT_PROMPTS = [
    "Locate the {s}, output its bbox coordinates using JSON format.",
    "Detect the {s} in this image.",
    "Where is the {s}? Give its bounding box.",
    "Find the {s} and output its bounding box in JSON.",
    "Find the {s}.",
    "Where is the {s}?",
]
# paired structures asked about together ("Find the kidneys."): the answer boxes each member
# on the slice
PAIRS = {"kidneys": ("right kidney", "left kidney"), "lungs": ("right lung", "left lung")}
PLURAL_DETECT_PROMPTS = [
    "Find the {p}.",
    "Locate the {p}, output their bbox coordinates using JSON format.",
    "Where are the {p}?",
]
# share of all questions written as typed in a hurry: first letter lower case and/or no final
# full stop or question mark (each 70 % of those), so "segment the liver" is a segmentation
# question too
CASUAL_SHARE = 0.4
# bumped whenever build_samples changes what it writes (2: detection phrasings, pairs, casual
# wording); `citrusv train` rebuilds data of another version
DATA_VERSION = 2
REPORT_PROMPTS = [
    "Write a report for this CT slice. Think step by step.",
    "Describe the findings in this image step by step.",
    "Please write a radiology report for this slice, think step by step.",
    "What structures are visible? Describe them step by step with boxes.",
]
XRAY_REPORT_PROMPTS = [
    "Write a report for this X-ray. Think step by step.",
    "Describe the findings in this radiograph step by step.",
    "Please write a radiology report for this X-ray, think step by step.",
]


# models/nano/intended_use.txt (written by `citrusv train`): the model card's first line, which
# the server lists in /info/ and with each answer, and the Slicer module shows
NANO_INTENDED_USE = ("Citrus-V nano: trained on one patient's CT; demonstration only; not for "
                     "clinical use.")


def nano_example_prompts() -> dict[str, list[str]]:
    """Questions nano answers as their task (models/nano/example_prompts.json, shown as the
    Slicer module's examples): its training phrasings, with structures it segments and finds
    best on the held-out slices (MODEL_CARD); other wording can get another task's answer
    ("show the liver")."""
    return {
        "segment": [SEGMENT_PROMPTS[0].format(s="liver"), SEGMENT_PROMPTS[2].format(s="left lung"),
                    SEGMENT_PROMPTS[1].format(s="right lung"),
                    SEGMENT_PROMPTS[5].format(s="spinal cord")],
        "detect": [DETECT_PROMPTS[0].format(s="right lung"), DETECT_PROMPTS[2].format(s="liver"),
                   DETECT_PROMPTS[3].format(s="heart")],
        "report": [REPORT_PROMPTS[0], REPORT_PROMPTS[2], XRAY_REPORT_PROMPTS[0]],
    }


# Windows a slice is shown in during training (the engine's presets + percentile scaling).
TRAIN_WINDOWS = ("abdomen", "lung", "soft_tissue", None)


def eval_window(structure: str | None) -> str:
    """The window a radiologist would pick: lung for the lungs, abdomen for the rest."""
    return "lung" if structure in LUNGS else "abdomen"


def split_of(k: int) -> str:
    """'test' inside a held-out block, 'guard' within GUARD slices of one, else 'train'."""
    for a, b in HELD_OUT_BLOCKS:
        if a <= k <= b:
            return "test"
    for a, b in HELD_OUT_BLOCKS:
        if a - GUARD <= k <= b + GUARD:
            return "guard"
    return "train"


@dataclass
class CTStudy:
    """The sample CT in the engine's convention: volume[z, y, x] (HU) and structure masks."""

    volume: np.ndarray  # (Z, Y, X) int16 HU; slice k is volume[k]
    labels: np.ndarray  # (Z, Y, X) uint8: 0 background, i + 1 for NAMES[i]
    spacing: tuple[float, float, float]  # (z, y, x) mm

    def mask(self, name: str, k: int | None = None) -> np.ndarray:
        value = NAMES.index(name) + 1
        return (self.labels == value) if k is None else (self.labels[k] == value)


def load_study(root: Path | None = None) -> CTStudy:
    """Read chest_ct.nii.gz + the reference label map, as [z, y, x] arrays."""
    import nibabel as nib

    if root is None:
        from sample_data.build import ROOT as root
    root = Path(root)
    for need in ("studies/chest_ct.nii.gz", "reference/chest_ct/mask.nii.gz",
                 "reference/chest_ct/labels.json"):
        if not (root / need).is_file():
            raise InputError("sample_data", f"{root / need} is missing; build the sample data "
                             "with `python -m sample_data` (scripts/install.sh does).")
    img = nib.load(str(root / "studies" / "chest_ct.nii.gz"))
    ref = root / "reference" / "chest_ct"
    names = json.loads((ref / "labels.json").read_text())
    index = {v: int(k) for k, v in names.items()}
    vol = np.asarray(img.dataobj).astype(np.int16).transpose(2, 1, 0)
    raw = np.asarray(nib.load(str(ref / "mask.nii.gz")).dataobj).transpose(2, 1, 0)
    labels = np.zeros(raw.shape, dtype=np.uint8)
    for i, (name, parts) in enumerate(STRUCTURES.items()):
        labels[np.isin(raw, [index[p] for p in parts])] = i + 1
    zooms = img.header.get_zooms()[:3]
    return CTStudy(np.ascontiguousarray(vol), np.ascontiguousarray(labels),
                   (float(zooms[2]), float(zooms[1]), float(zooms[0])))


def mask_box(mask: np.ndarray) -> list[float] | None:
    """[x1, y1, x2, y2] in pixels (x2, y2 exclusive) of a 2D mask, or None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def frame_map(h: int, w: int) -> FrameMap:
    """The nano Qwen frame for an (h, w) image."""
    out_h, out_w = smart_resize(h, w, QWEN_FACTOR, NANO_MIN_PIXELS, NANO_MAX_PIXELS)
    return FrameMap(h, w, out_h, out_w)


def frame_box(box: list[float], fmap: FrameMap) -> list[int]:
    """Input-pixel box -> integer box in the Qwen-resized frame (what the model writes)."""
    x1, y1, x2, y2 = fmap.to_frame(box)
    return [int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))]


def side_of(box: list[float], width: int) -> str:
    """Laterality from the box centre: column 0 is the patient's right (radiological view)."""
    cx = (box[0] + box[2]) / 2.0
    if abs(cx - width / 2.0) < 0.06 * width:
        return "midline"
    return "right side" if cx < width / 2.0 else "left side"


def present(study: CTStudy, k: int) -> dict[str, np.ndarray]:
    """Structures on axial slice k with at least MIN_AREA_PX pixels, in reading order."""
    out = {}
    for name in NAMES:
        m = study.mask(name, k)
        if m.sum() >= MIN_AREA_PX:
            out[name] = m
    return out


def segment_answer(name: str) -> str:
    """The name also follows [SEG]: the state at [SEG] must predict it, so it tells SAM2 which
    structure to cut (a tiny LM trained from scratch otherwise gives near-identical states)."""
    return f"Sure, the {name} is [SEG] {name}."


def _boxes_json(objects: list[dict]) -> str:
    """Citrus-V's box answer: ```json [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] ```."""
    return f"```json\n{json.dumps(objects)}\n```"


def detect_answer(name: str, box: list[int] | None) -> str:
    if box is None:
        return f"No {name} is visible in this image."
    return _boxes_json([{"bbox_2d": box, "label": name}])


def plural_detect_answer(plural: str, objects: list[dict]) -> str:
    """Boxes of the pair's members on the slice ({"bbox_2d", "label"} each), or none."""
    if not objects:
        return f"No {plural} are visible in this image."
    return _boxes_json(objects)


def casual(prompt: str, rng: np.random.Generator) -> str:
    """The question as typed in a hurry: lower-case start and/or no final punctuation."""
    if rng.random() < 0.7:
        prompt = prompt[0].lower() + prompt[1:]
    if rng.random() < 0.7:
        prompt = prompt.rstrip(".?")
    return prompt


def report_answer(items: list[tuple[str, list[int], str, float, float]], modality: str) -> str:
    """<think> walks structures in reading order citing <bbox>, then <answer> with findings.

    items: (name, frame box, laterality, width mm, height mm) in reading order.
    """
    if not items:
        return ("<think>\nNo labelled structure is visible.\n</think>\n"
                "<answer>No labelled structure is visible in this image.</answer>")
    steps = [f"The {name} at <bbox>{json.dumps(box)}</bbox>."
             for name, box, _, _, _ in items]
    findings = "; ".join(f"{name} ({side}, {w:.0f} x {h:.0f} mm)"
                         for name, _, side, w, h in items)
    return ("<think>\n" + "\n".join(steps) + "\n</think>\n"
            f"<answer>{modality}, {len(items)} structures: {findings}.</answer>")


def ct_items(study: CTStudy, k: int) -> list[tuple[str, list[int], str, float, float]]:
    """Report items for axial slice k: frame box, laterality and in-plane size in mm."""
    _, h, w = study.volume.shape
    fmap = frame_map(h, w)
    sy, sx = study.spacing[1], study.spacing[2]
    items = []
    for name, m in present(study, k).items():
        box = mask_box(m)
        items.append((name, frame_box(box, fmap), side_of(box, w),
                      (box[2] - box[0]) * sx, (box[3] - box[1]) * sy))
    return items


# ----------------------------------------------------------------------------- DRR (X-ray)
def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) from HU at ~70 keV; bone a little harder, as in DRR practice."""
    mu_water = 0.0195
    mu = mu_water * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)
    mu = np.where(hu > 150, mu * 1.4, mu)
    return np.clip(mu, 0.0, None)


def drr(study: CTStudy, z_range: tuple[int, int], x_range: tuple[int, int],
        gamma: float = 1.0) -> tuple[np.ndarray, float]:
    """AP radiograph (Beer-Lambert line integral through y) of a slab: uint8 (rows, cols).

    Rows run head (top) to feet, columns keep the patient's right on the image left; rows are
    resampled so pixels are square (returned pixel size in mm).
    """
    z0, z1 = z_range
    x0, x1 = x_range
    vol = study.volume[z0:z1, :, x0:x1]
    line = hu_to_mu(vol).sum(axis=1) * study.spacing[1]  # (Z, X) integral of mu dl
    # log-transformed detector signal, -ln(I/I0) = line integral: bright bone, dark lungs
    img = line[::-1]  # superior at the top
    scale = study.spacing[0] / study.spacing[2]
    rows = int(round(img.shape[0] * scale))
    src = (np.arange(rows) + 0.5) / scale - 0.5
    src = np.clip(src, 0, img.shape[0] - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, img.shape[0] - 1)
    t = (src - lo)[:, None]
    img = img[lo] * (1 - t) + img[hi] * t
    a, b = np.percentile(img, (0.5, 99.5))
    img = np.clip((img - a) / max(b - a, 1e-6), 0, 1) ** gamma
    return np.rint(img * 255).astype(np.uint8), float(study.spacing[2])


def drr_boxes(study: CTStudy, z_range: tuple[int, int], x_range: tuple[int, int]
              ) -> dict[str, list[float]]:
    """3D masks projected onto the DRR: box per structure in DRR pixels, in reading order."""
    z0, z1 = z_range
    x0, x1 = x_range
    scale = study.spacing[0] / study.spacing[2]
    rows_total = int(round((z1 - z0) * scale))
    out = {}
    for name in NAMES:
        m = study.mask(name)[z0:z1, :, x0:x1].any(axis=1)  # (Z, X)
        if m.sum() < 20:
            continue
        zs = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        # slice z (0 = inferior) maps to rows counted from the top of the flipped image
        top = (z1 - z0 - 1 - zs[-1]) * scale
        bottom = (z1 - z0 - zs[0]) * scale
        out[name] = [float(xs[0]), float(max(top, 0)), float(xs[-1] + 1),
                     float(min(bottom, rows_total))]
    return out


DRR_VIEWS = [  # (z range, x range, gamma): whole FOV, chest, abdomen, narrower crops
    ((0, 133), (0, 512), 1.0), ((0, 133), (0, 512), 0.8), ((0, 133), (0, 512), 1.3),
    ((40, 133), (0, 512), 1.0), ((50, 133), (16, 496), 0.9), ((30, 133), (32, 480), 1.1),
    ((0, 80), (0, 512), 1.0), ((0, 70), (24, 488), 0.9), ((10, 90), (0, 512), 1.2),
    ((20, 120), (40, 472), 1.0), ((0, 110), (0, 512), 1.1), ((60, 133), (0, 512), 1.0),
]


def drr_items(study: CTStudy, z_range, x_range, shape: tuple[int, int], pixel_mm: float):
    fmap = frame_map(*shape)
    return [(name, frame_box(box, fmap), side_of(box, shape[1]),
             (box[2] - box[0]) * pixel_mm, (box[3] - box[1]) * pixel_mm)
            for name, box in drr_boxes(study, z_range, x_range).items()]


# ----------------------------------------------------------------------------- samples
def build_samples(study: CTStudy, drr_names: list[str], drr_meta: list[dict],
                  seed: int = 0) -> list[dict]:
    """Every (image, prompt, answer) sample; CT samples carry slice index and split."""
    rng = np.random.default_rng(seed)
    samples: list[dict] = []
    z, h, w = study.volume.shape
    fmap = frame_map(h, w)
    for k in range(z):
        split = split_of(k)
        if split == "guard":
            continue
        on = present(study, k)
        for name in NAMES:
            box = mask_box(on[name]) if name in on else None
            for p in SEGMENT_PROMPTS:
                samples.append(dict(image=f"ct:{k}", slice=k, split=split, task="segment",
                                    structure=name, prompt=p.format(s=name),
                                    answer=segment_answer(name)))
            for p in DETECT_PROMPTS:
                fb = None if box is None else frame_box(box, fmap)
                samples.append(dict(image=f"ct:{k}", slice=k, split=split, task="detect",
                                    structure=name, prompt=p.format(s=name),
                                    answer=detect_answer(name, fb),
                                    box=fb))
        items = ct_items(study, k)
        for p in REPORT_PROMPTS:
            samples.append(dict(image=f"ct:{k}", slice=k, split=split, task="report",
                                structure=None, prompt=p, answer=report_answer(items, "CT"),
                                cited=[it[0] for it in items]))
    for fname, meta in zip(drr_names, drr_meta):
        items = drr_items(study, meta["z_range"], meta["x_range"], tuple(meta["shape"]),
                          meta["pixel_mm"])
        fmap_d = frame_map(*meta["shape"])
        for p in XRAY_REPORT_PROMPTS:
            samples.append(dict(image=f"drr:{fname}", slice=None, split="train", task="report",
                                structure=None, prompt=p,
                                answer=report_answer(items, "X-ray"),
                                cited=[it[0] for it in items]))
        boxes = drr_boxes(study, meta["z_range"], meta["x_range"])
        for name in NAMES:
            fb = frame_box(boxes[name], fmap_d) if name in boxes else None
            p = DETECT_PROMPTS[int(rng.integers(len(DETECT_PROMPTS)))]
            samples.append(dict(image=f"drr:{fname}", slice=None, split="train", task="detect",
                                structure=name, prompt=p.format(s=name),
                                answer=detect_answer(name, fb), box=fb))
    for k in range(z):  # pairs after the DRR samples: the order the shipped weights saw
        split = split_of(k)
        if split == "guard":
            continue
        on = present(study, k)
        for plural, members in PAIRS.items():
            objects = [{"bbox_2d": frame_box(mask_box(on[m]), fmap), "label": m}
                       for m in members if m in on]
            for p in PLURAL_DETECT_PROMPTS:
                samples.append(dict(image=f"ct:{k}", slice=k, split=split, task="detect",
                                    structure=plural, prompt=p.format(p=plural),
                                    answer=plural_detect_answer(plural, objects), box=None))
    wording = np.random.default_rng(seed + 7)
    for sample in samples:
        if wording.random() < CASUAL_SHARE:
            sample["prompt"] = casual(sample["prompt"], wording)
    return samples


def build_nano_data(out_dir: str | Path = "work/nano_data", root: Path | None = None,
                    seed: int = 0) -> Path:
    """Write volume.npy, labels.npy, drr/*.png, samples.jsonl and meta.json; return out_dir."""
    from PIL import Image

    out = Path(out_dir)
    (out / "drr").mkdir(parents=True, exist_ok=True)
    study = load_study(root)
    np.save(out / "volume.npy", study.volume)
    np.save(out / "labels.npy", study.labels)
    names, metas = [], []
    for i, (zr, xr, gamma) in enumerate(DRR_VIEWS):
        img, pixel_mm = drr(study, zr, xr, gamma)
        name = f"drr_{i:02d}.png"
        Image.fromarray(img).save(out / "drr" / name)
        names.append(name)
        metas.append(dict(z_range=list(zr), x_range=list(xr), gamma=gamma,
                          shape=list(img.shape), pixel_mm=pixel_mm,
                          boxes=drr_boxes(study, zr, xr)))
    samples = build_samples(study, names, metas, seed)
    with open(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    counts: dict[str, int] = {}
    for s in samples:
        key = f"{s['split']}/{s['task']}"
        counts[key] = counts.get(key, 0) + 1
    meta = dict(structures=NAMES, held_out_blocks=HELD_OUT_BLOCKS, guard=GUARD,
                spacing=study.spacing, shape=list(study.volume.shape), drr=dict(zip(names, metas)),
                counts=counts, seed=seed,
                windows=[w or "auto" for w in TRAIN_WINDOWS], data_version=DATA_VERSION)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def data_is_current(data_dir: str | Path, seed: int | None = None) -> bool:
    """Whether `data_dir` holds data built by this version of the builder (an older build
    would silently train an older recipe) and, when `seed` is given, with that seed (the
    seed draws the questions' wording and windows: `citrusv train --seed 1` on data built
    for seed 0 would not be the run its seed names)."""
    d = Path(data_dir)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return ((d / "samples.jsonl").is_file() and meta.get("data_version") == DATA_VERSION
            and (seed is None or meta.get("seed") == seed))


@dataclass
class NanoData:
    """The built data, loaded: CT arrays, DRR images and the sample list."""

    volume: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    drr: dict[str, np.ndarray]
    samples: list[dict]
    meta: dict

    def mask(self, name: str, k: int) -> np.ndarray:
        return self.labels[k] == NAMES.index(name) + 1


def load_nano_data(data_dir: str | Path) -> NanoData:
    from PIL import Image

    d = Path(data_dir)
    meta = json.loads((d / "meta.json").read_text())
    samples = [json.loads(line) for line in open(d / "samples.jsonl")]
    drrs = {name: np.asarray(Image.open(d / "drr" / name)) for name in meta["drr"]}
    return NanoData(np.load(d / "volume.npy"), np.load(d / "labels.npy"),
                    tuple(meta["spacing"]), drrs, samples, meta)
