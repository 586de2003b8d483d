import os

import torch

# DeepSpeed (installed for PPO under ZeRO-3) guesses its accelerator when transformers imports it, and says so on
# stdout when it falls back to the CPU: on a machine without CUDA it is told, and stays quiet.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
