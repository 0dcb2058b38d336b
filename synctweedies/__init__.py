"""SyncTweedies (Kim et al., NeurIPS 2024): synchronized diffusion through a canonical space.

projection.py (the f/g interface) · steps.py (DDIM/DDPM as functions of (x_t, x0|t)) · cases.py + sampler.py
(cases 0-6 as a hook on the shared loop) · views.py + anagram.py (ambiguous images) · wide.py (windows) ·
panorama.py (360-degree views) · apps/ (the three applications) · main.py (the original's CLI).
"""
