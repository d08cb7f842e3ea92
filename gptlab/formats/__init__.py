"""Files in and out: Hugging Face model dirs (hf.py), each family's names (families/), PEFT adapters (peft.py)."""
