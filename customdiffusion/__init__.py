"""Custom Diffusion (Kumari et al., CVPR 2023): fine-tune only the cross-attention K/V projections (plus new
modifier-token embeddings), merge concepts in closed form, compress deltas to low rank.

Modules: attention (trainable K/V processors), data (augmentation, loss mask), loss, train, formats (every
checkpoint layout), merge, compress, convert, sample, outputs (no silent overwrites), eval_protocol
(CustomConcept101 protocol and the paper's table), eval (`--generate`).
"""
