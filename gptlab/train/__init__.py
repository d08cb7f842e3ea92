"""Training: the one loop (loop.py) and what plugs into it.

    loop.py       Trainer and LoopConfig: steps, accumulation, evaluation, checkpoints, resume, early stopping
    losses.py     loss hooks (next-token, classification)      savers.py    checkpoint formats
    runtime.py    device, precision, peak FLOP/s, processes     pretrain.py  `gptlab train`'s recipe
    finetune.py   `gptlab finetune`'s recipe: full / LoRA x SFT / classification / LM
"""

from gptlab.train.loop import LoopConfig, Trainer

__all__ = ["LoopConfig", "Trainer"]
