"""The model: one typed Config (config.py), the presets (presets.py), sizes and costs (stats.py), the one
Transformer (model.py), and the modules swapped onto it: LoRA (lora.py), a classification head (classifier.py).
"""
