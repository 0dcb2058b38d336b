"""Triton attention kernels (CUDA-targeted; tested on CPU under TRITON_INTERPRET=1) and their torch references."""
