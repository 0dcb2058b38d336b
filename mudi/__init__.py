"""MuDI (Jang et al., NeurIPS 2024): Seg-Mix LoRA training on several subjects, mean-shifted initialisation and
Detect-and-Compare. Modules: metadata (metadata.jsonl), segmix (the collage rules), data (the dataset), losses
(masked MSE, DCO), train / sample / eval / prior (entry points), init (mean shift), detect (OWLv2, SAM), dnc."""
