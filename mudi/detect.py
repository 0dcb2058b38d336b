"""Open-vocabulary boxes (OWLv2, transformers) and box-prompted masks (SAM, segment-anything) for MuDI's prior
masks and Detect-and-Compare, plus tiny random-weight versions built from the same classes for tests.

Real weights: OWLv2 `google/owlv2-base-patch16-ensemble` (hub id or local folder); SAM ViT-H from the released
`sam_vit_h_4b8939.pth`, read with `torch.load(weights_only=True)` / safetensors (never unpickled code).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from common.errors import UsageError

OWLV2_ID = "google/owlv2-base-patch16-ensemble"
Box = tuple[float, float, float, float]


class Detector(Protocol):
    def __call__(self, image: Image.Image, queries: Sequence[str]) -> list[Box]: ...


class Segmenter(Protocol):
    def __call__(self, image: Image.Image, box: Box) -> np.ndarray: ...


@dataclass
class OwlDetector:
    """OWLv2 boxes (x0, y0, x1, y1) in pixels of every label whose score exceeds `threshold` (labels ignored,
    as MuDI does). OWLv2 pads the image to a square at the bottom/right, so boxes are scaled to the long side."""

    model: Any
    processor: Any
    threshold: float = 0.4

    @torch.no_grad()
    def __call__(self, image: Image.Image, queries: Sequence[str]) -> list[Box]:
        device = next(self.model.parameters()).device
        inputs = self.processor(text=[list(queries)], images=image.convert("RGB"), return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        side = max(image.width, image.height)
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=torch.tensor([[side, side]], device=device))[0]
        boxes = []
        for x0, y0, x1, y1 in result["boxes"].float().cpu().tolist():
            x0, x1 = max(0.0, x0), min(float(image.width), x1)
            y0, y1 = max(0.0, y0), min(float(image.height), y1)
            if x1 > x0 and y1 > y0:
                boxes.append((x0, y0, x1, y1))
        return boxes


def load_owlv2(spec: str = OWLV2_ID, *, threshold: float = 0.4, device: str | torch.device = "cpu") -> OwlDetector:
    """OWLv2 from a hub id / local folder, or "tiny" for random weights."""
    if spec in ("tiny", "tiny-single"):  # tiny-single: one 16 px patch, so always exactly one box (smoke runs)
        return tiny_owlv2(threshold=threshold, device=device, image_size=16 if spec == "tiny-single" else 64)
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    try:
        model = Owlv2ForObjectDetection.from_pretrained(spec)
        processor = Owlv2Processor.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - offline / missing files: one line
        reason = " ".join(str(e).split())[:160]
        raise UsageError(f"OWLv2 {spec} is not available ({reason}); download it with: hf download {spec}") from None
    return OwlDetector(model.to(device).eval(), processor, threshold)


def tiny_owlv2(seed: int = 0, *, threshold: float = 0.0, device: str | torch.device = "cpu",
               image_size: int = 64) -> OwlDetector:
    """Owlv2ForObjectDetection with 1-layer 32-wide towers, `image_size` px input in 16 px patches (64: 16 boxes;
    16: one box, the whole image), the offline CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from common.models.tokenizer import clip_tokenizer

    config = Owlv2Config(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config).eval()
        with torch.no_grad():  # random box deltas saturate the sigmoid (empty boxes); start from the patch grid
            model.box_head.dense2.weight.mul_(0.01)
            model.box_head.dense2.bias.zero_()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=clip_tokenizer(model_max_length=16))
    return OwlDetector(model.to(device), processor, threshold)


@dataclass
class SamSegmenter:
    """SAM with one box prompt, `multimask_output=False` -> bool mask [H, W]."""

    predictor: Any

    @torch.no_grad()
    def __call__(self, image: Image.Image, box: Box) -> np.ndarray:
        self.predictor.set_image(np.asarray(image.convert("RGB")))
        masks, _, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
        return np.asarray(masks[0], dtype=bool)


def _sam_predictor(sam: torch.nn.Module):
    from segment_anything import SamPredictor

    return SamPredictor(sam.eval())


def load_sam(spec: str, *, model_type: str = "vit_h", device: str | torch.device = "cpu") -> SamSegmenter:
    """SAM from a released checkpoint file (e.g. sam_vit_h_4b8939.pth), or "tiny" for random weights."""
    if spec == "tiny":
        return tiny_sam(device=device)
    from segment_anything import sam_model_registry

    from common.io import load_weights

    if not os.path.isfile(spec):
        raise UsageError(f"SAM checkpoint {spec} not found; download sam_vit_h_4b8939.pth from the segment-anything "
                         "release and pass its path with --sam_checkpoint")
    if model_type not in sam_model_registry:
        raise UsageError(f"unknown SAM model type {model_type}; use one of {', '.join(sam_model_registry)}")
    sam = sam_model_registry[model_type](checkpoint=None)
    sam.load_state_dict(load_weights(spec))
    return SamSegmenter(_sam_predictor(sam.to(device)))


def tiny_sam(seed: int = 0, *, device: str | torch.device = "cpu") -> SamSegmenter:
    """segment-anything's Sam with a 1-block 32-wide ViT at 64 px (patch 16) and a 1-layer two-way decoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, size, patch = 32, 64, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                                          out_chans=dim, window_size=0, global_attn_indexes=()),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                         input_image_size=(size, size), mask_in_chans=4),
            mask_decoder=MaskDecoder(transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=1,
                                     iou_head_hidden_dim=16,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
        )
    return SamSegmenter(_sam_predictor(sam.to(device)))
