"""What a benchmark runs on: the model, the prompts, the Hugging Face peer."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from ..config import PRESET_RESIDUAL_SCALE, ModelConfig, preset
from ..errors import SpeedecError
from ..hf import export_hf
from ..model import LoopedLM, rope_table
from ..tokenizer import TOKENIZER_FILE, load_tokenizer

# Opening lines in the style of the training corpus, for models with a tokenizer.
ENGLISH_PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "And God said, Let there be light: and there was light. And God saw the light,",
    "The committee met on Tuesday afternoon to consider the proposal, and after a long debate",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "She walked slowly down to the harbour, where the boats were coming in with the evening tide",
    "He had never seen the city so quiet. The streets were empty, and the shops were closed,",
    "Once upon a time there lived a poor miller who had a beautiful daughter, and one day",
    "The results of the survey were published in the spring, and they showed that most families",
]


def build_model(preset_name: str, *, seed: int = 0, model_dir: str | Path | None = None,
                residual_scale: float | None = None, exit_loop: int | None = None,
                dtype: torch.dtype | None = None) -> LoopedLM:
    """A preset's random-weight model (residual branches scaled by the preset's
    scale unless ``residual_scale`` is given, see :func:`random_model`), or a saved
    model when ``model_dir`` is given; ``exit_loop`` replaces its early exit.
    ``dtype``: the weights' dtype; None: float32 for a preset, the checkpoint's own
    for ``model_dir`` (see ``LoopedLM.from_pretrained``)."""
    if model_dir is not None:
        return LoopedLM.from_pretrained(model_dir, exit_loop=exit_loop, dtype=dtype)
    if residual_scale is None:
        residual_scale = PRESET_RESIDUAL_SCALE.get(preset_name, 1.0)
    config = preset(preset_name)
    if exit_loop is not None:
        config = config.replace(exit_loop=exit_loop)
    if dtype == torch.int8:  # q8_0: the float32 model's weights, quantized
        from ..quant import quantize_model

        return quantize_model(random_model(config, seed=seed, residual_scale=residual_scale))
    return random_model(config, seed=seed, residual_scale=residual_scale, dtype=dtype or torch.float32)


def random_model(config: ModelConfig, *, seed: int = 0, residual_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> LoopedLM:
    """``LoopedLM.random(config, seed=, residual_scale=)`` built directly in ``dtype``.

    The model is laid out on the meta device, materialised once in ``dtype`` and
    initialised in place by its own ``reset_parameters`` with the seeded
    generator: no float32 copy of a bfloat16 model is ever made, and the
    constructor's unseeded init (seconds at 1.4B parameters) is skipped. The
    float32 weights equal ``LoopedLM.random``'s; bfloat16 ones are those rounded
    (torch draws bfloat16 normals in float32 and rounds them).

    Architecture ``"ouro"`` normalises each branch's output (sandwich norms), so
    scaling the output projections would change nothing: there the scale is the
    gain of those norms (``attn_out_norm``, ``mlp_out_norm``) and the projections
    keep the plain init.
    """
    with torch.device("meta"):
        skeleton = LoopedLM(config)
    model = skeleton.to(dtype=dtype).to_empty(device="cpu")
    # The rotary table is a buffer that to_empty leaves unset; float64, as the constructor makes it.
    model.rope = rope_table(config.max_seq_len, config.head_dim, config.rope_theta)
    ouro = config.architecture == "ouro"
    model.reset_parameters(residual_scale=1.0 if ouro else residual_scale,
                           generator=torch.Generator().manual_seed(seed))
    if ouro:
        with torch.no_grad():
            for layer in model.layers:
                layer.attn_out_norm.weight.fill_(residual_scale)
                layer.mlp_out_norm.weight.fill_(residual_scale)
    return model.eval()


def make_prompts(model: LoopedLM, model_dir: str | Path | None, *, count: int, length: int,
                 seed: int = 0) -> list[list[int]]:
    """English prompts when the model has a tokenizer, else seeded random ids."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(model_dir, model.config.vocab_size)
        prompts = [tok.encode(text)[:length] for text in ENGLISH_PROMPTS]
        return [prompts[i % len(prompts)] for i in range(count)]
    rng = random.Random(seed)
    return [[rng.randrange(model.config.vocab_size) for _ in range(length)] for _ in range(count)]


def load_hf_peer(model: LoopedLM):
    """The model exported as a transformers Llama (K*L layers), in the model's dtype."""
    try:
        import transformers
    except ImportError:
        raise SpeedecError("the Hugging Face peers need transformers: pip install 'speedec[hf]'") from None
    transformers.logging.set_verbosity_error()  # its deprecation chatter would garble the table
    with tempfile.TemporaryDirectory(prefix="speedec-hf-") as tmp:
        export_hf(model, tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=model.dtype)
    return hf.eval()


def hf_supports_early_exit() -> bool:
    try:
        from transformers import GenerationConfig
    except ImportError:
        return False
    return hasattr(GenerationConfig(), "assistant_early_exit")
