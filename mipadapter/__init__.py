"""mipadapter: MIP-Adapter (K references routed by their entity words) on common/: processor.py (the weighted
merge), model.py (variants, checkpoints), pipeline.py (sampling), references.py, data.py + train.py, eval.py."""
