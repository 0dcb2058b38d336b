"""Custom Diffusion (Kumari et al., CVPR 2023): fine-tune only the cross-attention K/V projections (plus new
modifier-token embeddings), merge concepts in closed form, compress deltas to low rank.

Modules: attention (trainable K/V processors), formats (every checkpoint layout), merge, compress, sample.
"""
