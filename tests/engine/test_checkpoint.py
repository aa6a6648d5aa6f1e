import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from citrusv.checkpoint import from_parts, load_checkpoint, save_checkpoint
from citrusv.errors import CheckpointError
from citrusv.modeling import resolve_sam2_config


def test_released_layout_on_disk(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "citrus_v" and config["architectures"] == ["CitrusV"]
    assert config["seg_hidden_offset"] == 0 and config["use_res_seg_projector"] is False
    tok = json.loads((tiny_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert config["seg_token_idx"] == added["[SEG]"]
    assert {"<bbox>", "</bbox>", "<|box_start|>", "<|image_pad|>"} <= set(added)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    prefixes = {".".join(k.split(".")[:3]) if k.startswith("mllm.model") else
                ".".join(k.split(".")[:2]) for k in index["weight_map"]}
    assert prefixes == {"mllm.model.language_model", "mllm.model.visual", "mllm.lm_head",
                        "grounding_encoder.sam2_model", "seg_projector.0", "seg_projector.2"}
    for name in set(index["weight_map"].values()):
        assert (tiny_dir / name).is_file()


def test_loads_back_the_same_weights(tiny_dir):
    model, processor, config = load_checkpoint(tiny_dir)
    saved = {}
    for f in tiny_dir.glob("model-*.safetensors"):
        saved.update(load_file(str(f)))
    state = model.state_dict()
    assert set(state) == set(saved)
    for key in ("seg_projector.2.weight", "mllm.lm_head.weight",
                "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"):
        assert torch.equal(state[key], saved[key])
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("[SEG]") == config.seg_token_idx


def test_loads_the_processor_training_renders_with(tiny_dir):
    """The slow (numpy) image processor, as training has, not transformers' default fast one
    (pixel values up to 2.4e-7 apart); and the fast tokenizer, not the slow one (other ids)."""
    import numpy as np

    from citrusv.checkpoint import qwen_processor

    _, processor, config = load_checkpoint(tiny_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert processor.tokenizer.is_fast
    made = qwen_processor(processor.tokenizer, config.min_pixels, config.max_pixels)
    image = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    assert torch.equal(processor.image_processor(images=[image], return_tensors="pt")
                       ["pixel_values"],
                       made.image_processor(images=[image], return_tensors="pt")["pixel_values"])


def _edit_shard(src, dst, edit):
    shutil.copytree(src, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = dst / index["weight_map"]["seg_projector.2.bias"]
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard))
    index["weight_map"] = {k: shard.name for k in state}
    index_file.write_text(json.dumps(index))


def test_missing_key_is_named(tiny_dir, tmp_path):
    _edit_shard(tiny_dir, tmp_path / "m", lambda s: s.pop("seg_projector.2.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): seg_projector\.2\.bias"):
        load_checkpoint(tmp_path / "m")


def test_unexpected_key_is_named(tiny_dir, tmp_path):
    _edit_shard(tiny_dir, tmp_path / "u",
                lambda s: s.__setitem__("seg_projector.9.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): seg_projector\.9\.weight"):
        load_checkpoint(tmp_path / "u")


def test_authors_absolute_sam2_config_resolves_by_basename():
    path = resolve_sam2_config("/mnt/jd/citrus/projects/sam2/configs/sam2_hiera_l.yaml")
    assert path.name == "sam2_hiera_l.yaml" and path.parent.name == "sam2" and path.is_file()
    with pytest.raises(CheckpointError, match="no SAM2 config named"):
        resolve_sam2_config("/x/sam3_hiera_q.yaml")


def test_from_parts_matches_the_whole_checkpoint(tiny_dir, tmp_path):
    model, processor, config = load_checkpoint(tiny_dir)
    model.mllm.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    torch.save({"model": model.sam2.state_dict()}, tmp_path / "sam2.pt")
    save_file({f"seg_projector.{k}": v for k, v in model.seg_projector.state_dict().items()},
              str(tmp_path / "projector.safetensors"))
    built, _, built_cfg = from_parts(tmp_path / "qwen", tmp_path / "sam2.pt",
                                     tmp_path / "projector.safetensors",
                                     grounding_encoder_config=config.grounding_encoder_config)
    assert built_cfg.seg_token_idx == config.seg_token_idx
    a, b = model.state_dict(), built.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _sizes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _changed_sam2(tiny_dir):
    model, processor, _ = load_checkpoint(tiny_dir)
    with torch.no_grad():  # what a segmentation-stage fine-tune changes
        model.seg_projector[2].bias.add_(0.5)
        model.sam2.sam_mask_decoder.iou_token.weight.mul_(-1.0)
    return model, processor


def test_saved_on_top_of_a_base_loads_the_same_weights(tiny_dir, tmp_path):
    base = tmp_path / "model"
    shutil.copytree(tiny_dir, base)
    model, processor = _changed_sam2(base)
    version = save_checkpoint(model, processor, base / "versions" / "1", base=base)
    index = json.loads((version / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and not any(k.startswith("mllm.") for k in index["weight_map"])
    assert _sizes(version) < _sizes(base)
    # a version trained from that version points at the same full checkpoint, not at it
    again = save_checkpoint(model, processor, base / "versions" / "2", base=version)
    assert json.loads((again / "citrusv_base.json").read_text())["path"] == "../.."
    for path in (version, again):
        loaded, _, _ = load_checkpoint(path)
        want = model.state_dict()
        got = loaded.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), path
    # moving the model folder with its versions keeps them loadable (relative path)
    moved = tmp_path / "elsewhere"
    shutil.move(str(base), moved)
    assert torch.equal(load_checkpoint(moved / "versions" / "2")[0].seg_projector[2].bias,
                       model.seg_projector[2].bias)


def test_base_that_changed_or_went_is_refused_with_a_sentence(tiny_dir, tmp_path):
    base = tmp_path / "model"
    shutil.copytree(tiny_dir, base)
    model, processor = _changed_sam2(base)
    version = save_checkpoint(model, processor, base / "versions" / "1", base=base)
    # the base re-saved in another dtype: same keys, other tensors
    fp16, proc, _ = load_checkpoint(base)
    save_checkpoint(fp16.half(), proc, base)
    with pytest.raises(CheckpointError, match="weight files changed since"):
        load_checkpoint(version)
    alone = tmp_path / "a" / "b" / "copied_alone"  # "../.." is tmp_path/a: no checkpoint
    shutil.copytree(version, alone)
    with pytest.raises(CheckpointError, match=r"was saved on top of .*/a, which holds no weights"):
        load_checkpoint(alone)
    beside = save_checkpoint(model, processor, tmp_path / "beside", base=base)  # "../model"
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=r"on top of the checkpoint in .*/model, which is "
                                              "not there any more"):
        load_checkpoint(beside)


def test_box_source_is_read_from_config_json_and_checked(tiny_dir, tmp_path):
    """config.json's box_source says where the engine's boxes come from ("text" when absent,
    as in the released Citrus-V configs); anything else is refused with a sentence."""
    assert "box_source" in json.loads((tiny_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("box_source")
    (bad / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(bad)[2].box_source == "text"
    cfg["box_source"] = "mask"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(bad)[2].box_source == "mask"
    cfg["box_source"] = "masks"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="box_source 'masks'; use 'text' or 'mask'"):
        load_checkpoint(bad)


def test_segment_answer_is_read_from_config_and_checked(tiny_dir, tmp_path):
    """`segment_answer` (the answer a closer look at a named structure gives the model) is
    optional; where set it must hold [SEG] and {label} and nothing else to fill."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("segment_answer", None)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(bad)[2].segment_answer == ""
    cfg["segment_answer"] = "Sure, the {label} is [SEG] {label}."
    (bad / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(bad)[2].segment_answer == cfg["segment_answer"]
    for wrong in ("Sure, it is [SEG].", "The {label} is here.", "The {label} {side} is [SEG]."):
        cfg["segment_answer"] = wrong
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=r"segment_answer '.*'; it must hold \[SEG\] "
                                                  r"and \{label\} \(and no other \{\.\.\.\}\)"):
            load_checkpoint(bad)


def test_mask_modalities_are_dicom_codes(tiny_dir, tmp_path):
    """config.json's mask_modalities: a list of Modality codes (upper-cased), [] for any; a
    bare string or an empty code stops the load with a sentence."""
    from citrusv.config import CitrusVConfig

    data = json.loads((tiny_dir / "config.json").read_text())
    assert CitrusVConfig.from_dict(data).mask_modalities == []  # the released layout: any
    assert CitrusVConfig.from_dict({**data, "mask_modalities": [" ct", "MR"]}
                                   ).mask_modalities == ["CT", "MR"]
    for bad in ("CT", [""], [1]):
        with pytest.raises(CheckpointError, match="config.json has mask_modalities"):
            CitrusVConfig.from_dict({**data, "mask_modalities": bad})


def test_structures_name_what_the_model_was_taught(tiny_dir, tmp_path):
    """config.json's structures: the names the model was taught to find (spaces and case
    evened), [] when not listed (the released layout); a bare string or an empty name stops
    the load with a sentence, and the list is saved as read."""
    from citrusv.config import CitrusVConfig

    data = json.loads((tiny_dir / "config.json").read_text())
    assert CitrusVConfig.from_dict(data).structures == []
    config = CitrusVConfig.from_dict({**data, "structures": ["Liver", " left  kidney "]})
    assert config.structures == ["liver", "left kidney"]
    assert config.to_dict()["structures"] == ["liver", "left kidney"]
    for bad in ("liver", [""], [3]):
        with pytest.raises(CheckpointError, match="config.json has structures"):
            CitrusVConfig.from_dict({**data, "structures": bad})


def test_languages_are_iso_codes(tiny_dir):
    """config.json's languages: the ISO 639-1 codes of the questions the model was taught
    (lower-cased), [] when not listed (the released layout); a bare string or a name stops
    the load with a sentence."""
    from citrusv.config import CitrusVConfig

    data = json.loads((tiny_dir / "config.json").read_text())
    assert CitrusVConfig.from_dict(data).languages == []
    config = CitrusVConfig.from_dict({**data, "languages": ["EN", " zh "]})
    assert config.languages == ["en", "zh"]
    assert config.to_dict()["languages"] == ["en", "zh"]
    for bad in ("en", ["English"], [""], [1]):
        with pytest.raises(CheckpointError, match=r"config.json has languages .*; use a list "
                                                  r"of ISO 639-1 codes"):
            CitrusVConfig.from_dict({**data, "languages": bad})


def test_closer_look_blend_is_the_crops_weight(tiny_dir):
    """config.json's closer_look_blend: the crop's weight in a closer look, above 0 and at
    most 1; absent: 1.0, the crop alone (the released layout)."""
    from citrusv.config import CitrusVConfig

    data = json.loads((tiny_dir / "config.json").read_text())
    assert CitrusVConfig.from_dict(data).closer_look_blend == 1.0
    assert CitrusVConfig.from_dict({**data, "closer_look_blend": 0.5}).closer_look_blend == 0.5
    for bad in (0, 1.5, "0.5", True, None):
        with pytest.raises(CheckpointError, match="config.json has closer_look_blend"):
            CitrusVConfig.from_dict({**data, "closer_look_blend": bad})
