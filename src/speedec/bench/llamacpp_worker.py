"""llama.cpp in a process of its own, for the benchmark's llama.cpp rows.

Run as a script (``python llamacpp_worker.py``, never imported by speedec, so
that the process holds llama.cpp and not torch or speedec's model): its first
line of input is a JSON object of ``llama_cpp.Llama`` arguments; it answers
``{"ready": true}`` once the model is loaded (or ``{"error": ...}``), then
reads one request a line, ``{"prompt": [ids], "n": count}``, and answers
``{"tokens": [...], "seconds": s, "peak_rss_bytes": b}``: ``n`` greedy tokens
after the prompt (end-of-text does not stop it), the seconds they took, and
the process's peak resident memory so far (``VmHWM``: the model's pages it
touched, its KV cache and buffers). It ends at the end of its input.
"""

import os
import sys

# The script's own directory (speedec/bench, with its memory.py, setup.py, ...) must not
# shadow anything llama_cpp imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import json  # noqa: E402
import time  # noqa: E402


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def answer(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main():
    arguments = json.loads(sys.stdin.readline())
    try:
        import llama_cpp

        llm = llama_cpp.Llama(**arguments)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        answer({"error": f"{type(exc).__name__}: {exc}"})
        return
    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        n = request["n"]
        start = time.perf_counter()
        tokens = []
        for token in llm.generate(request["prompt"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == n:
                break
        seconds = time.perf_counter() - start
        answer({"tokens": tokens, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()})


if __name__ == "__main__":
    main()
