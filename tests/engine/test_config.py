import json

from citrusv.config import CitrusVConfig
from citrusv.modeling import build_sam2

# The released 8B config.json: flat Qwen2.5-VL text fields, nested vision_config, and the
# grounding encoder given as a dict holding the authors' absolute yaml path.
RELEASED_8B = {
    "architectures": ["CitrusV"], "model_type": "citrus_v", "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "temporal_patch_size": 2},
    "grounding_encoder_config": {"apply_postprocessing": False, "torch_dtype": "bfloat16",
                                 "cfg_path": "/mnt/workspace/x/sam2_configs/sam2_hiera_l.yaml"},
    "frozen_sam2_decoder": False, "seg_token_idx": 151665,
}


def test_released_8b_config_reads_into_qwen_and_citrus_fields():
    cfg = CitrusVConfig.from_dict(RELEASED_8B)
    assert cfg.hidden_size == 3584 and cfg.mllm.text_config.num_hidden_layers == 28
    assert cfg.mllm.vision_config.depth == 32 and cfg.mllm.vision_config.out_hidden_size == 3584
    assert cfg.seg_token_idx == 151665 and cfg.seg_hidden_offset == 0
    assert cfg.mllm.image_token_id == 151655
    again = CitrusVConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict()["grounding_encoder_config"] == RELEASED_8B["grounding_encoder_config"]
    assert again.to_dict()["model_type"] == "citrus_v"


def test_released_grounding_dict_resolves_yaml_by_basename():
    sam = build_sam2({"cfg_path": "/mnt/authors/sam2_configs/sam2_hiera_t.yaml",
                      "apply_postprocessing": False})
    assert sam.image_size == 1024 and sam.image_encoder.trunk.blocks[0].dim == 96
