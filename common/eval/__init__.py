"""Evaluation toolkit: CLIP-T / CLIP-I / DINO / DINOv2 / KID / aesthetic metrics over one FeatureExtractor
interface, an on-disk reference-feature cache, CustomConcept101 / DreamBench layouts, runners and reports."""
from common.eval.cache import FeatureCache
from common.eval.clip import clip_i, clip_score, clip_t, load_clip
from common.eval.datasets import Benchmark, Concept, Task, fill_prompt, load_customconcept101, load_dreambench, strip_tokens
from common.eval.dino import dino_similarity, load_dino, load_dinov2
from common.eval.extractor import CLIP_224, DINO_256_224, FeatureExtractor, Preprocess
from common.eval.kid import KIDResult, kid, load_inception, mmd2_unbiased
from common.eval.similarity import cosine_matrix, pairwise_mean

__all__ = [
    "Benchmark", "CLIP_224", "Concept", "DINO_256_224", "FeatureCache", "FeatureExtractor", "KIDResult",
    "Preprocess", "Task", "clip_i", "clip_score", "clip_t", "cosine_matrix", "dino_similarity", "fill_prompt",
    "kid", "load_clip", "load_customconcept101", "load_dino", "load_dinov2", "load_dreambench", "load_inception",
    "mmd2_unbiased", "pairwise_mean", "strip_tokens",
]
