"""llama.cpp as a benchmark peer, through ``llama-cpp-python`` (optional).

The model is exported as a GGUF (:mod:`speedec.gguf_export`) once per weight
type into a temporary directory (deleted by :meth:`LlamaCppPeers.close`), and
decoded greedily by llama.cpp on the same prompts (token ids, no tokenizer
involved) with the same number of threads. llama.cpp runs in a process of its
own (:mod:`speedec.bench.llamacpp_worker`), so that its peak resident memory
is its own, not speedec's model's as well; the timing is taken there, around
the generation alone. A ``llama`` model is exported as a plain llama (K * L
blocks) unless the row says ``looped-``; a ``nanbeige`` model always as
llama.cpp's looped ``nanbeige`` architecture (the K blocks once, the loop
count, the final norm where the model puts it). Without the ``llama_cpp``
module the rows are skipped with a note, never an error.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import SpeedecError
from ..model import LoopedLM

# Row name -> GGUF weight type, with "looped-" for llama.cpp's looped llama (the K
# unique blocks shared across L loops, speedec.gguf_export.LOOPED_ARCH) instead of
# the K * L unrolled blocks (a nanbeige model is looped whatever the row says).
LLAMACPP_ROWS = {"llamacpp-f32": "f32", "llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0",
                 "llamacpp-looped-f32": "looped-f32", "llamacpp-looped-f16": "looped-f16",
                 "llamacpp-looped-q8_0": "looped-q8_0"}
SKIP_NOTE = ("llama_cpp (llama-cpp-python) is not installed: {rows} skipped "
             "(pip install 'speedec[llamacpp]')")
WORKER = Path(__file__).with_name("llamacpp_worker.py")
# Free disk the GGUF files need beyond their own size (the file system's own slack).
DISK_MARGIN_BYTES = 256 << 20


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# ggml's type ids (ggml.h: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1).
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


def check_disk(directory: str | Path, needed: int) -> None:
    """Raise a SpeedecError when ``directory``'s file system has less than ``needed``
    bytes free (and a margin), naming the directory and how to move it."""
    free = shutil.disk_usage(directory).free
    if free < needed + DISK_MARGIN_BYTES:
        raise SpeedecError(f"the llama.cpp rows need {needed / 1e9:.1f} GB of GGUF files but {directory} has "
                           f"{free / 1e9:.1f} GB free; point TMPDIR at a larger disk or drop those rows")


class LlamaCppPeer:
    """One GGUF export of the model, loaded by llama.cpp in a worker process;
    :meth:`run` decodes greedily there."""

    def __init__(self, model: LoopedLM, dtype: str, directory: str | Path, *, threads: int | None = None):
        from ..gguf_export import export_gguf, export_looped

        self.dtype = dtype
        weights = dtype.removeprefix("looped-")
        looped = True if dtype.startswith("looped-") else export_looped(model)
        self.path = export_gguf(model, Path(directory) / f"model-{dtype}.gguf", dtype=weights, looped=looped)
        # What llama.cpp holds of the model: the file's tensors (memory-mapped).
        self.file_bytes = self.path.stat().st_size
        # The worker's peak resident memory (its own process: llama.cpp alone).
        self.peak_rss_bytes: int | None = None
        threads = threads or torch.get_num_threads()
        # The KV cache in the weights' precision: llama.cpp's default f16 cache would make the
        # f32 row a different computation than ours (its logits then differ by ~1e-2, not ~1e-5).
        cache_type = {"f32": GGML_TYPE_F32}.get(weights, GGML_TYPE_F16)
        arguments = dict(model_path=str(self.path), n_ctx=model.config.max_seq_len, n_threads=threads,
                         n_threads_batch=threads, n_batch=model.config.max_seq_len, verbose=False,
                         type_k=cache_type, type_v=cache_type)
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        ready = self._call(arguments)
        if not ready.get("ready"):
            self.close()
            raise SpeedecError(f"llama.cpp could not load {self.path.name}: {ready.get('error')}")

    def _call(self, message: dict) -> dict:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            raise SpeedecError(f"the llama.cpp worker for {self.path.name} ended (exit code "
                               f"{self._process.returncode}): {' / '.join(tail) or 'no message'}")
        return json.loads(line)

    def run(self, prompt: list[int], n: int) -> tuple[list[int], float, None]:
        """Greedy tokens after ``prompt`` (exactly ``n``: end-of-text does not stop it), seconds."""
        reply = self._call({"prompt": list(prompt), "n": n})
        self.peak_rss_bytes = max(self.peak_rss_bytes or 0, reply["peak_rss_bytes"])
        return reply["tokens"], reply["seconds"], None

    def close(self) -> None:
        """End the worker (it unmaps the file)."""
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdout, self._stderr):
            stream.close()


class LlamaCppPeers(dict):
    """Weight type -> :class:`LlamaCppPeer`, and the temporary directory of their GGUF
    files; :meth:`close` ends the workers and deletes the files (also as a context manager)."""

    def __init__(self, directory: tempfile.TemporaryDirectory) -> None:
        super().__init__()
        self.directory = directory

    def close(self) -> None:
        for peer in self.values():
            peer.close()
        self.directory.cleanup()

    def __enter__(self) -> LlamaCppPeers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_llamacpp_peers(model: LoopedLM, dtypes: list[str], *, threads: int | None = None) -> LlamaCppPeers:
    """A peer per weight type, its GGUF in a temporary directory (``TMPDIR``) whose disk is
    checked first; call :meth:`LlamaCppPeers.close` to delete the files."""
    from ..gguf_export import export_looped, gguf_file_bytes

    dtypes = list(dict.fromkeys(dtypes))
    peers = LlamaCppPeers(tempfile.TemporaryDirectory(prefix="speedec-gguf-"))
    try:
        needed = sum(gguf_file_bytes(model, d.removeprefix("looped-"),
                                     True if d.startswith("looped-") else export_looped(model)) for d in dtypes)
        check_disk(peers.directory.name, needed)
        for dtype in dtypes:
            peers[dtype] = LlamaCppPeer(model, dtype, peers.directory.name, threads=threads)
    except BaseException:
        peers.close()
        raise
    return peers
