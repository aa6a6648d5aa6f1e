"""Model text -> boxes (in the Qwen frame), reasoning steps citing them, answer, [SEG] labels.

Tolerant by design: a malformed box becomes a warning, never an exception.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from dataclasses import dataclass, field

SEG_TOKEN = "[SEG]"
TASKS = ("segment", "detect", "report", "closer_look")

_NUM = r"-?\d+(?:\.\d+)?"
_JSON_OBJ = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}", re.S)
_QWEN_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>(?P<body>.*?)<\|box_end\|>", re.S)
_BBOX_TAG = re.compile(r"<bbox>(?P<body>.*?)</bbox>", re.S)
_NAMED_BBOX = re.compile(r"['\"](?P<name>[^'\"\n]{1,60})['\"]\s+with\s+bbox\s*\[(?P<body>[^\]]*)\]")
# "No liver is visible in this image." / "No kidneys are visible": what the answer says is absent
_ABSENT = re.compile(r"\b[Nn]o\s+(?P<label>[a-z][a-z\- ]{0,40}?)\s+(?P<verb>is|are)\s+visible\b")
_SPECIAL = re.compile(r"<\|(?:im_end|im_start|endoftext|object_ref_start|object_ref_end)\|>")
_STOP = {
    "a", "an", "the", "is", "are", "at", "in", "on", "of", "with", "and", "its", "it", "this",
    "that", "here", "there", "sure", "bbox", "box", "boxes", "region", "located", "seen",
    "shown", "mask", "segmentation", "found", "which", "as", "to", "for", "by", "be", "can",
    "see", "visible", "area", "compare", "compared", "like", "than", "near", "next", "lies", "appears", "i", "we", "you", "ok", "okay", "result",
}
# words asking for a structure's volume ("What is the volume of the spleen?", "Liver volume?"),
# not those of "Segment the liver in this volume."
_VOLUME_WORDS = r"\bvolumes? of\b|(?<!this )(?<!the )(?<!a )(?<!whole )(?<!entire )\bvolumes?\?"
# The task a question asks for, by its words: the first task in this order whose words it has
# (a segmentation question may say "where": "Where is the spleen? Output its mask."); none:
# "report", a question such as "Is this normal?" is answered in prose. Slicer's Python cannot
# import this package, so `CitrusVLib.headless.guess_task` has a copy of the rule (what
# `citrusv ask --server` routes by); tests/app/test_readers_agree.py keeps the two equal.
_OPENING_VERB = r"^\s*(?:(?:please|pls|can you|could you|would you)\s+)?"
# a question comparing structures' sizes ("Which kidney is larger?", "Compare the kidneys.",
# "Is the spleen bigger than the liver?"); not "larger than normal", "compare with the prior"
_COMPARE_WORDS = (r"\bcompare\s+the\b|\b(?:which|what)\b[^.?!]*\b(?:larger|bigger|smaller|largest"
                  r"|biggest|smallest)\b|\b(?:larger|bigger|smaller)\s+than\s+the\b")
_TASK_WORDS = [
    ("report", r"\breport|\bdescrib|\bfindings?\b|step by step|\bdiagnos|\bimpression|\bsummar"
               # what is on the slice ("What structures are visible?", "What do you see?")
               r"|\b(?:what|which|list(?: the| all)?) (?:structures|organs|anatomy)\b"
               r"|\bwhat do you see\b|\bwhat(?:'s| is) (?:on|in) (?:this|the) (?:slice|image|scan)\b"),
    # a size question ("How big is the liver?") is answered by a mask and its area in mm², and
    # a volume question ("What is the volume of the spleen?", "Liver volume?") likewise, with
    # its volume in mL over a slice range (`Result.to_json`, "volumes_ml")
    ("segment", r"\bsegment|\bmasks?\b|\bdelineat|\boutline|\bcontour|\bhighlight"
                r"|\bhow (?:big|large)\b|\bsize\b|\bmeasur"
                r"|" + _VOLUME_WORDS + "|" + _COMPARE_WORDS),
    ("detect", r"\bdetect|\blocat|\bwhere\b|\bfind\b|\bidentif|\bb?box|\bbounding"
               r"|\bshow (?:me )?(?:the|both|all)\b|\bpoint (?:out|to)\b|\bhow many\b"
               r"|\bcount\b"),
    # an annotation tool's verbs opening a question ("Label the spleen.", "Draw the left
    # kidney.", "Paint the liver.", "Seg the liver"), after the box words ("Draw a box around
    # the liver." is a detection) and only as its first word ("trace ascites" is an amount)
    ("segment", _OPENING_VERB + r"(?:draw|mark|label|annotate|paint|trace|seg)\b"),
]


@dataclass
class ParsedBox:
    """A box as the model wrote it: label and [x1, y1, x2, y2] in the Qwen frame."""

    label: str
    xyxy: list[float]
    start: int
    end: int
    source: str
    id: str = ""


@dataclass
class ParsedStep:
    text: str
    box_ids: list[str] = field(default_factory=list)


@dataclass
class Parsed:
    boxes: list[ParsedBox] = field(default_factory=list)
    steps: list[ParsedStep] = field(default_factory=list)
    answer: str = ""
    seg_labels: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    absent: list[tuple[str, str]] = field(default_factory=list)  # (label, "is" | "are")
    dropped: list[str] = field(default_factory=list)  # labels of boxes with no area


def asks_for_report(prompt: str) -> bool:
    """Whether a question's words ask for a report ("Write a report.", "What are the
    findings?"), not only fall to the report task for want of other task words ("Is the
    liver normal?")."""
    return bool(re.search(_TASK_WORDS[0][1], prompt.lower()))


_SLICES_NAMED = re.compile(
    r"\b(?:slices?|images?|sections?)\s+(?:no\.?\s*)?\d+(?:\s*(?:-|–|to|through|and)\s*\d+)?"
    r"|\b(?:all|every|each)\s+(?:of\s+the\s+)?(?:slices|sections|images)\b"
    r"|\b(?:the\s+)?(?:whole|entire)\s+(?:volume|scan|ct|study|series)\b"
    r"|\bin\s+3d\b")


def names_slices(prompt: str) -> str | None:
    """The slices a question's words name ("Segment the liver on slices 40 to 60." ->
    "slices 40 to 60"; "... in the whole volume"), else None: the slices asked about are
    chosen with the request, not by the words."""
    m = _SLICES_NAMED.search((prompt or "").lower())
    return prompt[m.start():m.end()] if m else None


def asks_to_compare(prompt: str) -> bool:
    """Whether a question compares structures' sizes ("Which kidney is larger?", "Compare
    the kidneys."): a segmentation, whose masks' areas (one slice) or volumes (a range) the
    engine compares in its answer."""
    return bool(re.search(_COMPARE_WORDS, (prompt or "").lower()))


# words asking for a structure's size ("Measure the liver.", "How big is the spleen?", "Segment
# the liver and tell me its size.")
_MEASURE_WORDS = (r"\bmeasure|\bhow (?:big|large|long|wide|thick)\b|\b(?:diameters?|sizes?|areas?"
                  r"|width|length|thickness|dimensions?|measurements?|calibre|caliber)\b")


def asks_to_measure(prompt: str) -> bool:
    """Whether a question asks for a structure's size ("Measure the liver.", "How big is the
    spleen?", "What is the diameter of the aorta?"): a segmentation, whose masks' sizes the
    engine gives in its answer."""
    return bool(re.search(_MEASURE_WORDS, (prompt or "").lower()))


def asks_for_volume(prompt: str) -> bool:
    """Whether a question asks for a structure's volume ("What is the volume of the
    spleen?", "Liver volume?"), not "Segment the liver in this volume."."""
    return bool(re.search(_VOLUME_WORDS, (prompt or "").lower()))


def infer_task(prompt: str) -> str:
    """Route a free-text question to segment / detect / report from its wording, a misspelt
    task word opening it read as the word it is close to (`misspelt_task_word`)."""
    low = respelled(prompt, slipped_letters(prompt, _TASK_SPELLINGS)).lower()
    for task, pattern in _TASK_WORDS:
        if re.search(pattern, low):
            return task
    typo = misspelt_task_word(prompt)
    return TASK_VERBS[typo[1]] if typo else "report"


# the words of _TASK_WORDS a question may have typed with a slip of one key ("Write a
# reprot.", "Where is the liver? Output its maks."); Slicer's copy: `CitrusVLib.headless`
_TASK_SPELLINGS = frozenset({
    "report", "describe", "findings", "finding", "diagnosis", "impression", "summary",
    "summarise", "summarize", "step", "segment", "mask", "delineate", "outline", "contour",
    "highlight", "measure", "detect", "locate", "where", "find", "identify", "bounding",
    "show", "point", "count", "structures", "organs", "anatomy"})


# English words (and names) a slip of a word it knows (`slipped_letters`) would be: the
# words of wordfreq's 100,000 most frequent English ones that are a word of _TASK_SPELLINGS or
# _KNOWN_WORDS with two neighbouring letters swapped, one letter dropped or one doubled, less
# the typos that list holds ("maks", "wher"), plus anatomy terms ("cardia", "spina"). A
# question that has one means it as typed ("Is there a pine?", "Are the eternal ...").
_NOT_SLIPS = frozenset({
    "arcs", "badder", "beast", "beasts", "bled", "bonding", "bowl", "bowls", "bran", "brian",
    "cardia", "celia", "chess", "cods", "coord", "coords", "elvis",
    "eternal", "eternals", "fining", "gals", "glad", "glans", "hart", "harts", "hear", "hears",
    "hearst", "heat", "heats", "here", "ilia", "infact", "interna", "ladder", "ladders", "land",
    "lands", "leeds", "lets", "live", "lives", "lobs", "lugs", "mall", "malls", "mans", "mins",
    "nods", "noes", "odes", "ones", "pine", "pines", "pint", "plural", "plurals", "porta",
    "rain", "rains", "real", "reals", "rectus", "roost", "rots", "scrum", "scrums", "sent",
    "sine", "sines", "spies", "spin", "spina", "spins", "steep", "summaries", "tent", "tents",
    "tone", "tones", "tubs", "tues", "vary", "were", "whee"})


def slips(word: str) -> list[str]:
    """The words `word` may be a slip of: with two neighbouring letters swapped back, one
    letter put back where it was dropped ("repor" -> "report"), or one doubled letter single
    ("spleeen" -> "spleen")."""
    out = [word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)
           if word[i] != word[i + 1]]
    out += [word[:i] + word[i + 1:] for i in range(1, len(word)) if word[i] == word[i - 1]]
    out += [word[:i] + c + word[i:] for i in range(len(word) + 1)
            for c in "abcdefghijklmnopqrstuvwxyz"]
    return list(dict.fromkeys(w for w in out if w != word))


def slipped_letters(prompt: str, known=None) -> list[tuple[str, str]]:
    """(as typed, as read) for each word of four letters or more anywhere in a question that
    is no word it knows (`known`: _TASK_SPELLINGS and the anatomy words, `misspelt_names`)
    but one of them with a slip of one key (`slips`: "reprot" or "repor" -> "report",
    "lvier" or "livr" -> "liver", "kidny" -> "kidney", "spleeen" -> "spleen"), each once. An
    English word that is such a slip is meant as typed (_NOT_SLIPS: "live", "here")."""
    known = _TASK_SPELLINGS | _KNOWN_WORDS if known is None else known
    out: list[tuple[str, str]] = []
    for word in dict.fromkeys(re.findall(r"[a-z]{4,}", (prompt or "").lower())):
        if word in known or word in _NOT_SLIPS or _known(word):
            continue
        meant = next((w for w in slips(word) if w in known), None)
        if meant:
            out.append((word, meant))
    return out


# a misspelt task word opening a question with no task words ("Segmnet the liver.", "Locte
# the spleen.", "Descirbe this slice."), read as the closest of these
TASK_VERBS = {"segment": "segment", "delineate": "segment", "outline": "segment",
              "contour": "segment", "highlight": "segment", "detect": "detect",
              "locate": "detect", "identify": "detect", "describe": "report",
              "summarise": "report", "summarize": "report"}
# English words as close to one of them as typos are, which are no typo
_NOT_TASK_TYPOS = frozenset({"identity", "relocate", "allocate", "outlive", "scribe"})
_OPENING = re.compile(r"\s*(?:(?:please|pls|can you|could you|would you)\s+)?([a-z]+)\b")


def misspelt_task_word(prompt: str) -> tuple[str, str] | None:
    """(as typed, as read) for the first word of a question that has no task words
    (`infer_task`), after "please" or "can you", when it is five letters or more and close to
    one of TASK_VERBS (difflib's ratio ≥ 0.85: "segmnet" -> "segment", "locte" -> "locate";
    English words as close, "identity", are left alone), else None. Slicer's copy:
    `CitrusVLib.headless.guess_task`."""
    low = (prompt or "").lower()
    if any(re.search(pattern, low) for _, pattern in _TASK_WORDS):
        return None
    m = _OPENING.match(low)
    word = m.group(1) if m else ""
    if len(word) < 5 or word in _NOT_TASK_TYPOS:
        return None
    close = difflib.get_close_matches(word, TASK_VERBS, n=1, cutoff=0.85)
    return (word, close[0]) if close else None


# what a question asks for follows one of these words ("a mask of both kidneys", "boxes
# around the liver and the spleen", "where's the heart")
_ASKED_FOR = (r"(?:segment|outline|delineate|contour|detect|locate|find|identify|mask"
              r"|highlight|show(?:\s+me)?(?=\s+(?:the|both|all)\b)|point\s+(?:out|to)"
              r"|how (?:big|large) (?:is|are)|size of|volumes? of|measure"
              r"|where(?:'s|\s+(?:is|are))|where(?=\s+the\b)"
              r"|(?:bounding\s+)?box(?:es)?\s+(?:around|on|for|of))"
              r"\s+(?:of\s+)?(?:all\s+|both\s+)?(?:the\s+)?(?:bilateral\s+)?")
# ... and ends before one of these ("Where is the liver located?", "Outline the aorta for
# me.", "Show me where the spleen is.")
_ASKED_END = (r"\s+(?:in|on|from|of this|within|please|for|is|are|located|lies|lie"
              r"|compared|than|versus|vs|bilaterally)\b")


def prompt_target(prompt: str) -> str:
    """The structure a prompt names ("segment the liver in ..." -> "liver"), or ""."""
    m = re.search(_ASKED_FOR + r"(?P<t>[a-z][a-z0-9 \-]*?)" + rf"(?={_ASKED_END}|[.?!,]|$)",
                  prompt.lower())
    return m.group("t").strip() if m else ""


def parse_output(text: str, prompt: str = "") -> Parsed:
    """Parse boxes, the <think>/<answer> trace and [SEG] labels out of model text."""
    out = Parsed()
    raw: list[ParsedBox] = []
    taken: list[tuple[int, int]] = []

    for m in _JSON_OBJ.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            out.warnings.append(f"dropped a box that is not valid JSON: {m.group(0)[:60]!r}")
            continue
        label = str(obj.get("label", "")).strip()
        xyxy = _four_numbers(obj.get("bbox_2d"))
        if xyxy is None:
            out.warnings.append(f"dropped box '{label}': bbox_2d is not four numbers")
            continue
        raw.append(ParsedBox(label, xyxy, m.start(), m.end(), "json"))
        taken.append((m.start(), m.end()))

    for m in _QWEN_BOX.finditer(text):
        nums = re.findall(_NUM, m.group("body"))
        label = (m.group("ref") or "").strip() or _label_before(text, m.start())
        if len(nums) != 4:
            out.warnings.append(f"dropped box '{label}': <|box_start|> needs (x1,y1),(x2,y2)")
            continue
        raw.append(ParsedBox(label, [float(v) for v in nums], m.start(), m.end(), "box_start"))

    for m in _NAMED_BBOX.finditer(text):
        label = m.group("name").strip()
        xyxy = _four_numbers(m.group("body"))
        if xyxy is None:
            out.warnings.append(f"dropped box '{label}': bbox needs four numbers")
            continue
        raw.append(ParsedBox(label, xyxy, m.start(), m.end(), "named"))
        taken.append((m.start(), m.end()))

    for m in _BBOX_TAG.finditer(text):
        if any(a <= m.start() < b for a, b in taken):
            continue
        label = _label_before(text, m.start())
        xyxy = _four_numbers(m.group("body"))
        if xyxy is None:
            out.warnings.append(f"dropped box '{label}': <bbox> needs [x1, y1, x2, y2]")
            continue
        raw.append(ParsedBox(label, xyxy, m.start(), m.end(), "bbox"))

    raw.sort(key=lambda b: b.start)
    ids: dict[tuple, str] = {}
    for box in raw:
        x1, y1, x2, y2 = box.xyxy
        if x2 < x1 or y2 < y1:
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
            box.xyxy = [x1, y1, x2, y2]
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            out.warnings.append(f"dropped box '{box.label}': it has zero area")
            out.dropped.append(box.label)
            continue
        key = tuple(round(v, 1) for v in box.xyxy)
        if key not in ids:
            ids[key] = f"b{len(ids) + 1}"
            box.id = ids[key]
            out.boxes.append(box)
        else:
            box.id = ids[key]
    spans = [(b.start, b.id) for b in raw if b.id]

    out.steps = _steps(text, spans)
    out.answer = _answer(text)
    out.seg_labels = _seg_labels(text, prompt)
    out.absent = absent_labels(_SPECIAL.sub("", text))
    return out


# ----------------------------------------------------------------------------- asked vs answered
SIDES = frozenset({"left", "right"})
# label words that name no structure ("segment 2" is the engine's name for an unlabelled mask)
_UNNAMING = frozenset({"the", "a", "an", "of", "and", "segment", "structure", "region"})
# adjectives a question may use for what an answer names by its noun ("renal" -> "kidney")
_ADJECTIVE_NOUN = {"hepatic": "liver", "renal": "kidney", "pulmonary": "lung",
                   "cardiac": "heart", "gastric": "stomach", "splenic": "spleen",
                   "aortic": "aorta"}
# what such an adjective names that is not its organ: "pulmonary artery" is no lung, "aortic
# valve" no aorta, "splenic flexure" (of the colon) no spleen
_NOT_THE_ORGAN = frozenset({"artery", "arteries", "vein", "veins", "valve", "valves", "trunk",
                            "duct", "ducts", "embolism", "embolus", "emboli", "flexure"})


def _stems(text: str) -> set[str]:
    """Lower-case words, plural -s / -ies cut and adjectives turned into their nouns, so that
    "Find the kidneys." and "left kidney" share "kidney" (and "cardiomegaly" has "heart"),
    except before a vessel or other structure of its own ("pulmonary artery")."""
    out = set()
    words = re.findall(r"[a-z]+", (text or "").lower())
    for i, w in enumerate(words):
        if w in _ADJECTIVE_NOUN and i + 1 < len(words) and words[i + 1] in _NOT_THE_ORGAN:
            out.add(w)
            continue
        if w in _ENLARGED:
            out |= _stems(" ".join(_ENLARGED[w]))
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and len(w) > 3 and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.add(_ADJECTIVE_NOUN.get(w, w))
    return out


# parts of a structure that a model may mark only as a whole, each with the whole it is part
# of, what such a model marks and what to call the part: lung lobes by name or abbreviation
# (upper, middle and lower lobes are the lungs'; the liver's are caudate and quadrate), heart
# chambers, the liver's lobes and segments, the stomach's parts, the kidney's inner parts
_LOBE_SIDE = {"lul": "left", "lll": "left", "lingula": "left", "rul": "right", "rml": "right",
              "rll": "right"}


def _lung_of(m: re.Match) -> str:
    side = (_LOBE_SIDE.get(m.group("abbr") or "") or m.group("side") or m.group("lung_side")
            or ("right" if m.group("part") == "middle" else None))
    return f"{side} lung" if side else "lungs"


def _kidney_of(m: re.Match) -> str:
    return f"{m.group('side')} kidney" if m.group("side") else "kidneys"


_PARTS = (
    # "left upper lobe", "left lung upper lobe", "right lower lung lobe", "upper lobe of the
    # left lung", "LUL"
    (re.compile(r"\b(?:(?P<side>left|right)\s+)?(?:lung\s+)?(?P<part>upper|middle|lower)\s+"
                r"(?:lung\s+)?lobes?\b(?:\s+of\s+the\s+(?P<lung_side>left|right)\s+lung\b)?"
                r"|\b(?P<abbr>lul|lll|rul|rml|rll|lingula)\b"),
     _lung_of, "lungs, not their lobes", "lobe"),
    (re.compile(r"\b(?:(?:left|right)\s+)?(?:ventricles?|atri(?:um|a))\b|\bmyocardium\b"
                r"|\b(?:lv|rv)\b|\bcardiac\s+chambers?\b"),
     lambda m: "heart", "the heart as one, not its chambers", "chamber"),
    (re.compile(r"\baortic\s+(?:arch|root|bulb)\b|\b(?:ascending|descending)\s+aorta\b"),
     lambda m: "aorta", "the aorta as one, not its parts", "part"),
    (re.compile(r"\b(?:caudate|quadrate)\s+lobe\b|\bcouinaud\s+segments?\b"
                r"|\b(?:right|left)\s+(?:hepatic\s+lobe|lobe\s+of\s+the\s+liver)\b"),
     lambda m: "liver", "the liver as one, not its lobes or segments", "part"),
    (re.compile(r"\b(?:gastric\s+)?(?:fundus|antrum|pylorus)\b|\bgastric\s+body\b"),
     lambda m: "stomach", "the stomach as one, not its parts", "part"),
    (re.compile(r"\b(?:(?P<side>left|right)\s+)?renal\s+(?:pelvi|cort|medull|sinus)\w*"),
     _kidney_of, "kidneys as wholes, not their parts", "part"),
    (re.compile(r"\b(?:upper|lower)\s+poles?\s+of\s+the\s+(?P<side>left|right)\s+kidney\b"),
     _kidney_of, "kidneys as wholes, not their parts", "part"),
)


_PLURAL_WHOLES = frozenset({"lungs", "kidneys"})
_MANY_PARTS = re.compile(r"(?:lobes|ventricles|atria|segments|chambers)$")


def _parts_found(text: str) -> list[tuple[str, str, str, str]]:
    """Each part `_PARTS` knows in `text`: (as written, its whole, what is marked, unit)."""
    found = []
    for pattern, whole, marks, unit in _PARTS:
        found += [(m.start(), m.group(0), whole(m), marks, unit)
                  for m in pattern.finditer((text or "").lower())]
    return [f[1:] for f in sorted(found)]  # in the order written


def whole_of(name: str) -> str | None:
    """The structure a part named in a question belongs to, for a model that marks it only
    as a whole: a lung lobe its lung ("left upper lobe", "LUL", "lingula" -> "left lung";
    "middle lobe" -> "right lung", which alone has one; "lower lobes" or "upper lobe" with no
    side -> "lungs"), a heart chamber the heart ("left ventricle", "LV", "myocardium"), the
    aortic arch or the ascending aorta the aorta, the caudate or right lobe the liver, the
    gastric fundus or antrum the stomach, the renal pelvis or the lower pole of the left kidney
    that kidney (nano, asked for the left upper lobe, segments the right lung; asked for the
    left lung, the left one). None for anything else."""
    found = _parts_found(name)
    return found[0][1] if found else None


def parts_named(prompt: str) -> list[tuple[str, str]]:
    """Each part of a structure a question names (`whole_of`), as written, with its whole
    ("Segment the LUL and the RML." -> [("lul", "left lung"), ("rml", "right lung")])."""
    return [(part, whole) for part, whole, _, _ in _parts_found(prompt)]


def whole_warning(prompt: str, task: str, labels) -> str | None:
    """A sentence when a question asks for a part of a structure (`whole_of`: a lung lobe, a
    heart chamber ...) and the answer is about its whole, not the part: the mask or box is
    the whole's. None otherwise (a model that marks lobes answers with a lobe's name)."""
    labels = [str(x) for x in labels]
    parts = [(part, whole, marks, unit) for part, whole, marks, unit in _parts_found(prompt)
             if answers_about(whole, labels)
             and not any(_stems(x) & (_stems(part) - _stems(whole) - SIDES - _UNNAMING)
                         for x in labels)]
    if not parts:
        return None
    wholes = list(dict.fromkeys(whole for _, whole, _, _ in parts))
    many = len(wholes) > 1 or wholes[0] in _PLURAL_WHOLES
    what = ("masks are" if many else "mask is") if task == "segment" else (
        "boxes are" if many else "box is")
    asked = listed([f"the {part.upper() if len(part) <= 3 else part}" for part, *_ in parts])
    marks = ", and ".join(dict.fromkeys(m for _, _, m, _ in parts))
    units = list(dict.fromkeys(u for *_, u in parts))
    unit = units[0] if len(units) == 1 else "part"
    several = len(parts) > 1 or bool(_MANY_PARTS.search(parts[0][0]))
    return (f"the question asks for {asked}, and the answer's {what} of the {listed(wholes)} "
            f"as a whole: the model marks {marks}, so mark the {unit}{'s' if several else ''} "
            f"yourself.")


def listed(names: list[str], conj: str = "and") -> str:
    """["a", "b", "c"] -> "a, b and c" ("a or b" with conj "or")."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {conj} " + names[-1]


def segment_structure(label: str | None) -> str | None:
    """What a segment's name names, in the model's words: the structure where it names one
    ("Liver", "liver (edited)", "Liver 2" -> "liver"), its words in lower case where it names
    several, a part or a finding ("LUL", "Lesion 1"), None where it names nothing
    ("Segment_1") or no name is given."""
    if not label or not label.strip():
        return None
    names = named_structures(label)
    if len(names) == 1:
        return names[0]
    if names or parts_named(label) or findings_named(label):
        return " ".join(label.split()).lower()
    return None


# a phrase said this many times in a row is no answer (nano on random noise: "right lung right
# lung right lung ..."); a report lists each structure once
GARBLED_REPEATS = 5
# a key of a box list outside any box one can read (nano asked "Segment everything except the
# lungs." on slice 65: 'Sure, 43, 126, 126label": "label": "right lung"}]')
_BOX_LIST_PIECE = re.compile(r'"?\b(?:bbox_2d|label)"\s*:')


def _longest_repeat(words: list[str]) -> tuple[str, int]:
    """The phrase of one to four words said most often in a row, and how often."""
    best = ("", 1)
    for n in range(1, 5):
        i = 0
        while i + 2 * n <= len(words):
            k = 1
            while words[i + k * n:i + (k + 1) * n] == words[i:i + n]:
                k += 1
            if k > best[1]:
                best = (" ".join(words[i:i + n]), k)
            i += max(1, (k - 1) * n) if k > 1 else 1
    return best


def garbled_warning(text: str) -> str | None:
    """A sentence when the model's answer is no language it was taught to write: a phrase over
    and over, or a box list it opened and left with no box one can read. nano writes such
    answers about images unlike its training (noise, a photograph); they were shown with no
    word, or only with "the answer has nothing about the liver"."""
    why = []
    phrase, times = _longest_repeat(re.sub(r"[^\w\s]", " ", text).split())
    if times >= GARBLED_REPEATS:
        why.append(f'it says "{phrase}" {times} times in a row')
    if ("```json" in text and not _JSON_OBJ.search(text)
            or _BOX_LIST_PIECE.search(_JSON_OBJ.sub("", text))):
        why.append("its box list cannot be read")
    if not why:
        return None
    return (f"the model's answer is garbled ({'; '.join(why)}): check all of it against the "
            "image, which may be unlike those the model was trained on.")


def unasked_warning(prompt: str, labels) -> str | None:
    """A sentence for the radiologist when an answer is about something the question did not
    ask for: none of the answer's structures is named in the question (nano, asked for the
    pancreas, which it was never taught, segments the liver), or the question names one side
    and every sided structure of the answer is on the other ("left kidney" asked, "right
    kidney" answered). `labels`: the answer's mask and box labels and the structures it says
    are not visible. None when the answer keeps to the question, or has no named structure."""
    asked = _stems(prompt) | _stems(" ".join(whole for _, whole in parts_named(prompt)))
    named, unnamed = [], []
    for label in dict.fromkeys(str(x).strip() for x in labels if x and str(x).strip()):
        words = _stems(label) - SIDES - _UNNAMING
        if words:
            (named if words & asked else unnamed).append(label)
    if unnamed and not named:
        return (f"the answer is about the {listed(unnamed)}, which the question does not name: "
                "the model may have answered about something other than what was asked "
                "(it may not know that structure), so check the answer is what you wanted.")
    sides = asked & SIDES
    sided = [x for x in named if _stems(x) & SIDES]
    if len(sides) == 1 and sided and not any(_stems(x) & sides for x in sided):
        side = next(iter(sides))
        return (f"the question says {side}, but the answer is about the {listed(sided)}: "
                f"check which side is meant (the patient's {side} is on the image's "
                f"{'right' if side == 'left' else 'left'} in the usual radiological view).")
    return None


# "Segment the heart, aorta and stomach.": the names a question lists, split at commas, "&" and
# "and"; a part that does not read as a structure's name stops the split
_TARGETS = re.compile(_ASKED_FOR + r"(?P<t>[a-z][a-z0-9 ,&\-]*?)" + rf"(?={_ASKED_END}|[.?!;:]|$)")
_LIST_SEP = re.compile(r"\s*(?:,|&|\band\b)\s*(?:and\s+)?(?:the\s+)?")
_NOT_A_NAME = frozenset({"it", "its", "them", "their", "me", "us", "this", "that", "these",
                         "those", "one", "ones", "size", "sizes", "volume", "measure", "show",
                         "tell", "give", "then", "also", "other", "others", "everything",
                         # what a structure is compared with that is none ("than normal")
                         "normal", "usual", "expected", "average", "before", "prior",
                         "previous", "time", "scan", "study", "exam"})


_SHORT_SIDE_DOT = re.compile(r"\b(rt|lt|r|l)\.(?=\s+[a-z])")
_EVERYTHING = re.compile(r"\beverything\b|\b(?:all|every|each)\s+(?:of\s+)?(?:the\s+)?"
                         r"(?:organs?|structures?|anatomy)\b"
                         # "Which is the largest organ on this slice?": all, compared
                         r"|\b(?:largest|biggest|smallest)\s+(?:organ|structure)s?\b"
                         r"|\b(?:which|what)\s+(?:organ|structure)s?\b[^.?!]*"
                         r"\b(?:largest|biggest|smallest)\b")


# "Segment all organs except the liver.": what a question for every structure leaves out
_EXCEPT = re.compile(r"\b(?:except(?:\s+for)?|but(?:\s+not)?|other\s+than|excluding"
                     r"|apart\s+from|besides|without)\s+(?:the\s+)?"
                     r"(?P<t>[a-z][a-z ,&\-]*?)" + rf"(?={_ASKED_END}|[.?!;:]|$)")


def excluded_structures(prompt: str) -> list[str]:
    """The structures a question for every structure (`asks_for_everything`) leaves out
    ("Segment all organs except the liver and the spleen." -> ["liver", "spleen"];
    "... but not the kidneys" -> ["kidneys"]); [] for other questions."""
    low = (prompt or "").lower()
    m = _EXCEPT.search(low) if asks_for_everything(low) else None
    if not m:
        return []
    out = []
    for part in (p.strip() for p in _LIST_SEP.split(m.group("t"))):
        words = part.split()
        if not words or len(words) > 3 or set(words) & _NOT_A_NAME:
            break
        out.append(part)
    return out


def asks_for_everything(prompt: str) -> bool:
    """Whether a question asks for every structure on the image ("Segment all organs.",
    "Find every structure.", "Segment everything.", "Which is the largest organ?"), naming
    none."""
    return bool(_EVERYTHING.search((prompt or "").lower()))


# what is measured of a structure ("the aorta diameter", "the diameter of the aorta"): the
# structure is what is asked for
_MEASURES = (r"(?:diameters?|sizes?|volumes?|areas?|width|length|thickness|dimensions?|extent"
             r"|measurements?|calibre|caliber)")
_MEASURE_OF = re.compile(rf"^{_MEASURES}\s+of\s+(?:the\s+)?")
_MEASURE_AFTER = re.compile(rf"(?<=[a-z])\s+{_MEASURES}$")
# a structure compared with the one asked for is asked for too ("How large is the spleen
# compared to the liver?")
_COMPARED = re.compile(r"\s+(?:compared\s+(?:to|with)|than|versus|vs\.?)\s+(?:that\s+of\s+)?"
                       r"(?:the\s+)?(?P<t>[a-z][a-z0-9 ,&\-]*?)"
                       rf"(?={_ASKED_END}|[.?!;:]|$)")


def prompt_targets(prompt: str) -> list[str]:
    """The structures a segmentation or detection question asks for, in order ("Segment the
    heart, aorta and stomach." -> ["heart", "aorta", "stomach"]; "Find the left and right
    kidneys." -> ["left kidney", "right kidney"]; "Segment both kidneys." -> ["kidneys"]).
    The list ends at the first part that does not read as a name: more than three words, or
    a word such as "it" or "their" ("Locate the liver and spleen, output their bbox
    coordinates ..." lists two; "Find the liver and measure it", one). What is measured of a
    structure is left out ("Measure the aorta diameter.", "Measure the diameter of the
    aorta." -> ["aorta"]); a structure it is compared with is asked for too ("How large is
    the spleen compared to the liver?" -> ["spleen", "liver"]). [] when the question has no
    such words ("Is the liver normal?")."""
    low = _SHORT_SIDE_DOT.sub(r"\1", (prompt or "").lower())  # "rt. kidney": one name
    m = _TARGETS.search(low)
    if not m:
        return []
    parts = [p.strip() for p in _LIST_SEP.split(m.group("t")) if p.strip()]
    also = _COMPARED.match(low, m.end())
    if also:
        parts += [p.strip() for p in _LIST_SEP.split(also.group("t")) if p.strip()]
    parts = [_MEASURE_AFTER.sub("", _MEASURE_OF.sub("", p)) for p in parts]
    for i, part in enumerate(parts):  # "left and right kidneys": "left" takes the noun after it
        if part in SIDES:
            later = next((p.split() for p in parts[i + 1:] if p.split()[0] in SIDES
                          and len(p.split()) > 1), None)
            if later:
                parts[i] = " ".join([part, *later[1:]])
    out = []
    for part in parts:
        words = part.split()
        if len(words) > 3 or set(words) & _NOT_A_NAME or not set(words) - SIDES - _UNNAMING:
            break
        if words[0] in SIDES and words[-1].endswith("s") and not words[-1].endswith(("ss", "us", "is")):
            words[-1] = words[-1][:-3] + "y" if words[-1].endswith("ies") else words[-1][:-1]
        name = " ".join(words)
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- names it knows
# Anatomy a question may name: what a question with no task words is checked against ("Is the
# liver normal?" names the liver), and, with FINDINGS and _NAME_WORDS, the words a misspelt
# name is read as ("Segment the livr." -> liver). Names of the model's training (nano's ten)
# and the common ones of abdominal and chest CT and radiographs; a word in none of them is
# left as typed.
ANATOMY = (
    "liver", "spleen", "kidney", "stomach", "heart", "aorta", "lung", "spinal cord",
    "pancreas", "gallbladder", "gall bladder", "esophagus", "oesophagus", "trachea", "bronchus",
    "urinary bladder", "bladder", "colon", "rectum", "duodenum", "small bowel",
    "small intestine", "bowel", "ileum", "jejunum", "appendix", "adrenal gland", "ureter",
    "prostate", "uterus", "ovary", "brain", "thyroid", "vertebra", "spine", "rib", "sternum",
    "clavicle", "scapula", "humerus", "femur", "hip", "pelvis", "sacrum", "ilium", "skull",
    "diaphragm", "inferior vena cava", "superior vena cava", "vena cava", "portal vein",
    "hepatic vein", "pulmonary artery", "pulmonary vein", "iliac artery", "iliac vein",
    "carotid artery", "subclavian artery", "celiac trunk", "mesenteric artery", "atrium",
    "ventricle", "myocardium", "pericardium", "mediastinum", "pleura", "psoas", "muscle",
    "breast", "lymph node", "thymus", "larynx", "head", "neck", "chest", "thorax", "abdomen",
    "ivc", "svc")
# what a question may ask to find that is no structure ("Find the lesion.")
FINDINGS = (
    "lesion", "mass", "nodule", "tumor", "tumour", "cyst", "stone", "calculus", "fracture",
    "effusion", "fluid", "ascites", "consolidation", "opacity", "pneumothorax", "hemorrhage",
    "haemorrhage", "bleed", "abscess", "metastasis", "metastases", "calcification", "aneurysm",
    "embolism", "thrombus", "infarct", "edema", "oedema", "emphysema", "atelectasis",
    "pneumonia", "catheter", "tube", "stent", "pacemaker", "implant", "abnormality")
# words that go with those names ("upper lobe", "common iliac artery", "lower pole")
_NAME_WORDS = frozenset({
    "left", "right", "upper", "lower", "middle", "inferior", "superior", "anterior",
    "posterior", "common", "internal", "external", "main", "lobe", "lobes", "pole", "ascending",
    "descending", "arch", "abdominal", "thoracic", "lumbar", "cervical", "pleural", "renal",
    "hepatic", "pulmonary", "cardiac", "gastric", "splenic", "aortic", "iliac", "vessel",
    "vessels", "artery", "vein", "gland", "cord", "node", "nodes", "bone", "bones", "organ",
    "organs", "structure", "structures", "wall", "cavity", "root", "hilum", "segment"})
_KNOWN_WORDS = frozenset(w for n in ANATOMY + FINDINGS for w in n.split()) | _NAME_WORDS
_KNOWN_WORDS |= frozenset(w + "s" for w in _KNOWN_WORDS if not w.endswith("s"))  # "kidnys"
_ANATOMY_RE = re.compile(
    r"\b(?:(?P<side>left|right)\s+)?(?P<name>"
    + "|".join(sorted((re.escape(n) for n in ANATOMY), key=len, reverse=True))
    + r")(?P<plural>s|es)?\b")


# words for an organ's enlargement name the organ ("Is there cardiomegaly?": the heart)
_ENLARGED = {"cardiomegaly": ["heart"], "hepatomegaly": ["liver"], "splenomegaly": ["spleen"],
             "hepatosplenomegaly": ["liver", "spleen"], "nephromegaly": ["kidneys"]}
_ENLARGED_RE = re.compile(r"\b(" + "|".join(_ENLARGED) + r")\b")


def named_structures(prompt: str) -> list[str]:
    """The structures of ANATOMY a question names anywhere in it, in order, with their side
    and plural as written ("Is the Liver normal?" -> ["liver"]; "Are the kidneys normal?" ->
    ["kidneys"]; "Is the left kidney smaller than the spleen?" -> ["left kidney", "spleen"]),
    and the organ a word for its enlargement names ("Is there cardiomegaly?" -> ["heart"]):
    what a question with no task words is about. An adjective names nothing ("Is there a
    renal stone?" -> [])."""
    low = (prompt or "").lower()
    found = [(m.start(), " ".join(x for x in (m.group("side"), m.group("name")) if x)
              + (m.group("plural") or "")) for m in _ANATOMY_RE.finditer(low)]
    found += [(m.start(), name) for m in _ENLARGED_RE.finditer(low)
              for name in _ENLARGED[m.group(1)]]
    out: list[str] = []
    for _, name in sorted(found, key=lambda x: x[0]):
        if name not in out:
            out.append(name)
    return out


# words asking whether anything is abnormal ("Is this normal?", "Anything wrong here?", "Is
# there anything in the right kidney?", "Any issues with the aorta?")
_ABNORMAL_RE = re.compile(r"\b(?:ab)?normal(?:ity|ities|ly)?\b|\bpatholog|\bdiseased?\b"
                          r"|\bwrong\b|\bunremarkable\b|\bhealthy\b|\benlarge|\bdilat"
                          r"|\bunusual\b|\bsuspicious\b|\bintact\b|\bproblems?\b|\bissues?\b"
                          r"|\banything\s+(?:in|inside|within|with|odd|strange)\b"
                          r"|\b(?:ok|okay|alright|fine)\s*\?")  # "Is the spleen ok?"
_FINDINGS_RE = re.compile(r"\b(?P<name>" + "|".join(sorted(FINDINGS, key=len, reverse=True))
                          + r")(?:s|es)?\b")


def findings_named(prompt: str) -> list[str]:
    """The findings a question asks about (FINDINGS: "Is there a pleural effusion?" ->
    ["effusion"]; "Any stones?" -> ["stone"]; "Is there cardiomegaly?" -> ["cardiomegaly"]),
    in order, and "abnormality" for a question asking whether something is normal ("Is the
    liver normal?", "Anything wrong here?", "Is the heart enlarged?")."""
    low = (prompt or "").lower()
    found = [(m.start(), m.group("name")) for m in _FINDINGS_RE.finditer(low)]
    found += [(m.start(), "abnormality") for m in _ABNORMAL_RE.finditer(low)]
    found += [(m.start(), m.group(1)) for m in _ENLARGED_RE.finditer(low)]  # "cardiomegaly"
    return list(dict.fromkeys(name for _, name in sorted(found)))


def _named(prompt: str) -> tuple[list[str], list[str]]:
    """(structures, findings) a question names: `named_structures` less body regions ("What
    is in the abdomen?" asks about what is there), and `findings_named`."""
    return ([n for n in named_structures(prompt) if n not in _REGIONS],
            findings_named(prompt))


def known_named(prompt: str, taught) -> list[str]:
    """The structures and findings a question names (`_named`) that a model taught `taught`
    was taught (`untaught`): all of them when `taught` is empty."""
    names, findings = _named(prompt)
    not_names, not_findings = untaught(prompt, taught)
    return ([n for n in names if n not in not_names]
            + [f for f in findings if f not in not_findings])


def untaught(prompt: str, taught) -> tuple[list[str], list[str]]:
    """What a question names that a model taught only `taught` (`CitrusVConfig.structures`,
    nano's ten) was not taught: (structures, findings) ("Segment the pancreas." ->
    (["pancreas"], []); "Is there a pleural effusion?" -> ([], ["effusion"]); "Is the liver
    normal?" -> ([], ["abnormality"])). A part counts as taught with its whole ("left upper
    lobe" with the left lung), a pair's plural with its sides ("kidneys"). Nothing when
    `taught` is empty: the model's knowledge is not listed (the released Citrus-V)."""
    taught = [str(t) for t in taught or []]
    if not taught:
        return [], []
    parts = [(part, whole) for part, whole in parts_named(prompt) if answers_about(whole, taught)]
    names, findings = _named(prompt)
    names = [n for n in names if not answers_about(n, taught)
             and not any(n in part for part, _ in parts)]  # "renal pelvis": the kidney's
    findings = [f for f in findings if not _taught_finding(f, taught)]
    return names, findings


# body regions ANATOMY names, which no model is taught as a structure of its own
_REGIONS = frozenset({"head", "neck", "chest", "thorax", "abdomen"})


def _taught_finding(finding: str, taught) -> bool:
    """Whether a finding's word is in a taught name ("nodule" in "lung nodule"); an organ's
    name does not teach its enlargement ("cardiomegaly" is not the heart)."""
    return any(finding in str(t).lower() for t in taught)


def untaught_warning(prompt: str, taught, model: str = "the model") -> str | None:
    """One sentence on what a question names that the model was not taught (`untaught`): it
    cannot answer about it, whatever it writes. None when it was taught all it names."""
    names, findings = untaught(prompt, taught)
    if not names and not findings:
        return None
    taught = [str(t) for t in taught]
    knows = f"it was taught only the {listed(taught)}"
    out = []
    if names:
        it = "it" if len(names) == 1 else "them"
        out.append(f"{model} was not taught the {listed(names)} ({knows}), so its answer "
                   f"cannot be about {it}: look for {it} yourself.")
        knows = "it was taught only those structures"
    if findings:
        what = [f for f in findings if f != "abnormality"]
        asked = ("whether the image shows any " + listed(what, "or")) if what else ""
        if "abnormality" in findings:
            asked = (asked + ", or " if asked else "") + "whether anything here is abnormal"
        none = not any(_taught_finding(f, taught) for f in FINDINGS)
        out.append(f"{model} was taught {'no findings, only normal anatomy' if none else 'other findings'}"
                   f" ({knows}): it cannot tell {asked}, so read the image yourself.")
    return " ".join(out)

# ----------------------------------------------------------------------------- its language
# Words that are no English words, in the languages a radiologist in Europe may type a
# question in: their articles and task words, and the names of nano's structures
# (`question_language`). Words English has too ("die", "de", "rate", "rein", "lever", "van",
# "os", "links", "hart") are left out: they are no sign of another language.
_FOREIGN_WORDS = {lang: frozenset(words.split()) for lang, words in {
    "fr": ("le les du des une est et dans sur avec pour où quel quelle montrez montre "
           "segmentez segmente trouvez trouve localisez foie poumon poumons estomac coeur "
           "cœur aorte moelle épinière gauche droit droite"),
    "es": ("el los las del una con para dónde donde cuál segmenta segmente encuentra "
           "encuentre localiza localice muestra hígado higado bazo riñón riñon rinon riñones "
           "pulmón pulmon pulmones estómago estomago corazón corazon médula izquierdo "
           "izquierda derecho derecha"),
    "de": ("der das dem ein eine einen und ist mit bitte wo zeige zeigen segmentiere "
           "segmentieren finde finden leber milz niere nieren lunge lungen magen herz "
           "rückenmark ruckenmark linke linken rechte rechten"),
    "it": ("il gli della dello di dov dove segmenta trova mostra fegato milza rene reni "
           "polmone polmoni stomaco cuore midollo sinistro sinistra destro destra"),
    "pt": ("uma não onde segmente encontre mostre fígado figado baço baco pulmão pulmões "
           "estômago coração medula esquerdo esquerda direito direita"),
    "nl": ("het een waar segmenteer vind toon milt nier nieren maag ruggenmerg linker "
           "rechter"),
}.items()}
# letters of scripts other than the Latin one, by the start of their Unicode name
_SCRIPTS = (("HIRAGANA", "ja"), ("KATAKANA", "ja"), ("HANGUL", "ko"), ("CJK", "zh"),
            ("CYRILLIC", "ru"), ("ARABIC", "ar"), ("HEBREW", "he"), ("GREEK", "el"),
            ("DEVANAGARI", "hi"), ("THAI", "th"))
LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ja": "Japanese", "ko": "Korean", "zh": "Chinese",
    "ru": "Russian", "ar": "Arabic", "he": "Hebrew", "el": "Greek", "hi": "Hindi",
    "th": "Thai"}
# an English question of each task, for a question in a language the model was not taught
ENGLISH_EXAMPLES = {"segment": "Please segment the liver in this scan.",
                    "detect": "Locate the liver, output its bbox coordinates using JSON format.",
                    "report": "Write a report, think step by step."}


def question_language(prompt: str) -> tuple[str, list[str]]:
    """(ISO 639-1 code, what shows it) of the language a question reads as: a script other
    than the Latin one ("肝脏分割" -> ("zh", ["肝脏分割"]); kana: "ja"; Cyrillic read as "ru"),
    else the language of the most _FOREIGN_WORDS in it, at least two, or one of four letters
    or more ("Segmentez le foie." -> ("fr", ["segmentez", "le", "foie"]); "Leber?" -> ("de",
    ["leber"])), else ("en", []). One foreign word of three letters or fewer is no sign ("Is
    the L1 vertebra del Toro's?")."""
    found: dict[str, list[str]] = {}
    for ch in prompt or "":
        if ch.isalpha() and not ch.isascii():
            name = unicodedata.name(ch, "")
            code = next((c for start, c in _SCRIPTS if name.startswith(start)), None)
            if code:
                found.setdefault(code, []).append(ch)
    if found:  # kana beside Chinese characters: Japanese
        code = "ja" if "ja" in found else max(found, key=lambda c: len(found[c]))
        run = re.findall(r"[^\sA-Za-z0-9.,;:!?()\[\]\"'/-]+", prompt)
        return code, run[:3]
    words = re.findall(r"[^\W\d_]+", (prompt or "").lower())
    best, shown = "en", []
    for code, known in _FOREIGN_WORDS.items():
        hits = list(dict.fromkeys(w for w in words if w in known))
        if len(hits) > len(shown) and (len(hits) >= 2 or len(hits[0]) >= 4):
            best, shown = code, hits
    return best, shown[:3]


def language_warning(prompt: str, languages, model: str = "the model",
                     task: str = "segment") -> str | None:
    """One sentence for a question in a language a model taught questions in `languages`
    only (`CitrusVConfig.languages`; nano: ["en"]) was not taught (`question_language`): it
    reads the words as it was taught them, so its answer may be about something else. None
    when the question reads as a taught language, or `languages` is empty (the released
    Citrus-V: not listed)."""
    taught = [str(x) for x in languages or []]
    code, shown = question_language(prompt)
    if not taught or code in taught:
        return None
    reads = LANGUAGE_NAMES.get(code, code)
    if shown:
        reads += " (" + ", ".join(f'"{w}"' for w in shown) + ")"
    names = listed([LANGUAGE_NAMES.get(t, t) for t in taught], "or")
    ask = (f': ask in English ("{ENGLISH_EXAMPLES.get(task, ENGLISH_EXAMPLES["segment"])}")'
           if "en" in taught else "")
    return (f"the question reads as {reads}, and {model} was taught questions in {names} "
            f"only, so its answer may not be about what you asked{ask}.")


def _known(word: str) -> bool:
    return word in _KNOWN_WORDS or bool(_stems(word) & _KNOWN_WORDS)


# a side as radiologists shorten it, before a name ("Find the rt lung.", "the L kidney")
SIDE_SHORT = {"r": "right", "rt": "right", "l": "left", "lt": "left"}


def misspelt_names(prompt: str) -> list[tuple[str, str]]:
    """(as typed, as read) for each word with a slip of one key anywhere in the question
    (`slipped_letters`), and a word of three letters before a name that is such a slip of a
    side ("let lung" -> "left lung"), a misspelt task word opening it (`misspelt_task_word`),
    then for each word of the structures it asks for
    (`prompt_targets`, or the whole question where it is three words or fewer: "livr", as the
    Slicer module sends it with the task chosen) that is a side shortened before a name
    (SIDE_SHORT: "rt lung" -> "right lung", "L kidney" -> "left kidney"), or no word of
    ANATOMY, FINDINGS or _NAME_WORDS but close to one (difflib's ratio ≥ 0.8, words of three
    letters or more: "livr" -> "liver", "kidny" -> "kidney", "spleeen" -> "spleen"), each
    once. A word close to none is left as typed (the model may know a name this list does
    not)."""
    out = slipped_letters(prompt)  # "Is the lvier normal?", "Write a repor."
    # a side of three letters before a name, as read ("Is the let lung normal?")
    read = respelled(prompt, out).lower()
    for m in _ANATOMY_RE.finditer(read):
        before = re.search(r"\b([a-z]{3})\s+$", read[:m.start()])
        side = before and next((w for w in slips(before.group(1)) if w in ("left", "right")),
                               None)
        if side and not m.group("side") and (before.group(1), side) not in out:
            out.append((before.group(1), side))
    verb = misspelt_task_word(respelled(prompt, out))  # "Segmnet the livr.": the names follow
    out += [verb] if verb else []
    for target in _asked_names(respelled(prompt, out)):
        words = target.split()
        for i, word in enumerate(words):
            if word in [a for a, _ in out]:
                continue
            if word in SIDE_SHORT and i + 1 < len(words):
                out.append((word, SIDE_SHORT[word]))
                continue
            if len(word) < 3 or _known(word):
                continue
            close = difflib.get_close_matches(word, _KNOWN_WORDS, n=1, cutoff=0.8)
            if close:
                out.append((word, close[0]))
    return out


def _asked_names(prompt: str) -> list[str]:
    """What a question asks for (`prompt_targets`), or the whole question where it is three
    words or fewer and has no task words ("livr", "the hert", as the Slicer module sends a
    name with the task chosen)."""
    targets = prompt_targets(prompt)
    if not targets:
        bare = re.sub(r"[^a-z ,&\-]", " ", (prompt or "").lower()).split()
        if len(bare) <= 3:
            targets = [p.strip() for p in _LIST_SEP.split(" ".join(bare)) if p.strip()]
    return targets


def _edits(a: str, b: str) -> int:
    """Letters added, dropped, changed or swapped with a neighbour to make `a` into `b`
    (optimal string alignment distance)."""
    d = [[i + j if not i or not j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                          d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def misspelt_as_answered(prompt: str, labels) -> list[tuple[str, str]]:
    """(as typed, as read) for each word of what a question asks for (`prompt_targets`, or a
    question of three words or fewer) that `misspelt_names` leaves as typed, being close to
    no word it knows, but is two slips or fewer (`_edits`) from a word of one name the answer
    gives, with the same first letter: "Segment the lvir." answered with a liver mask reads
    "lvir" as "liver" ("lvr" too), so that the answer is not said to be about something
    not asked. Words of three letters or more; names' words of four or more."""
    words = {w for label in labels for w in str(label).lower().split()
             if len(w) >= 4 and w not in SIDES}
    out: list[tuple[str, str]] = []
    for target in _asked_names(prompt):
        for word in target.split():
            if len(word) < 3 or _known(word) or word in SIDE_SHORT or word in dict(out):
                continue
            near = [w for w in words if w[0] == word[0] and _edits(word, w) <= 2]
            if len(near) == 1:
                out.append((word, near[0]))
    return out


def respelled(prompt: str, fixes: list[tuple[str, str]]) -> str:
    """The question with each misspelt word (`misspelt_names`) replaced as read (a shortened
    side only where a word follows it)."""
    for typed, meant in fixes:
        after = r"\.?(?=\s+[a-z])" if typed in SIDE_SHORT else ""
        prompt = re.sub(rf"(?i)\b{re.escape(typed)}\b{after}", meant, prompt)
    return prompt


def answers_about(target: str, labels) -> bool:
    """Whether an answer's labels (masks, boxes, structures it says are not visible) include
    `target`: a label shares its name ("kidney" for "Find the kidneys") and is not on the
    other side ("right kidney" does not answer "left kidney"; "kidneys" does). A part of a
    structure is answered by its whole too (`whole_of`: "left upper lobe" by "left lung",
    "left ventricle" by "heart")."""
    whole = whole_of(target)
    if whole and whole != target and answers_about(whole, labels):
        return True
    stems = _stems(target)
    want, side = stems - SIDES - _UNNAMING, stems & SIDES
    for label in labels:
        got = _stems(str(label))
        if want & got and (not side or not got & SIDES or side & got):
            return True
    return False


def absent_labels(text: str) -> list[tuple[str, str]]:
    """The structures an answer says are not in the image ("No liver is visible in this
    image." -> [("liver", "is")]), each once, in the order written."""
    out: list[tuple[str, str]] = []
    for m in _ABSENT.finditer(text):
        label = m.group("label").strip()
        if label and label not in [a for a, _ in out]:
            out.append((label, m.group("verb")))
    return out


def _four_numbers(value) -> list[float] | None:
    if isinstance(value, str):
        value = re.findall(_NUM, value)
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return nums if all(v == v and abs(v) < 1e7 for v in nums) else None


def _label_before(text: str, pos: int) -> str:
    """The name just before a box: a quoted name, else the last content words of the clause."""
    head = text[max(0, pos - 100):pos]
    head = re.split(r"[.!?;:\n>]|\]\s*,?", head)[-1] if head else ""
    quoted = re.findall(r"['\"]([^'\"]{1,60})['\"]", head)
    if quoted:
        return quoted[-1].strip()
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z\-]*", head) if w.lower() not in _STOP]
    return " ".join(words[-2:]).lower() if words else ""


def _steps(text: str, spans: list[tuple[int, str]]) -> list[ParsedStep]:
    m = re.search(r"<think>(.*?)(?:</think>|<answer>|$)", text, re.S)
    if not m:
        return []
    body, offset = m.group(1), m.start(1)
    pieces = [(p.start(), p.end()) for p in re.finditer(r"[^\n]+", body)]
    if len(pieces) <= 1 and body.strip():
        pieces = [(p.start(), p.end()) for p in re.finditer(r".+?(?:[.!?](?=\s|$)|$)", body, re.S)
                  if p.group(0).strip()]
    steps = []
    for a, b in pieces:
        chunk = body[a:b]
        clean = re.sub(r"^\s*(?:step\s*\d+\s*[:.)]|\d+\s*[.)]|[-*•])\s*", "", chunk, flags=re.I)
        clean = _SPECIAL.sub("", clean).strip()
        if not clean:
            continue
        cited = []
        for pos, box_id in spans:
            if offset + a <= pos < offset + b and box_id not in cited:
                cited.append(box_id)
        steps.append(ParsedStep(clean, cited))
    return steps


def _answer(text: str) -> str:
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", text, re.S)
    if m:
        ans = m.group(1)
    elif "</think>" in text:
        ans = text.split("</think>", 1)[1]
    else:
        ans = re.sub(r"<think>.*", "", text, flags=re.S)
    return _SPECIAL.sub("", ans).strip()


def _seg_labels(text: str, prompt: str) -> list[str]:
    """A label for each [SEG]: `<p>name</p>` before it, else the words before it, else the
    name right after it ("Sure, 85, 107, 104 is [SEG] spinal cord.": nano, asked in words it
    was not taught, may garble what comes before; its answers end with the name), else the
    prompt."""
    labels = []
    fallback = prompt_target(prompt)
    prev = 0
    for m in re.finditer(re.escape(SEG_TOKEN), text):
        head = text[prev:m.start()]
        prev = m.end()
        ref = re.findall(r"<p>(.*?)</p>", head)
        label = ref[-1].strip() if ref else ""
        if not label:
            head = re.sub(r"<[^>]*>", " ", head)
            head = re.sub(r"\([^()]*\)", " ", head)  # "The liver (3 x 2 mm) is [SEG]"
            clause = re.split(r"[.!?;\n:,]", head.rstrip(" :,="))[-1]
            label = _name_in(clause, last=True)
        if not label:
            after = re.match(r"[ \t]*([A-Za-z][A-Za-z \-]*?)[ \t]*(?=[.!?;,\n<\[]|$)",
                             text[m.end():])
            label = _name_in(after.group(1), last=False) if after else ""
        labels.append(label or fallback or f"segment {len(labels) + 1}")
    return labels


def _name_in(clause: str, last: bool) -> str:
    """The last (or first) two words of a clause that are not _STOP words, lower case."""
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z\-]*", clause) if w.lower() not in _STOP]
    return " ".join(words[-2:] if last else words[:2]).lower()


# ----------------------------------------------------------------------------- image kind
# What kind of image an answer says it looks at, against what the study's DICOM says it is.
# Abbreviations match case-sensitively ("CT", "MRI"), words in any case.
_MODALITY_WORDS = {
    "CT": re.compile(r"\bCT\b|(?i:\bcomputed tomograph)"),
    "X-ray": re.compile(r"\bCXR\b|\bCR\b|\bDX\b|(?i:\bx-?rays?\b|\bradiograph)"),
    "MR": re.compile(r"\bMRI?\b|(?i:\bmagnetic resonance)"),
    "ultrasound": re.compile(r"(?i:\bultrasound|\bsonograph)"),
}
# DICOM Modality (0008,0060) -> the kind above; kinds with no words here still count as known
DICOM_MODALITY_KIND = {"CT": "CT", "CR": "X-ray", "DX": "X-ray", "RG": "X-ray", "MG": "X-ray",
                       "PX": "X-ray", "IO": "X-ray", "MR": "MR", "US": "ultrasound",
                       "PT": "PET", "NM": "nuclear medicine"}


def named_modalities(text: str) -> set[str]:
    """The kinds of image (CT, X-ray, MR, ultrasound) a model's text calls the image."""
    return {kind for kind, pattern in _MODALITY_WORDS.items() if pattern.search(text or "")}


def modality_warning(answer: str, dicom_modality: str | None) -> str | None:
    """A sentence for the radiologist when the answer names another kind of image than the
    study's DICOM Modality (e.g. a report that starts "CT, ..." on a CR); None when they agree,
    when the answer names none, or when the study does not say (NIfTI, unknown codes)."""
    code = (dicom_modality or "").strip().upper()
    kind = DICOM_MODALITY_KIND.get(code)
    named = named_modalities(answer)
    if kind is None or not named or kind in named:
        return None
    said = " and ".join(sorted(named))
    return (f"The answer calls this image {said}, but the study is {code} ({kind}) by its "
            f"DICOM header: the model may have taken it for another kind of image, so read its "
            f"findings (sizes included) with that in mind.")


# a size an answer gives a structure: "liver (right side, 98 x 66 mm)", "a 12.5 x 10 mm
# spleen" is not read (the name must come first, within the same clause)
_SIZE_AFTER = r"(?:[^.;\n]|\.\d){0,40}?\b(\d+(?:\.\d+)?)\s*(?:x|×|by)\s*(\d+(?:\.\d+)?)\s*mm\b"
# how far apart (relative, worse side) a written size and a measured one may be
SIZE_TOLERANCE = 0.2


def size_mismatches(answer: str, boxes) -> list[tuple[str, tuple[float, float],
                                                    tuple[float, float]]]:
    """The structures whose size the answer gives ("liver (right side, 33 x 66 mm)") more
    than SIZE_TOLERANCE apart, on the worse side, from their box's measured size: `boxes` as
    (label, [width, height] mm or None). Sides are compared smaller with smaller, larger with
    larger, so an answer that writes height x width is not taken for wrong. Each label once,
    its first size in the answer: [(label, written, measured)]."""
    out, seen = [], set()
    for label, size in boxes:
        label = str(label).strip()
        if not label or size is None or label in seen:
            continue
        seen.add(label)
        m = re.search(re.escape(label) + _SIZE_AFTER, answer, re.I)
        if not m:
            continue
        written = tuple(sorted((float(m.group(1)), float(m.group(2)))))
        measured = tuple(sorted(float(v) for v in size))
        if min(measured) <= 0:
            continue
        if max(abs(w - r) / r for w, r in zip(written, measured)) > SIZE_TOLERANCE:
            out.append((label, (float(m.group(1)), float(m.group(2))),
                        (float(size[0]), float(size[1]))))
    return out
