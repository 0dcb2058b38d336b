"""Image loading, fine-tuning datasets (image folders, metadata.jsonl captions) and object masks."""
from common.data.datasets import ImageFolderDataset, MetadataJsonlDataset, read_metadata_jsonl
from common.data.images import (
    IMAGE_EXTENSIONS,
    MIN_TRAINING_SIDE,
    check_images,
    image_to_tensor,
    list_images,
    load_rgb,
    tensor_to_pil,
)
from common.data.masks import dilate_mask, load_mask, mask_bbox, resize_mask, to_token_grid, union_masks

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "MIN_TRAINING_SIDE",
    "MetadataJsonlDataset",
    "check_images",
    "dilate_mask",
    "image_to_tensor",
    "list_images",
    "load_mask",
    "load_rgb",
    "mask_bbox",
    "read_metadata_jsonl",
    "resize_mask",
    "tensor_to_pil",
    "to_token_grid",
    "union_masks",
]
