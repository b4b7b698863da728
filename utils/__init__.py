"""Shared logic for the SPUL pipeline scripts (qlora.py, spul.py, baselines.py, inference_spul.py, eco.py)."""
