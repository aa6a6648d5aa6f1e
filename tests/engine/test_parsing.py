import pytest

from citrusv.parsing import (absent_labels, answers_about, asks_for_everything, asks_to_compare,
                             asks_for_report, asks_for_volume, excluded_structures, infer_task, misspelt_names,
                             modality_warning,
                             named_modalities, named_structures, parse_output, prompt_target,
                             prompt_targets, respelled, size_mismatches, unasked_warning,
                             untaught, untaught_warning, whole_of, whole_warning, findings_named,
                             misspelt_as_answered, garbled_warning, question_language,
                             language_warning, asks_to_measure)

TEXT = (
    "<think>1. The rib cage <bbox>[10, 20, 30, 40]</bbox> is intact.\n"
    "2. The 'right lung' with bbox [50, 60, 70, 80] is clear; compare the rib cage "
    "<bbox>[10, 20, 30, 40]</bbox>.\n"
    "3. The heart is normal.</think>"
    "<answer>No acute findings. The liver is [SEG] and the spleen: [SEG].\n"
    '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "liver"}, {"bbox_2d": [1, 2, 3], '
    '"label": "bad"}]\n```\n'
    "<|object_ref_start|>kidney<|object_ref_end|><|box_start|>(5,6),(9,10)<|box_end|>"
    "</answer>"
)


def test_boxes_from_all_four_formats():
    p = parse_output(TEXT, "Write a report.")
    got = [(b.id, b.label, b.xyxy, b.source) for b in p.boxes]
    assert got == [
        ("b1", "rib cage", [10.0, 20.0, 30.0, 40.0], "bbox"),
        ("b2", "right lung", [50.0, 60.0, 70.0, 80.0], "named"),
        ("b3", "liver", [1.0, 2.0, 3.0, 4.0], "json"),
        ("b4", "kidney", [5.0, 6.0, 9.0, 10.0], "box_start"),
    ]


def test_structures_an_answer_says_are_not_visible():
    assert parse_output("No liver is visible in this image.<|im_end|>").absent == [
        ("liver", "is")]
    assert absent_labels("No kidneys are visible in this image. no right kidney is visible; "
                         "No right kidney is visible.") == [("kidneys", "are"),
                                                            ("right kidney", "is")]
    assert absent_labels("The liver is visible. No acute findings are seen.") == []
    assert parse_output(TEXT).absent == []


def test_malformed_box_is_a_warning_not_a_crash():
    p = parse_output(TEXT)
    assert p.warnings == ["dropped box 'bad': bbox_2d is not four numbers"]
    p = parse_output("<bbox>[1, 2]</bbox> and <|box_start|>(1,2)<|box_end|> and {\"bbox_2d\": x}")
    assert p.boxes == [] and len(p.warnings) == 3


def test_trace_steps_in_order_cite_existing_boxes():
    p = parse_output(TEXT)
    assert [s.text[:14] for s in p.steps] == ["The rib cage <", "The 'right lun",
                                               "The heart is n"]
    assert [s.box_ids for s in p.steps] == [["b1"], ["b2", "b1"], []]
    ids = {b.id for b in p.boxes}
    assert all(i in ids for s in p.steps for i in s.box_ids)


def test_answer_and_seg_labels():
    p = parse_output(TEXT)
    assert p.answer.startswith("No acute findings. The liver is [SEG]")
    assert p.seg_labels == ["liver", "spleen"]
    q = parse_output("Sure, it is [SEG].", "Please segment the left kidney in this scan.")
    assert q.seg_labels == ["left kidney"] and q.answer == "Sure, it is [SEG]."
    r = parse_output("<p>aorta</p> [SEG] and <p>portal vein</p>[SEG]")
    assert r.seg_labels == ["aorta", "portal vein"]
    # nothing but numbers before [SEG] (nano asked "Please segment the Right Kidney in this
    # scan."): the name after it, not the question's
    g = parse_output("Sure, 85, 107, 104 is [SEG] spinal cord.",
                     "Please segment the Right Kidney in this scan.")
    assert g.seg_labels == ["spinal cord"]
    assert parse_output("Sure, [SEG] and [SEG].", "segment the liver").seg_labels == [
        "liver", "liver"]


def test_single_line_think_splits_into_sentences():
    p = parse_output("<think>Liver <bbox>[1,1,5,5]</bbox> fine. Spleen fine.</think>ok")
    assert [s.text for s in p.steps] == ["Liver <bbox>[1,1,5,5]</bbox> fine.", "Spleen fine."]
    assert p.steps[0].box_ids == ["b1"] and p.answer == "ok"


def test_task_routing_from_prompt():
    assert infer_task("Please segment the liver in this scan.") == "segment"
    assert infer_task("Where are the kidneys?") == "detect"
    assert infer_task("Write a report, think step by step.") == "report"
    assert infer_task("Is this normal?") == "report"
    # an annotation tool's verb opening a question, after the box words
    for q in ("Label the spleen.", "Draw the left kidney.", "Can you mark the kidneys?",
              "Paint the liver.", "Seg the liver", "Annotate the lungs.", "Trace the aorta."):
        assert infer_task(q) == "segment", q
    # a size comparison is a segmentation, its masks' areas or volumes compared
    for q in ("Which kidney is larger?", "Compare the kidneys.",
              "Is the spleen bigger than the liver?", "Which lung is smaller?"):
        assert infer_task(q) == "segment" and asks_to_compare(q), q
    for q in ("Is the heart larger than normal?", "Compare with the prior study.",
              "Which structures are visible?"):
        assert not asks_to_compare(q), q
    # the largest of all: every structure, compared
    for q in ("Which is the largest organ on this slice?", "Which organ is the largest?",
              "What is the biggest structure here?"):
        assert infer_task(q) == "segment" and asks_to_compare(q) and asks_for_everything(q), q
    assert not asks_for_everything("Which kidney is larger?")
    for q, task in (("Draw a box around the liver.", "detect"), ("liver bbox", "detect"),
                    ("Is there trace ascites?", "report"), ("What label is this?", "report"),
                    ("Mark the liver and write a report.", "report")):
        assert infer_task(q) == task, q
    assert prompt_target("Please segment the liver in this scan.") == "liver"
    # the report task by its words, or for want of other task words
    assert asks_for_report("Write a report.") and asks_for_report("What are the findings?")
    assert not asks_for_report("Is the liver normal?") and not asks_for_report("Show the liver.")
    # asking what is on the slice asks for a report (nano answers it with one box)
    for prompt in ("What structures are visible?", "What organs are on this slice?",
                   "What do you see?", "List the structures in this image.",
                   "What is on this slice?"):
        assert asks_for_report(prompt) and infer_task(prompt) == "report", prompt
    assert not asks_for_report("Is the liver visible?")
    # a radiologist's other words: "show" a structure is detection, "highlight" it or ask its
    # size is segmentation (the mask's area in mm² answers it), each read for what it names
    for prompt, task, targets in [
            ("Show the Spleen.", "detect", ["spleen"]),
            ("Show me the liver and the spleen.", "detect", ["liver", "spleen"]),
            ("Point out the aorta.", "detect", ["aorta"]),
            ("Highlight the liver.", "segment", ["liver"]),
            ("How big is the liver?", "segment", ["liver"]),
            ("How large are the kidneys?", "segment", ["kidneys"]),
            ("What is the size of the Heart?", "segment", ["heart"]),
            ("Measure the spleen.", "segment", ["spleen"]),
            # "show" with no structure after it asks for no box
            ("Does this show any lesion?", "report", []),
            # how a question goes on after the name
            ("Where's the heart?", "detect", ["heart"]),
            ("Where is the liver located?", "detect", ["liver"]),
            ("Show me where the spleen is.", "detect", ["spleen"]),
            ("Could you outline the aorta for me?", "segment", ["aorta"]),
            ("How big is the left kidney compared to the right?", "segment", ["left kidney"])]:
        assert (infer_task(prompt), prompt_targets(prompt)) == (task, targets), prompt


def test_step_numbers_are_not_part_of_box_labels():
    text = ("<think>Step 1: the liver <bbox>[1, 2, 30, 40]</bbox> is normal.\n"
            "Step 2: Spleen <bbox>[5, 6, 20, 22]</bbox>.</think><answer>Normal.</answer>")
    p = parse_output(text)
    assert [b.label for b in p.boxes] == ["liver", "spleen"]
    assert [s.box_ids for s in p.steps] == [["b1"], ["b2"]]


def test_answer_naming_another_kind_of_image_than_the_dicom_is_flagged():
    nano_on_cr = "CT, 5 structures: right lung (R), 98 x 165 mm; left lung (L), 96 x 160 mm."
    assert named_modalities(nano_on_cr) == {"CT"}
    warning = modality_warning(nano_on_cr, "CR")
    assert warning.startswith("The answer calls this image CT, but the study is CR (X-ray)")
    assert modality_warning(nano_on_cr, "CT") is None
    assert modality_warning("X-ray, 5 structures: right lung (R).", "DX") is None
    assert modality_warning("The chest radiograph shows clear lungs.", "cr ") is None
    assert "MR" in modality_warning("Axial MRI, T2-weighted: the liver is normal.", "CT")
    # the study does not say (NIfTI: ""), or a code with no kind: no claim to check against
    assert modality_warning(nano_on_cr, "") is None
    assert modality_warning(nano_on_cr, "OT") is None
    # no kind named, both kinds named, or look-alike words: nothing to flag
    assert modality_warning("Sure, the liver is [SEG].", "CR") is None
    assert modality_warning("Compared with the prior CT, this X-ray shows ...", "CR") is None
    assert named_modalities("Mr. Smith's scan; act on the CTA? crisp outline") == set()


@pytest.mark.parametrize("prompt, labels", [
    ("Please segment the liver in this scan.", ["liver"]),
    ("find the kidneys", ["left kidney", "right kidney"]),
    ("Find the kidneys.", ["kidneys"]),  # "No kidneys are visible in this image."
    ("Where are the lungs?", ["right lung", "left lung"]),
    ("Segment the renal cortex.", ["left kidney"]),  # the adjective names the organ
    ("Outline the spinal cord in this CT slice.", ["spinal cord"]),
    ("Find the left and right kidneys.", ["right kidney"]),  # both sides asked
    ("Find the liver and the pancreas.", ["liver", "stomach"]),  # one asked structure answered
    ("Segment the pancreas.", ["segment 1"]),  # the engine's name for an unlabelled mask
    ("Segment the pancreas.", []),
])
def test_an_answer_about_what_was_asked_gets_no_warning(prompt, labels):
    assert unasked_warning(prompt, labels) is None


def test_an_answer_about_another_structure_is_said():
    # nano, asked for the pancreas (not one of its ten structures), segments the liver
    assert unasked_warning("Please segment the pancreas in this scan.", ["liver"]) == (
        "the answer is about the liver, which the question does not name: the model may have "
        "answered about something other than what was asked (it may not know that structure), "
        "so check the answer is what you wanted.")
    said = unasked_warning("find the gallbladder", ["lungs", "right lung", "right lung"])
    assert said.startswith("the answer is about the lungs and right lung, which")


def test_an_answer_on_the_other_side_is_said():
    said = unasked_warning("Please segment the left kidney in this scan.", ["right kidney"])
    assert said == ("the question says left, but the answer is about the right kidney: check "
                    "which side is meant (the patient's left is on the image's right in the "
                    "usual radiological view).")
    assert unasked_warning("Locate the right lung.", ["left lung"]).startswith(
        "the question says right, but the answer is about the left lung: check which side is "
        "meant (the patient's right is on the image's left")
    # an answer with the asked side as well as the other, or a structure with no side: fine
    assert unasked_warning("Segment the left lung.", ["left lung", "right lung"]) is None
    assert unasked_warning("Segment the liver on the left.", ["liver"]) is None


@pytest.mark.parametrize("prompt, targets", [
    ("Segment the heart, aorta and stomach.", ["heart", "aorta", "stomach"]),
    ("Find the liver and the spleen.", ["liver", "spleen"]),
    ("Segment the liver, the spleen, and the stomach in this scan.",
     ["liver", "spleen", "stomach"]),
    ("Where is the liver and spleen on this slice?", ["liver", "spleen"]),
    ("Segment the left and right lungs.", ["left lung", "right lung"]),
    ("Find the left & right kidneys", ["left kidney", "right kidney"]),
    ("Locate the spleen and the pancreas.", ["spleen", "pancreas"]),
    ("Locate the liver and spleen, output their bbox coordinates using JSON format.",
     ["liver", "spleen"]),
    ("Draw boxes around the liver and the spleen.", ["liver", "spleen"]),
    ("Put bounding boxes on the heart and the aorta.", ["heart", "aorta"]),
    ("Identify the liver and the spleen.", ["liver", "spleen"]),
    ("Segment the Heart and the Aorta.", ["heart", "aorta"]),
    # one structure; the list ends where a part reads as no name
    ("Where are the kidneys?", ["kidneys"]),
    ("Segment both kidneys.", ["kidneys"]),
    ("I need a mask of the liver.", ["liver"]),
    ("Please segment the liver in this scan.", ["liver"]),
    ("Find the liver and measure it.", ["liver"]),
    ("Find the liver and tell me its size.", ["liver"]),
    ("Locate the liver, output its bbox coordinates using JSON format.", ["liver"]),
    ("Segment the liver and the liver.", ["liver"]),
    ("Segment it.", []),
    ("Write a report on the liver and the spleen.", []),
    ("Is the liver normal?", []),
    ("Segment the kidneys bilaterally.", ["kidneys"]),
    ("Segment the bilateral lungs.", ["lungs"]),
    # what is measured of a structure names the structure
    ("Measure the aorta diameter.", ["aorta"]),
    ("Measure the diameter of the aorta.", ["aorta"]),
    ("What is the volume of the spleen?", ["spleen"]),
    ("Measure the liver size in this scan.", ["liver"]),
    # a structure it is compared with is asked for too; "normal", "the prior scan" are none
    ("How large is the spleen compared to the liver?", ["spleen", "liver"]),
    ("How big are the kidneys versus the spleen?", ["kidneys", "spleen"]),
    ("How big is the left kidney compared with the right kidney?",
     ["left kidney", "right kidney"]),
    ("How big is the liver compared to normal?", ["liver"]),
    ("How big is the liver compared to the prior scan?", ["liver"]),
    ("Find the last rib.", ["last rib"]),
])
def test_the_structures_a_question_lists(prompt, targets):
    assert prompt_targets(prompt) == targets


def test_which_labels_answer_about_a_listed_structure():
    assert answers_about("spleen", ["liver", "spleen"])
    assert answers_about("kidneys", ["left kidney"])
    assert answers_about("left kidney", ["kidneys"])  # no side said: not the other side
    assert answers_about("hepatic", ["liver"])
    assert not answers_about("left kidney", ["right kidney"])
    assert not answers_about("pancreas", ["liver", "left lung"])
    assert not answers_about("spleen", [])


def test_sizes_an_answer_gives_are_checked_against_its_boxes():
    answer = ("CT, 4 structures: aorta (midline, 15 x 17 mm); liver (right side, 33 x 66 mm); "
              "right kidney (right side, 51 x 51 mm); spinal cord (midline, 12.5 x 15 mm).")
    boxes = [("liver", [43.0, 86.0]),  # a quarter bigger on both sides: said
             ("aorta", [16.0, 16.5]), ("right kidney", [44.0, 60.0]),  # within a fifth
             ("spinal cord", [15.2, 13.0]),  # height x width: compared side for side
             ("spleen", [40.0, 40.0]),  # no size given for it
             ("liver", [10.0, 10.0]),  # each label once, its first box
             ("stomach", None)]  # no spacing, no size
    assert size_mismatches(answer, boxes) == [("liver", (33.0, 66.0), (43.0, 86.0))]
    # the size must follow the name in the same clause
    assert size_mismatches("The spleen is normal. A 40 x 40 mm liver.",
                           [("spleen", [10.0, 10.0]), ("liver", [10.0, 10.0])]) == []
    assert size_mismatches("Liver: 130 × 80 mm.", [("liver", [100.0, 100.0])]) == [
        ("liver", (130.0, 80.0), (100.0, 100.0))]


def test_a_question_for_every_structure_is_told_apart():
    for prompt in ("Segment all organs.", "Segment everything.", "Find all structures.",
                   "Find every structure on this slice.", "Outline all of the organs."):
        assert asks_for_everything(prompt), prompt
    for prompt in ("Segment the liver.", "Segment all the kidneys.", "Write a report.",
                   "Is everyone here?"):
        assert not asks_for_everything(prompt), prompt


@pytest.mark.parametrize("prompt,fixes,read", [
    ("Segment the livr.", [("livr", "liver")], "Segment the liver."),
    ("Find the Spleeen.", [("spleeen", "spleen")], "Find the spleen."),
    ("Please segment the left kidny in this scan.", [("kidny", "kidney")],
     "Please segment the left kidney in this scan."),
    ("Segment the hert and the aota.", [("hert", "heart"), ("aota", "aorta")],
     "Segment the heart and the aorta."),
    ("Segment both lugns.", [("lugns", "lungs")], "Segment both lungs."),
    ("Segment the spial cord.", [("spial", "spinal")], "Segment the spinal cord."),
    ("Find the riht lung.", [("riht", "right")], "Find the right lung."),
    ("Find the lesin.", [("lesin", "lesion")], "Find the lesion."),
    # a side shortened as radiologists write it, before a name
    ("Segment the R kidney.", [("r", "right")], "Segment the right kidney."),
    ("Find the rt lung.", [("rt", "right")], "Find the right lung."),
    ("Segment the Lt. kidney and the spleen.", [("lt", "left")],
     "Segment the left kidney and the spleen."),
    ("Find the L.", [], "Find the L."),
    # names it knows, and words close to none, are left as typed
    ("Segment the liver.", [], "Segment the liver."),
    ("Segment the Right Kidney.", [], "Segment the Right Kidney."),
    ("Segment the pancreas.", [], "Segment the pancreas."),
    ("Segment the gallstones.", [], "Segment the gallstones."),
    ("Segment the IVC.", [], "Segment the IVC."),
    ("Find the upper lobes.", [], "Find the upper lobes."),
    # a task word opening a question with none, then the names after it
    ("Segmnet the livr.", [("segmnet", "segment"), ("livr", "liver")], "segment the liver."),
    ("Please locte the spleen.", [("locte", "locate")], "Please locate the spleen."),
    ("Descirbe this slice.", [("descirbe", "describe")], "describe this slice."),
    # a question that is names alone (the Slicer module sends the task chosen)
    ("livr", [("livr", "liver")], "liver"),
    ("the hert", [("hert", "heart")], "the heart"),
    ("livr and spleeen?", [("livr", "liver"), ("spleeen", "spleen")], "liver and spleen?"),
    ("hello", [], "hello"),
    # a slip of one key anywhere in the question: two neighbouring letters swapped
    ("Write a reprot.", [("reprot", "report")], "Write a report."),
    ("Is the lvier normal?", [("lvier", "liver")], "Is the liver normal?"),
    ("Segment the kindey.", [("kindey", "kidney")], "Segment the kidney."),
    ("Think step by setp.", [("setp", "step")], "Think step by step."),
    ("Is it form or from?", [], "Is it form or from?"),
    # one letter dropped or doubled, anywhere in the question
    ("Is the livr normal?", [("livr", "liver")], "Is the liver normal?"),
    ("Write a repor.", [("repor", "report")], "Write a report."),
    ("What are the findngs?", [("findngs", "findings")], "What are the findings?"),
    ("Is the right kidny enlarged?", [("kidny", "kidney")], "Is the right kidney enlarged?"),
    ("Is the spleeen normal?", [("spleeen", "spleen")], "Is the spleen normal?"),
    # a side of three letters before a name
    ("Is the let lung normal?", [("let", "left")], "Is the left lung normal?"),
    ("Let the lung be segmented.", [], "Let the lung be segmented."),
    ("Segment the liver, and identiy the spleen.", [("identiy", "identify")],
     "Segment the liver, and identify the spleen."),
    # English words such a slip would be are meant as typed
    ("Can you hear a bruit here? Is the heat map live?", [],
     "Can you hear a bruit here? Is the heat map live?"),
    ("Were the ladder and the pine tree in the summaries?", [],
     "Were the ladder and the pine tree in the summaries?"),
    # the other words are the question's own
    ("Identity of this structure?", [], "Identity of this structure?"),
])
def test_a_misspelt_name_is_read_as_the_name_it_is_close_to(prompt, fixes, read):
    assert misspelt_names(prompt) == fixes
    assert respelled(prompt, fixes) == read


@pytest.mark.parametrize("prompt,names", [
    ("Is the Liver normal?", ["liver"]),
    ("Are the kidneys normal?", ["kidneys"]),
    ("Is the left kidney smaller than the spleen?", ["left kidney", "spleen"]),
    ("Is the inferior vena cava dilated?", ["inferior vena cava"]),
    ("Is the spinal cord compressed?", ["spinal cord"]),
    ("Are both lungs clear?", ["lungs"]),
    # a word for an organ's enlargement names the organ
    ("Is there cardiomegaly?", ["heart"]),
    ("Hepatosplenomegaly? Check the left kidney too.", ["liver", "spleen", "left kidney"]),
    # an adjective names no structure; nor does a finding
    ("Is there a renal stone?", []),
    ("Is there a pleural effusion?", []),
    ("Is this normal?", []),
])
def test_the_structures_a_question_names_anywhere(prompt, names):
    assert named_structures(prompt) == names


def test_a_shortened_side_is_checked_as_the_side_it_names():
    prompt = "Find the rt lung."
    read = respelled(prompt, misspelt_names(prompt))
    assert unasked_warning(prompt, ["left lung"]) is None  # "rt" is no side as typed
    assert unasked_warning(read, ["left lung"]).startswith(
        "the question says right, but the answer is about the left lung")
    assert prompt_targets(read) == ["right lung"] and not answers_about("right lung",
                                                                         ["left lung"])



@pytest.mark.parametrize("prompt,left_out", [
    ("Segment all organs except the liver.", ["liver"]),
    ("Segment everything except the liver and the spleen.", ["liver", "spleen"]),
    ("Segment everything but not the kidneys", ["kidneys"]),
    ("Find all structures other than the lungs.", ["lungs"]),
    ("Segment everything apart from the heart, aorta and stomach in this slice.",
     ["heart", "aorta", "stomach"]),
    ("Segment all organs except the left kidney please", ["left kidney"]),
    ("Segment all organs.", []),
    ("Segment the liver except the tip.", []),  # not a question for every structure
])
def test_what_a_question_for_every_structure_leaves_out(prompt, left_out):
    assert excluded_structures(prompt) == left_out



def test_a_word_for_an_organs_enlargement_names_the_organ():
    assert unasked_warning("Is there cardiomegaly?", ["heart"]) is None
    assert unasked_warning("Is there splenomegaly?", ["left lung"]).startswith(
        "the answer is about the left lung, which the question does not name")



def test_a_volume_question_is_a_segmentation_question():
    for q in ("What is the volume of the spleen?", "Liver volume?", "Give the volumes of the "
              "kidneys.", "What is the liver volume?"):
        assert infer_task(q) == "segment" and asks_for_volume(q), q
    for q, task in (("Find the liver in this volume.", "detect"), ("Describe this volume.",
                    "report"), ("Is this the whole volume?", "report"),
                    ("Segment the liver in the volume?", "segment")):
        assert infer_task(q) == task and not asks_for_volume(q), q


def test_a_task_word_with_two_letters_swapped_picks_its_task():
    assert infer_task("Where is the spleen? Output its maks.") == "segment"
    assert infer_task("Write a reprot.") == infer_task("Write a report.") == "report"
    assert asks_for_report("Write a report.") and not asks_for_report("Write a reprot.")


@pytest.mark.parametrize("name, whole", [
    ("left upper lobe", "left lung"), ("LUL", "left lung"), ("lingula", "left lung"),
    ("right lower lobe", "right lung"), ("rml", "right lung"), ("middle lobe", "right lung"),
    ("lower lobes", "lungs"), ("upper lobe", "lungs"),
    ("upper lobe of the left lung", "left lung"), ("left lung upper lobe", "left lung"),
    ("right lower lung lobe", "right lung"),
    ("left ventricle", "heart"), ("LV", "heart"), ("atria", "heart"), ("myocardium", "heart"),
    ("aortic arch", "aorta"), ("ascending aorta", "aorta"), ("thoracic aorta", None),
    ("caudate lobe", "liver"), ("gastric fundus", "stomach"), ("antrum", "stomach"),
    ("left renal pelvis", "left kidney"), ("renal cortex", "kidneys"),
    ("right lobe of the liver", "liver"), ("left hepatic lobe", "liver"),
    ("lower pole of the left kidney", "left kidney"), ("liver", None), ("left lobe", None),
    ("pulmonary artery", None), ("ventricular wall", None), ("left atrial appendage", None),
])
def test_a_part_is_part_of_its_whole(name, whole):
    assert whole_of(name) == whole


def test_a_part_is_answered_by_its_whole_with_a_sentence_that_says_so():
    assert answers_about("left upper lobe", ["left lung"])
    assert not answers_about("left upper lobe", ["right lung"])
    assert answers_about("left upper lobe", ["left upper lobe"])  # a model that marks lobes
    assert unasked_warning("Segment the RLL.", ["right lung"]) is None
    assert unasked_warning("Segment the RLL.", ["left lung"]).startswith("the question says "
                                                                         "right")
    assert whole_warning("Segment the RLL.", "segment", ["right lung"]) == (
        "the question asks for the RLL, and the answer's mask is of the right lung as a whole: "
        "the model marks lungs, not their lobes, so mark the lobe yourself.")
    assert whole_warning("Find the lower lobes.", "detect", ["right lung", "left lung"]) == (
        "the question asks for the lower lobes, and the answer's boxes are of the lungs as a "
        "whole: the model marks lungs, not their lobes, so mark the lobes yourself.")
    assert whole_warning("Segment the left upper lobe.", "segment", ["left upper lobe"]) is None
    assert whole_warning("Segment the left upper lobe.", "segment", ["right lung"]) is None
    assert whole_warning("Segment the left lung.", "segment", ["left lung"]) is None
    assert whole_warning("Segment the left ventricle and the LUL.", "segment",
                         ["heart", "left lung"]) == (
        "the question asks for the left ventricle and the LUL, and the answer's masks are of the "
        "heart and left lung as a whole: the model marks the heart as one, not its chambers, "
        "and lungs, not their lobes, so mark the parts yourself.")
    assert whole_warning("Segment the left ventricle.", "segment", ["left ventricle"]) is None


@pytest.mark.parametrize("question, labels, warned", [
    ("Segment the pulmonary artery.", ["right lung"], True),  # a vessel, not the lung
    ("Find the splenic vein.", ["spleen"], True),
    ("Segment the aortic valve.", ["aorta"], True),
    ("Find the hepatic flexure.", ["liver"], True),  # of the colon
    ("Segment the aortic arch.", ["aorta"], False),
    ("Find the renal masses.", ["left kidney"], False),
    ("Is there pulmonary edema?", ["right lung"], False),
])
def test_an_organ_adjective_before_a_vessel_does_not_name_the_organ(question, labels, warned):
    assert (unasked_warning(question, labels) is not None) == warned


def test_a_seg_label_skips_what_the_answer_puts_in_brackets():
    assert parse_output("The liver (3 x 2 mm) is [SEG].", "Segment the spleen.").seg_labels == [
        "liver"]


NANO_TEN = ["right lung", "left lung", "heart", "aorta", "liver", "stomach", "spleen",
            "right kidney", "left kidney", "spinal cord"]


@pytest.mark.parametrize("prompt, names, findings", [
    ("Segment the pancreas.", ["pancreas"], []),
    ("Find the gallbladder and the portal vein.", ["gallbladder", "portal vein"], []),
    ("Segment the pulmonary artery.", ["pulmonary artery"], []),
    ("Is there a pleural effusion?", [], ["effusion"]),
    ("Is there a liver mass?", [], ["mass"]),
    ("Find the kidney stones.", [], ["stone"]),
    ("Is this normal?", [], ["abnormality"]),
    ("Anything wrong here?", [], ["abnormality"]),
    ("Is the spleen ok?", [], ["abnormality"]),
    # a finding asked for in other words (nano answered the first "No right kidney is
    # visible" on held-out slice 25 with no word that it cannot tell)
    ("Is there anything in the right kidney?", [], ["abnormality"]),
    ("Any issues with the aorta?", [], ["abnormality"]),
    ("Is there a problem with the heart?", [], ["abnormality"]),
    ("Anything unusual in the lungs?", [], ["abnormality"]),
    ("Does the liver look suspicious?", [], ["abnormality"]),
    ("Is there anything on this slice?", [], []),  # what is there: the report
    ("Is there anything else?", [], []),
    ("OK, segment the spleen.", [], []),
    ("Is the heart enlarged?", [], ["abnormality"]),
    ("Is there cardiomegaly?", [], ["cardiomegaly"]),  # the heart's name teaches no size
    ("Find the masses and the pancreas.", ["pancreas"], ["mass"]),
    # what it was taught, by a part, a plural or a side
    ("Segment the kidneys.", [], []),
    ("Segment the LUL.", [], []),
    ("Segment the right renal pelvis.", [], []),  # the kidney's, not the bone
    ("Segment the left ventricle.", [], []),
    ("What is this?", [], []),
    ("What is in the abdomen?", [], []),  # a region: what is there, not a structure
])
def test_what_a_question_names_that_the_model_was_not_taught(prompt, names, findings):
    assert untaught(prompt, NANO_TEN) == (names, findings)
    assert untaught(prompt, []) == ([], [])  # not listed: the released model's knowledge
    said = untaught_warning(prompt, NANO_TEN, "citrusv-nano")
    assert (said is None) == (not names and not findings)


def test_the_sentence_on_what_the_model_was_not_taught():
    assert untaught_warning("Segment the pancreas.", NANO_TEN, "citrusv-nano") == (
        "citrusv-nano was not taught the pancreas (it was taught only the right lung, left lung, "
        "heart, aorta, liver, stomach, spleen, right kidney, left kidney and spinal cord), so "
        "its answer cannot be about it: look for it yourself.")
    assert untaught_warning("Is there a pleural effusion or ascites?", NANO_TEN, "nano") == (
        "nano was taught no findings, only normal anatomy (it was taught only the right lung, "
        "left lung, heart, aorta, liver, stomach, spleen, right kidney, left kidney and spinal "
        "cord): it cannot tell whether the image shows any effusion or ascites, so read the "
        "image yourself.")
    both = untaught_warning("Is the spine normal?", NANO_TEN, "nano")
    assert both.startswith("nano was not taught the spine (")
    assert both.endswith("nano was taught no findings, only normal anatomy (it was taught only "
                         "those structures): it cannot tell whether anything here is abnormal, "
                         "so read the image yourself.")
    # a model taught a finding is told apart from one taught none
    assert untaught("Find the lung nodule.", [*NANO_TEN, "lung nodule"]) == ([], [])
    assert "was taught other findings" in untaught_warning("Is there an effusion?",
                                                           [*NANO_TEN, "lung nodule"])
    assert findings_named("Any stones? Is it normal?") == ["stone", "abnormality"]


@pytest.mark.parametrize("prompt, labels, read", [
    ("Segment the lvir.", ["liver"], [("lvir", "liver")]),  # two slips: close to nothing known
    ("segment lvr", ["liver"], [("lvr", "liver")]),
    ("lvr", ["liver"], [("lvr", "liver")]),  # a name alone, as the Slicer module sends it
    ("Segment the stmch and the hrt", ["stomach", "heart"], [("stmch", "stomach"),
                                                             ("hrt", "heart")]),
    ("Find the spln.", ["spleen", "spinal cord"], [("spln", "spleen")]),
    ("Segment the lvr.", ["left lung"], []),  # the answer is about something else
    ("Segment the leg.", ["liver"], []),  # three slips
    ("Segment the liver.", ["liver"], []),  # a word it knows
    ("Segment the lng.", ["lung", "lens"], []),  # two names as close: none chosen
])
def test_a_word_close_to_the_name_the_answer_gives_is_read_as_it(prompt, labels, read):
    assert misspelt_as_answered(prompt, labels) == read


def test_engine_says_how_it_read_a_word_by_the_answer():
    from citrusv.engine import spelling_note
    assert spelling_note([], [("lvir", "liver")]) == (
        'read "lvir" as "liver" in the question (the name the answer gives) to check the '
        "answer.")
    assert spelling_note([("livr", "liver")], [("hrt", "heart")]).startswith(
        'read "livr" as "liver" in the question (a word the engine knows) to check the answer '
        'and to ask again. read "hrt" as "heart"')


def test_what_a_question_names_that_the_model_knows():
    """What the engine checks before answering a report-task question with the report: a
    question naming nothing known ("What is this?", a region, or only untaught things)."""
    from citrusv.parsing import known_named
    assert known_named("Is the liver normal?", NANO_TEN) == ["liver"]
    assert known_named("Is the liver normal?", []) == ["liver", "abnormality"]
    assert known_named("What is in the abdomen?", NANO_TEN) == []
    assert known_named("Is there a pleural effusion?", NANO_TEN) == []
    assert known_named("Is there a pleural effusion?", []) == ["effusion"]
    assert known_named("Is the pancreas normal?", NANO_TEN) == []


NOISE_ANSWER = ('```json, 104 right lung right lung right lung right lung right lung right lung '
                'right lung 0, 0, 11225, 112],],],],15, 0, 114, 112], "left lung"}]\n```')


@pytest.mark.parametrize("text, said", [
    (NOISE_ANSWER, 'the model\'s answer is garbled (it says "right lung" 7 times in a row; its box '
                   'list cannot be read): check all of it against the image, which may be '
                   'unlike those the model was trained on.'),
    ('Sure, 104 0, 112, 112, 112, 112, 112, 112], "heart"}]\n```', 'it says "112" 6 times'),
    ('```json\n[{"bbox_2 right lung, 0, 112]\n```', "(its box list cannot be read)"),
    # a box list's key outside any box one can read (nano asked "Segment everything except
    # the lungs." on held-out slice 65)
    ('Sure, 43, 126, 126label": "label": "right lung"}]\n```', "(its box list cannot be read)"),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "liver"}, "label": "spleen"}]\n```',
     "(its box list cannot be read)"),
    ("The label of this structure: liver.", None),
    (TEXT, None),
    ('```json\n[{"bbox_2d": [25, 13, 88, 118], "label": "right lung"}, '
     '{"bbox_2d": [93, 7, 143, 107], "label": "left lung"}]\n```', None),
    ("Sure, the right lung is [SEG] right lung.\nSure, the left lung is [SEG] left lung.", None),
    ("No kidneys are visible in this image.", None),
])
def test_a_garbled_answer_is_called_so(text, said):
    """nano's answers about random noise (what it wrote, cut short); its answers about the CT
    are not garbled (0 of 690 on the held-out slices: work/probe_garbled.py)."""
    got = garbled_warning(text)
    assert (got is None) if said is None else (said in got), got


@pytest.mark.parametrize("prompt,code,shown", [
    ("Segmentez le foie.", "fr", ["segmentez", "le", "foie"]),
    ("Trouvez le rein gauche.", "fr", ["trouvez", "le", "gauche"]),
    ("Segmente el hígado.", "es", ["segmente", "el", "hígado"]),
    ("Wo ist die Leber?", "de", ["wo", "ist", "leber"]),
    ("Leber", "de", ["leber"]),  # one word of four letters or more
    ("Segmenta il fegato", "it", ["segmenta", "il", "fegato"]),
    ("肝脏分割", "zh", ["肝脏分割"]),
    ("肝臓をセグメントしてください", "ja", ["肝臓をセグメントしてください"]),  # kana
    ("Сегментируйте печень", "ru", ["Сегментируйте", "печень"]),
    # English, also with a foreign word of three letters or an eponym's accent
    ("Please segment the liver in this scan.", "en", []),
    ("Is the L1 vertebra del Toro's?", "en", []),
    ("Is there a mass in the liver? Est. size", "en", []),
    ("Is this Ménétrier disease of the stomach?", "en", []),
    ("Segment the left lung, the rate of the heart aside.", "en", []),
    ("Locate the right kidney, output its bbox coordinates using JSON format.", "en", []),
])
def test_the_language_a_question_reads_as(prompt, code, shown):
    assert question_language(prompt) == (code, shown)


def test_every_question_nano_was_taught_reads_as_english():
    from citrusv import nano_data as d

    for template in (d.SEGMENT_PROMPTS + d.DETECT_PROMPTS + d.PLURAL_DETECT_PROMPTS
                     + d.REPORT_PROMPTS + d.XRAY_REPORT_PROMPTS):
        for name in d.NAMES:
            prompt = template.replace("{labels}", name + "s").replace("{label}", name)
            assert question_language(prompt) == ("en", []), prompt


def test_the_sentence_on_a_question_in_a_language_the_model_was_not_taught():
    assert language_warning("Segmentez le foie.", ["en"], "citrusv-nano") == (
        'the question reads as French ("segmentez", "le", "foie"), and citrusv-nano was taught '
        "questions in English only, so its answer may not be about what you asked: ask in "
        'English ("Please segment the liver in this scan.").')
    assert language_warning("肝脏分割", ["en"], "nano", "report").endswith(
        'ask in English ("Write a report, think step by step.").')
    assert language_warning("Segmentez le foie.", [], "x") is None  # not listed: the 8B
    assert language_warning("Segment the liver.", ["en"], "x") is None
    assert language_warning("肝脏分割", ["zh", "en"], "x") is None
    # a model taught no English is not told to be asked in English
    assert language_warning("Segment the liver.", ["zh"], "x") == (
        "the question reads as English, and x was taught questions in Chinese only, so its "
        "answer may not be about what you asked.")


@pytest.mark.parametrize("prompt, measure", [
    ("Measure the liver.", True), ("How big is the spleen?", True),
    ("Segment the liver and tell me its size.", True), ("What is the diameter of the aorta?", True),
    ("How large is the left kidney?", True), ("Please segment the liver in this scan.", False),
    ("Where is the spleen? Output its mask.", False), ("Segment the liver.", False),
])
def test_a_question_asking_for_a_size(prompt, measure):
    assert asks_to_measure(prompt) is measure
