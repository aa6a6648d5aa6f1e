"""One colour per structure, shared by the Slicer segments and the headless overlay PNG."""

from __future__ import annotations

# Close to Slicer's GenericAnatomyColors for the structures Citrus-V is asked about most.
ANATOMY_COLORS: dict[str, tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "left kidney": (185, 102, 83),
    "right kidney": (185, 102, 83),
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98),
    "aorta": (224, 97, 76),
    "heart": (206, 110, 84),
    "lung": (197, 165, 145),
    "left lung": (197, 165, 145),
    "right lung": (197, 165, 145),
    "bone": (241, 214, 145),
    "rib": (241, 214, 145),
    "spine": (241, 214, 145),
    "vertebra": (241, 214, 145),
    "bladder": (222, 154, 132),
    "urinary bladder": (222, 154, 132),
    "lesion": (255, 60, 60),
    "tumor": (255, 60, 60),
    "nodule": (255, 60, 60),
}

# Distinct fall-back colours (tab10 without grey), picked by label index.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)


def label_color(label: str, label_index: int = 1) -> tuple[int, int, int]:
    """RGB 0..255 for a structure: anatomy colour when known, else a palette entry."""
    key = label.strip().lower()
    if key in ANATOMY_COLORS:
        return ANATOMY_COLORS[key]
    for name, color in ANATOMY_COLORS.items():
        if name in key:
            return color
    return PALETTE[(max(int(label_index), 1) - 1) % len(PALETTE)]


def label_color_float(label: str, label_index: int = 1) -> tuple[float, float, float]:
    """The same colour as 0..1 floats (vtkSegment.SetColor)."""
    r, g, b = label_color(label, label_index)
    return (r / 255.0, g / 255.0, b / 255.0)
