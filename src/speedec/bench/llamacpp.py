"""llama.cpp as a benchmark peer, through ``llama-cpp-python`` (optional).

The model is exported as a llama GGUF (:mod:`speedec.gguf_export`) once per
weight type and decoded greedily by llama.cpp on the same prompts (token ids,
no tokenizer involved) with the same number of threads. Without the
``llama_cpp`` module the rows are skipped with a note, never an error.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from ..model import LoopedLM

# Row name -> GGUF weight type, with "looped-" for llama.cpp's looped llama (the K
# unique blocks shared across L loops, speedec.gguf_export.LOOPED_ARCH) instead of
# the K * L unrolled blocks.
LLAMACPP_ROWS = {"llamacpp-f32": "f32", "llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0",
                 "llamacpp-looped-f32": "looped-f32", "llamacpp-looped-f16": "looped-f16",
                 "llamacpp-looped-q8_0": "looped-q8_0"}
SKIP_NOTE = ("llama_cpp (llama-cpp-python) is not installed: {rows} skipped "
             "(pip install 'speedec[llamacpp]')")


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# ggml's type ids (ggml.h: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1).
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class LlamaCppPeer:
    """One GGUF export of the model loaded in llama.cpp; :meth:`run` decodes greedily."""

    def __init__(self, model: LoopedLM, dtype: str, directory: str | Path, *, threads: int | None = None):
        import llama_cpp

        from ..gguf_export import export_gguf

        self.dtype = dtype
        looped = dtype.startswith("looped-")
        weights = dtype.removeprefix("looped-")
        self.path = export_gguf(model, Path(directory) / f"model-{dtype}.gguf", dtype=weights, looped=looped)
        # What llama.cpp holds of the model: the file's tensors (memory-mapped).
        self.file_bytes = self.path.stat().st_size
        threads = threads or torch.get_num_threads()
        # The KV cache in the weights' precision: llama.cpp's default f16 cache would make the
        # f32 row a different computation than ours (its logits then differ by ~1e-2, not ~1e-5).
        cache_type = {"f32": GGML_TYPE_F32}.get(weights, GGML_TYPE_F16)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=model.config.max_seq_len, n_threads=threads,
                                   n_threads_batch=threads, n_batch=model.config.max_seq_len, verbose=False,
                                   type_k=cache_type, type_v=cache_type)

    def run(self, prompt: list[int], n: int) -> tuple[list[int], float, None]:
        """Greedy tokens after ``prompt`` (exactly ``n``: end-of-text does not stop it), seconds."""
        start = time.perf_counter()
        tokens: list[int] = []
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens, time.perf_counter() - start, None


def load_llamacpp_peers(model: LoopedLM, dtypes: list[str]) -> dict[str, LlamaCppPeer]:
    """A peer per weight type; the GGUF files live in a temporary directory while the peers do."""
    directory = tempfile.TemporaryDirectory(prefix="speedec-gguf-")
    peers = {dtype: LlamaCppPeer(model, dtype, directory.name) for dtype in dict.fromkeys(dtypes)}
    for peer in peers.values():
        peer.directory = directory  # keep the files as long as a peer is alive
    return peers
