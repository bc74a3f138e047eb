"""What the decoder-only and encoder-decoder looped models share (:class:`LoopedModelBase`)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import linear
from .layer import KernelModule
from .norms import RMSNorm
from .readout import ExitReadout


class LoopedModelBase(KernelModule):
    """What the decoder-only and encoder-decoder models share: reproducible
    random construction, the dtype/device/LM-head accessors engines use, and
    the architecture hooks of a loop (:meth:`begin_loop`, :meth:`end_of_loop`).
    Subclasses define ``reset_parameters``, ``embed``, ``norm`` and ``lm_head``,
    and may set ``exit_readout`` (an :class:`ExitReadout`) and
    ``loop_embedding`` (``[L, D]``)."""

    # ------------------------------------------------------------------ depth
    def at_depth(self, n_loops: int) -> LoopedModelBase:
        """This model run for its first ``n_loops`` loops (1..L): a view sharing every
        parameter, buffer and module (no copies) whose ``config.n_loops`` is ``n_loops``
        and whose early exit is ``min(exit_loop, n_loops - 1)`` (none at depth 1, where
        the exit readout goes unused). Loop ``j < n_loops`` of the view is loop ``j``
        of the model, on the same virtual layers ``j * K + k`` of its own KV cache (the
        decoder's, for a translator), so the view decodes and scores exactly as a model
        of ``n_loops`` loops with these weights would. ``n_loops == L``: the model itself. For decoding and
        evaluation; save the model, not a view. Other architectures' models override
        this where their depth means something else. ConfigError: a depth outside 1..L."""
        from ..errors import ConfigError

        c = self.config
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or not 1 <= n_loops <= c.n_loops:
            raise ConfigError(f"loops must be an integer from 1 to {c.n_loops} (the model's loops), "
                              f"got {n_loops!r}")
        if n_loops == c.n_loops:
            return self
        exit_loop = None if n_loops == 1 else min(c.exit_loop, n_loops - 1)
        view = self.view(n_loops=n_loops, exit_loop=exit_loop,
                         exit_readout_rank=c.exit_readout_rank if exit_loop else None)
        if exit_loop is None:
            view.exit_readout = None
        return view

    def view(self, **config_changes) -> LoopedModelBase:
        """A copy of this model sharing every parameter, buffer and module (no copies),
        with its own registries (so that the view's edits stay its own) and its config
        changed by ``config_changes`` (:meth:`at_depth`'s views)."""
        import copy
        from dataclasses import replace

        view = copy.copy(self)
        for registry in ("_parameters", "_buffers", "_modules"):
            object.__setattr__(view, registry, copy.copy(getattr(self, registry)))
        view.config = replace(self.config, **config_changes)
        return view

    def init_loop_parameters(self, config) -> None:
        """Create the optional per-loop parameters ``config`` asks for (absent: None)."""
        if getattr(config, "loop_embedding", False):
            self.loop_embedding = nn.Parameter(torch.zeros(config.n_loops, config.d_model))
        else:
            self.register_parameter("loop_embedding", None)
        rank = getattr(config, "exit_readout_rank", None)
        self.exit_readout = None if rank is None else ExitReadout(
            config.d_model, rank, config.norm_eps, normed_input=getattr(config, "loop_norm", False))

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[...]`` -> the rows they enter their first decoding pass as
        (``[..., D]``: the embeddings here; an architecture whose rows carry more than
        the state, as huginn's, makes them here)."""
        return self.embed(tokens)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the LM head reads of a state: the final norm's output (an architecture
        whose final norm already closed the loop reads the state as it is)."""
        return self.norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[..., D] -> [..., V]`` (also the shared readout of any loop)."""
        return linear(self.head_features(x), self.head_weight, self.kernel)

    def exit_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the early exit (the drafts): through the exit readout when the
        model has one, else the same as :meth:`head`."""
        if self.exit_readout is None:
            return self.head(x)
        return linear(self.exit_readout(x), self.head_weight, self.kernel)

    def head_and_exit(self, final: torch.Tensor, exit_rows: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` rows read by the shared head and ``[m, D]`` rows read at the exit,
        in one LM-head matmul: ``[n + m, V]``."""
        if not len(exit_rows):
            return self.head(final)
        if not len(final):
            return self.exit_head(exit_rows)
        if self.exit_readout is None:
            return self.head(torch.cat((final, exit_rows)))
        features = torch.cat((self.head_features(final), self.exit_readout(exit_rows)))
        return linear(features, self.head_weight, self.kernel)

    def end_of_loop(self, x: torch.Tensor) -> torch.Tensor:
        """The state leaving a pass over the unique layers (every loop, in training
        and in decoding alike): unchanged here; an architecture that normalises
        the state after every loop does it in this hook."""
        return x

    def set_kernel(self, name: str | None) -> None:
        """Make every product of the model use few-row kernel ``name`` (None: the
        process default); :func:`speedec.kernels.prepare_kernel` chooses it."""
        for module in self.modules():
            if isinstance(module, KernelModule):
                module.kernel = name

    def reset_norms(self) -> None:
        """Every :class:`RMSNorm` of the model starts as the identity (gain 1)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    def begin_loop(self, x: torch.Tensor, loops: torch.Tensor | int) -> torch.Tensor:
        """The state entering a loop: plus that loop's embedding when the model has one.
        ``loops``: the loop index (0-based) of the rows, an int or ``[G, 1, 1]``."""
        if self.loop_embedding is None:
            return x
        return x + self.loop_embedding[loops]

    @classmethod
    def random(cls, config, *, seed: int = 0, residual_scale: float = 1.0,
               std: float = 0.02):
        """A model with reproducible random weights (see :meth:`reset_parameters`)."""
        model = cls(config)
        model.reset_parameters(std=std, residual_scale=residual_scale,
                               generator=torch.Generator().manual_seed(seed))
        return model.eval()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations: the float weights' (float32 in a q8_0 model)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device
