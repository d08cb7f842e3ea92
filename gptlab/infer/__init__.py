"""Inference: choosing tokens (sampling.py), the prefill + decode loop (generate.py), conversations (chat.py)."""
