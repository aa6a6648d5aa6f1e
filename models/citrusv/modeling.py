"""The CitrusV torch module: Qwen2.5-VL (`mllm`) + `seg_projector` + SAM2 (`grounding_encoder`).

Key names match the released checkpoint: mllm.model.language_model.*, mllm.model.visual.*,
mllm.lm_head.*, grounding_encoder.sam2_model.*, seg_projector.{0,2}.*.
"""

from __future__ import annotations

from pathlib import Path

import sam2
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from .config import CitrusVConfig
from .errors import CheckpointError


def resolve_sam2_config(name: str) -> Path:
    """A SAM2 yaml by path, or by basename among sam2's packaged configs (authors' paths too)."""
    path = Path(name)
    if path.is_file():
        return path
    root = Path(sam2.__file__).parent / "configs"
    hits = sorted(root.rglob(path.name), key=lambda p: (p.parent.name != "sam2", str(p)))
    if not hits:
        raise CheckpointError(f"grounding_encoder_config '{name}' is not a file and no SAM2 "
                              f"config named {path.name} ships with the sam2 package.")
    return hits[0]


def build_sam2(spec: str | dict) -> nn.Module:
    """Instantiate SAM2Base from a config name/path, the released form
    `{"cfg_path": ".../sam2_hiera_l.yaml", ...}`, or an inline dict of the yaml's `model`."""
    if isinstance(spec, dict) and "cfg_path" in spec:
        spec = str(spec["cfg_path"])
    if isinstance(spec, str):
        cfg = OmegaConf.load(resolve_sam2_config(spec))
        cfg = cfg.model if "model" in cfg else cfg
    else:
        cfg = OmegaConf.create(spec.get("model", spec))
    OmegaConf.resolve(cfg)
    return instantiate(cfg, _recursive_=True)


class GroundingEncoder(nn.Module):
    """Holds SAM2 under the released key prefix `grounding_encoder.sam2_model`."""

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.sam2_model = sam2_model


class SegProjector(nn.Sequential):
    """Linear(h,h) -> ReLU -> Linear(h,d_sam); `residual` adds the input before the last layer."""

    def __init__(self, hidden: int, out_dim: int, residual: bool = False) -> None:
        super().__init__(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[1](self[0](x))
        return self[2](h + x if self.residual else h)


class CitrusV(nn.Module):
    """Qwen2.5-VL + [SEG] -> projector -> SAM2 mask decoder (image mode)."""

    def __init__(self, config: CitrusVConfig) -> None:
        super().__init__()
        self.config = config
        self.mllm = Qwen2_5_VLForConditionalGeneration(config.mllm)
        self.grounding_encoder = GroundingEncoder(build_sam2(config.grounding_encoder_config))
        self.seg_projector = SegProjector(config.hidden_size, config.out_dim,
                                          config.use_res_seg_projector)

    @property
    def sam2(self) -> nn.Module:
        return self.grounding_encoder.sam2_model

    @property
    def sam2_image_size(self) -> int:
        return int(self.sam2.image_size)

    @property
    def sam2_dtype(self) -> torch.dtype:
        """What SAM2 and the projector take: fp32 (see keep_sam2_fp32)."""
        return self.seg_projector[0].weight.dtype

    def keep_sam2_fp32(self) -> CitrusV:
        """SAM2 and the projector in fp32 whatever the MLLM's dtype. SAM2's own code builds fp32
        tensors on the way (the FPN's top-down path, the prompt encoder's empty sparse prompt
        and grid) and feeds them to its layers, which fails against bf16 weights unless
        autocast runs; fp32 is also what its fine-tune should update. Its cost is small next to
        the MLLM (Citrus-V-8B: SAM2 Hiera-L 224 M parameters, 0.9 GB in fp32)."""
        self.grounding_encoder.float()
        self.seg_projector.float()
        return self

    @torch.no_grad()
    def encode_slice(self, pixels: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """SAM2 image encoder on (B, 3, S, S) slices; `no_mem_embed` added (image mode)."""
        sam = self.sam2
        backbone_out = sam.forward_image(pixels)
        _, feats, _, sizes = sam._prepare_backbone_features(backbone_out)
        if sam.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + sam.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(f.shape[1], -1, *hw) for f, hw in zip(feats, sizes)]
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}

    @torch.no_grad()
    def decode_masks(self, features: dict, seg_hidden: torch.Tensor, out_hw: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """[SEG] hidden states (n, h) -> mask logits (n, H, W) at slice size, and IoU scores (n,)."""
        sam = self.sam2
        n = seg_hidden.shape[0]
        dtype = features["image_embed"].dtype
        prompt = self.seg_projector(seg_hidden.to(self.seg_projector[0].weight.dtype))
        sparse, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse.expand(n, -1, -1), prompt[:, None, :].to(sparse.dtype)], dim=1)
        dense = dense.expand(n, -1, -1, -1)
        low_res, iou, _, _ = sam.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
            repeat_image=True,
            high_res_features=features["high_res_feats"],
        )
        best = iou.argmax(dim=1)
        idx = torch.arange(n, device=iou.device)
        logits = low_res[idx, best][:, None].float()
        logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
        return logits[:, 0], iou[idx, best].float()
