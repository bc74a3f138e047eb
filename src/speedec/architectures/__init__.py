"""The architectures speedec runs, one file each, registered here (the one place).

Each file holds an architecture's layer variant, its hooks (whether the final
norm closes every loop, an early-exit gate, its rotary table, its config
checks) and its checkpoint conversion table, as one
:class:`~speedec.architectures.base.Architecture`:

* ``llama``     speedec's own (the default): pre-norm layers; exported as a plain Llama;
* ``ouro``      Ouro: sandwich-norm layers, the final norm closing every loop, an exit gate;
* ``nanbeige``  Nanbeige: Llama's layers, the final norm closing every loop (switchable);
* ``huginn``    Huginn (recurrent depth): a prelude, a core looped r times with input injection, a coda.

:data:`ARCHITECTURES` maps ``ModelConfig.architecture`` to its description, and
:data:`IMPORTED` the Hugging Face ``model_type`` of every architecture whose
checkpoints speedec loads. :class:`~speedec.model.looped.LoopedLM`,
:class:`~speedec.config.ModelConfig`, :mod:`speedec.storage` and
:func:`speedec.hf.export_hf` consult them; adding an architecture is adding a
file and a line here.
"""

from ..errors import ConfigError
from .base import Architecture, decoder_config
from .huginn import HUGINN
from .llama import LLAMA
from .nanbeige import NANBEIGE
from .ouro import OURO

# ModelConfig.architecture -> its description (in the order errors list them).
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, OURO, NANBEIGE, HUGINN)}

# The Hugging Face "model_type" of every architecture whose checkpoints speedec loads.
IMPORTED: dict[str, Architecture] = {a.model_type: a for a in ARCHITECTURES.values() if a.imported}


def architecture(name: str) -> Architecture:
    """The architecture ``ModelConfig.architecture`` names (a ConfigError lists the known ones)."""
    found = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return found


__all__ = ["ARCHITECTURES", "IMPORTED", "Architecture", "architecture", "decoder_config"]
