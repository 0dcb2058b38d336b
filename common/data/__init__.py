"""Image loading and fine-tuning datasets (image folders, metadata.jsonl captions)."""
from common.data.datasets import ImageFolderDataset, MetadataJsonlDataset, read_metadata_jsonl
from common.data.images import IMAGE_EXTENSIONS, image_to_tensor, list_images, load_rgb, tensor_to_pil

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "MetadataJsonlDataset",
    "image_to_tensor",
    "list_images",
    "load_rgb",
    "read_metadata_jsonl",
    "tensor_to_pil",
]
