"""Device, dtype and memory policy, decided once per stage from the hardware and logged.

TRL's configs default to bf16. On a CPU without native bf16 (AVX2 without AVX512-BF16 or AMX) bf16 matrix
products are emulated and a training step runs about 12 times slower than in fp32, so the policy is:
CUDA with bf16 support -> bf16; older CUDA GPUs -> fp32 (fp16 only when asked for: it needs loss scaling);
CPU -> fp32 unless the CPU has native bf16; anything else -> fp32. `precision` in the config overrides.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Bytes per trainable parameter under AdamW in fp32: weight, gradient and two moments.
TRAINING_BYTES_PER_PARAM = 16
# Fraction of free memory a stage may plan to use before gradient checkpointing is switched on.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class Hardware:
    device: str
    dtype: torch.dtype
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.dtype == torch.float16

    def describe(self) -> str:
        return f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')} ({self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def detect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose(precision: str = "auto", device: str | None = None, flags: set[str] | None = None,
           cuda_bf16: bool | None = None) -> Hardware:
    """The device and dtype for a stage. `precision` forces a dtype; "auto" follows the hardware."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    device = device or detect_device()
    if precision != "auto":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return Hardware(device, dtype, f"precision={precision} set in config")
    if device == "cuda":
        if cuda_bf16 is None:  # natively (Ampere on): a V100 or T4 can make bf16 tensors, and emulates their maths
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if cuda_bf16:
            return Hardware(device, torch.bfloat16, "CUDA GPU with bf16 support")
        return Hardware(device, torch.float32, "CUDA GPU without bf16 support")
    if device == "cpu":
        flags = cpu_flags() if flags is None else flags
        if cpu_has_native_bf16(flags):
            return Hardware(device, torch.bfloat16, "CPU with native bf16 (AVX512-BF16/AMX)")
        return Hardware(device, torch.float32, "CPU without native bf16: emulated bf16 is ~12x slower")
    return Hardware(device, torch.float32, f"{device} device")


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the second
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
        except (ValueError, OSError):
            continue
    return 0


def training_memory_bytes(n_params: int, n_layers: int, hidden_size: int, tokens_per_step: int,
                          dtype_bytes: int = 4) -> int:
    """A rough upper estimate: optimizer state plus activations kept for the backward pass. Korthikanti et al.
    (2022) count 34 bytes per token, layer and hidden unit without recomputation, for 2-byte values: 17 values,
    each taken at the parameters' size here (with bf16 autocast over fp32 weights, most are half that). It ignores
    the attention-score term, small at the lengths we train on. (It counted 34 values, twice the paper's.)"""
    activations = 17 * tokens_per_step * n_layers * hidden_size * dtype_bytes
    return n_params * TRAINING_BYTES_PER_PARAM + activations


def needs_gradient_checkpointing(model, tokens_per_step: int, device: str, free_bytes: int | None = None) -> bool:
    """Recomputing activations costs about a third more compute, so it is on only when memory requires it."""
    config = model.config
    estimate = training_memory_bytes(
        sum(p.numel() for p in model.parameters()), getattr(config, "num_hidden_layers", 1),
        getattr(config, "hidden_size", 1), tokens_per_step, next(model.parameters()).element_size())
    free_bytes = free_memory_bytes(device) if free_bytes is None else free_bytes
    return estimate > MEMORY_HEADROOM * free_bytes


def log_decision(stage: str, hardware: Hardware, gradient_checkpointing: bool | None = None) -> str:
    line = f"[{stage}] {hardware.describe()}"
    if gradient_checkpointing is not None:
        line += f"; gradient checkpointing {'on: memory requires it' if gradient_checkpointing else 'off'}"
    log.info(line)
    return line


def configure_training_args(args) -> None:
    """Fills a TRL/transformers training config from the hardware, before TrainingArguments validates it:
    precision (unless bf16/fp16 were given), and the CPU switches transformers needs. Records whether gradient
    checkpointing was left to us (`gradient_checkpointing_auto`)."""
    args.hardware = choose(args.precision)
    if args.bf16 is None and not args.fp16:
        args.bf16, args.fp16 = args.hardware.bf16, args.hardware.fp16
    elif (bool(args.bf16), bool(args.fp16)) != (args.hardware.bf16, args.hardware.fp16):
        # bf16/fp16 given: the dtype the stage loads, samples and scores in (and logs) is theirs as well
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        args.hardware = Hardware(args.hardware.device, dtype, f"bf16={bool(args.bf16)}, fp16={bool(args.fp16)} set in "
                                                              "config")
    args.gradient_checkpointing_auto = args.gradient_checkpointing is None and args.activation_checkpointing is None
    if args.hardware.device == "cpu":
        args.use_cpu = True  # transformers refuses bf16 on a CPU unless told it is one
    if args.hardware.device != "cuda":
        args.dataloader_pin_memory = False  # pinning needs an accelerator; on a CPU it only warns
