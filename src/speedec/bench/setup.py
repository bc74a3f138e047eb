"""What a benchmark runs on: the model, the prompts, the Hugging Face peer."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import PRESET_RESIDUAL_SCALE, ModelConfig, preset
from ..errors import SpeedecError
from ..hf import export_hf
from ..model import LoopedLM, model_rope_table
from ..quant import Q8Weight
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
    if dtype == torch.int8 and config.architecture == "huginn":
        # A recurrent-depth model's adapter is drawn and then shifted (RecurrentDepthLM.reset_parameters),
        # which drawing into 8-bit weights one matrix at a time cannot follow: the float32 model is
        # made whole and quantized (about 4.5 bytes a parameter at the peak).
        from ..quant import quantize_model

        return quantize_model(random_model(config, seed=seed, residual_scale=residual_scale))
    if dtype == torch.int8:  # q8_0: the float32 model's weights, quantized one by one as they are drawn
        return random_q8_model(config, seed=seed, residual_scale=residual_scale)
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
    # The rotary table is a buffer that to_empty leaves unset: the constructor's.
    model.rope = model_rope_table(config)
    _initialise(model, seed=seed, residual_scale=residual_scale)
    return model.eval()


def _initialise(model: LoopedLM, *, seed: int, residual_scale: float) -> None:
    """``reset_parameters`` with the seeded generator and the scale where the
    architecture puts it (see :func:`random_model`)."""
    ouro = model.config.architecture == "ouro"
    model.reset_parameters(residual_scale=1.0 if ouro else residual_scale,
                           generator=torch.Generator().manual_seed(seed))
    if ouro:
        with torch.no_grad():
            for layer in model.layers:
                layer.attn_out_norm.weight.fill_(residual_scale)
                layer.mlp_out_norm.weight.fill_(residual_scale)


class _QuantizeAsDrawn(TorchDispatchMode):
    """While the float model's ``reset_parameters`` runs: a draw (``normal_``) into one of
    the 8-bit weights, which stay on the meta device, is made into a float32 tensor of
    its shape with the same generator (so the draws are those of the float32 model, in
    its order) and quantized at once into that weight's ``qs`` / ``d``; the float32
    tensor is dropped. Any other operation on those weights is an error."""

    def __init__(self, targets: dict[str, torch.Tensor], into: dict[str, list[Q8Weight]]) -> None:
        super().__init__()
        self.names = {id(t): name for name, t in targets.items()}
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.names else None
        if target is None:
            return func(*args, **kwargs)
        if func is not torch.ops.aten.normal_.default:
            raise RuntimeError(f"building a q8_0 model: {func} on the 8-bit weight {self.names[id(target)]}")
        weight = torch.empty(target.shape, dtype=torch.float32)
        weight.normal_(*args[1:], **kwargs)
        for module in self.into[self.names[id(target)]]:
            module.fill(weight)
        return target


def random_q8_model(config: ModelConfig, *, seed: int = 0, residual_scale: float = 1.0) -> LoopedLM:
    """``quantize_model(random_model(config, seed=, residual_scale=))`` without the float32
    model: the same weights, bit for bit (the 8-bit ones are drawn in float32 one matrix
    at a time, in the float model's order, and quantized as they are made), so that the
    memory it takes is the q8_0 model's plus one float32 matrix (the largest: the LM
    head), never the float32 model (16.7 GB for nanbeige-4.2-3b-shape)."""
    from ..quant import quantized_names

    with torch.device("meta"):
        source = LoopedLM(config)  # the float32 model's layout: what reset_parameters draws into
        target = LoopedLM(config.replace(quantization="q8_0"))
    source_params = dict(source.named_parameters())
    # The 8-bit modules, made on the CPU (each filled from its draw), by the float parameter
    # they quantize: their own name, the embedding's "embed.weight", and for a tied head
    # the embedding too (a q8_0 copy of it, as quantize_model makes).
    made: dict[str, Q8Weight] = {}
    into: dict[str, list[Q8Weight]] = {}
    for name in quantized_names(target):
        skeleton = target.get_submodule(name)
        made[name] = type(skeleton)(skeleton.qs.shape[0], skeleton.in_features)
        if name in source_params:
            float_name = name
        elif name == "lm_head":
            float_name = "embed.weight"
        else:
            float_name = f"{name}.weight"
        into.setdefault(float_name, []).append(made[name])
    targets = {name: source_params[name] for name in into}
    # Everything else of the float model is real (float32, as quantize_model keeps it).
    for name, param in source_params.items():
        if name not in targets:
            owner, _, leaf = name.rpartition(".")
            setattr(source.get_submodule(owner), leaf, torch.nn.Parameter(torch.empty(param.shape), requires_grad=False))
    with _QuantizeAsDrawn(targets, into):
        _initialise(source, seed=seed, residual_scale=residual_scale)
    state = {name: t.detach() for name, t in source.state_dict().items() if name not in targets}
    for name, module in made.items():
        state[f"{name}.qs"], state[f"{name}.d"] = module.qs, module.d
    del source
    target.load_state_dict(state, assign=True)
    target.rope = model_rope_table(config)
    target.requires_grad_(False)  # for inference, as quantize_model leaves it
    return target.eval()


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
