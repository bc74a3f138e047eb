"""Where a model comes from: the default model shipped inside the package, a
directory, or a Hugging Face Hub id (``owner/name``, optionally ``@revision``),
found in the local Hugging Face cache or downloaded into it.

:func:`resolve_model_dir` is the one place that turns what a user gives as
``--model`` into a model directory; every problem is a one-line
:class:`~speedec.errors.ModelLoadError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError

# What a download fetches: the config, the weights, the tokenizer and chat files
# at the repository's top level; never code (*.py) nor other folders' files.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja"]
HUB_SKIPPED = ["*/*"]
# owner/name[@revision]: one slash, no leading "." "/" "~" (those are paths).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}


def bundled_model_dir() -> Path | None:
    """The model shipped inside the package, if this install has one."""
    return _asset("default-model")


def bundled_translator_dir() -> Path | None:
    """The translator (Spanish -> English) shipped inside the package, if this install has one."""
    return _asset("default-translator")


def _asset(name: str) -> Path | None:
    path = Path(__file__).parent / "assets" / name
    return path if (path / "config.json").is_file() else None


def resolve_translator_dir(model: str | Path | None) -> Path:
    """:func:`resolve_model_dir` for translators: None is the bundled translator."""
    if model is None:
        bundled = bundled_translator_dir()
        if bundled is None:
            raise ModelLoadError("no --model given and this install has no bundled translator")
        return bundled
    return resolve_model_dir(model)


def resolve_model_dir(model: str | Path | None) -> Path:
    """The directory of ``model``: None, the bundled model; an existing directory, itself;
    a Hugging Face Hub id (``owner/name`` or ``owner/name@revision``) that is not a
    directory, its snapshot in the local Hugging Face cache, downloaded first when it is
    not there (not when ``HF_HUB_OFFLINE`` is set). Anything else comes back as a path,
    for the loader to say it does not exist."""
    if model is None:
        bundled = bundled_model_dir()
        if bundled is None:
            raise ModelLoadError("no --model given and this install has no bundled model")
        return bundled
    path = Path(model)
    if isinstance(model, Path) or path.exists():
        return path
    reference = hub_reference(model)
    if reference is None:
        return path
    return hub_snapshot(*reference)


def hub_reference(model: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``model`` reads as a Hugging Face Hub id, else None."""
    match = _HUB_ID.fullmatch(model)
    if match is None or ".." in model or "--" in match["repo"] or match["repo"].endswith((".", "-")):
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``)
    as the environment says now, or as huggingface_hub read it when imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a Hub model (config, weights, tokenizer and chat files): the
    cached one when it has a config.json, else downloaded with the hub's progress bars.
    Offline (``HF_HUB_OFFLINE``, or the Hub out of reach) a miss is a ModelLoadError."""
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ModelLoadError(f"{name} is not a directory, and huggingface_hub (which downloads "
                             f"models from the Hugging Face Hub) is not installed") from None
    errors = _hub_errors()
    request = {"repo_id": repo_id, "revision": revision, "allow_patterns": HUB_FILES,
               "ignore_patterns": HUB_SKIPPED}
    cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
    try:
        folder = Path(snapshot_download(**request, local_files_only=True))
    except (OSError, ValueError):  # not cached, partly cached, or an id the hub refuses
        folder = None
    if folder is not None and (folder / "config.json").is_file():
        return folder
    if hub_offline():
        raise ModelLoadError(f"{name} is not a directory nor in the Hugging Face cache ({cache}), and "
                             f"HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it")
    try:
        folder = Path(snapshot_download(**request))
    except errors["GatedRepoError"]:
        raise ModelLoadError(f"{name} on the Hugging Face Hub is gated: accept its terms on the Hub and "
                             f"log in (hf auth login, or set HF_TOKEN)") from None
    except errors["RepositoryNotFoundError"]:
        raise ModelLoadError(f"{name} is not a directory nor a model on the Hugging Face Hub (or it is "
                             f"private: log in with hf auth login, or set HF_TOKEN)") from None
    except errors["RevisionNotFoundError"]:
        raise ModelLoadError(f"{repo_id} on the Hugging Face Hub has no revision {revision!r}") from None
    except errors["LocalEntryNotFoundError"]:  # the Hub out of reach, and nothing cached
        raise ModelLoadError(f"cannot reach the Hugging Face Hub to download {name}, which is not in the "
                             f"cache ({cache}); check the network, or set HF_HUB_OFFLINE=1 and give a "
                             f"cached model or a directory") from None
    except (errors["HfHubHTTPError"], OSError, ValueError) as exc:
        raise ModelLoadError(f"downloading {name} from the Hugging Face Hub failed: {_first_line(exc)}") from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{name} on the Hugging Face Hub has no config.json at its top level "
                             f"(not a model speedec loads)")
    return folder


def _hub_errors() -> dict[str, type[BaseException]]:
    """huggingface_hub's exception classes by name (``errors`` in recent releases,
    ``utils`` in older ones); a missing one matches nothing."""
    import huggingface_hub.utils as utils

    try:
        import huggingface_hub.errors as module
    except ImportError:
        module = utils
    names = ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError", "LocalEntryNotFoundError",
             "HfHubHTTPError")
    return {name: getattr(module, name, None) or getattr(utils, name, None) or _Never for name in names}


class _Never(Exception):
    """Raised by nothing: stands for an exception class this huggingface_hub lacks."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
