import os

# DeepSpeed (installed for PPO under ZeRO-3) guesses its accelerator when transformers imports it, and says so on
# stdout when it falls back to the CPU: on a machine without an NVIDIA driver it is told, and stays quiet. (No torch
# import here: the command line starts without it.)
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
