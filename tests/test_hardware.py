import torch

from rlhf import hardware


def test_cpu_without_native_bf16_trains_in_fp32():
    choice = hardware.choose(device="cpu", flags={"avx2", "fma"})
    assert choice.dtype == torch.float32 and not choice.bf16
    assert "12x slower" in choice.reason


def test_cpu_with_native_bf16_uses_it():
    for flag in ("avx512_bf16", "amx_bf16"):
        assert hardware.choose(device="cpu", flags={"avx512f", flag}).dtype == torch.bfloat16


def test_gpu_policy_and_forced_precision():
    assert hardware.choose(device="cuda", cuda_bf16=True).dtype == torch.bfloat16
    assert hardware.choose(device="cuda", cuda_bf16=False).dtype == torch.float32
    assert hardware.choose("fp16", device="cpu", flags=set()).dtype == torch.float16
    assert hardware.choose("fp32", device="cuda", cuda_bf16=True).dtype == torch.float32


def test_this_machine_follows_its_cpu_flags_or_its_gpu():
    flags = hardware.cpu_flags()
    expected = torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32
    if torch.cuda.is_available():  # a GPU machine: the GPU's native bf16 decides, the CPU's flags still for the CPU
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert hardware.choose().dtype == (torch.bfloat16 if native else torch.float32)
    assert hardware.choose(device="cpu").dtype == expected


def test_gradient_checkpointing_only_when_memory_needs_it(tiny_model_path):
    from rlhf.models import load_causal_lm

    model, _ = load_causal_lm(str(tiny_model_path))
    n_params = sum(p.numel() for p in model.parameters())
    need = hardware.training_memory_bytes(n_params, 2, 32, 4096)
    assert need == n_params * 16 + 17 * 4096 * 2 * 32 * 4  # Korthikanti et al.: 34 bytes of 2-byte values
    assert not hardware.needs_gradient_checkpointing(model, 4096, "cpu", free_bytes=10 * need)
    assert hardware.needs_gradient_checkpointing(model, 4096, "cpu", free_bytes=need)
    assert hardware.free_memory_bytes("cpu") > 0


def test_decision_is_logged_in_one_line(caplog):
    caplog.set_level("INFO")
    line = hardware.log_decision("sft", hardware.choose(device="cpu", flags=set()), False)
    assert line == "[sft] device=cpu dtype=float32 (CPU without native bf16: emulated bf16 is ~12x slower); " \
                   "gradient checkpointing off"
    assert caplog.messages == [line]
