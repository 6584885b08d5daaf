"""Where a SOURCE lives: a local folder, a Hub id (cached or downloaded), or builtin:NAME.

Resolution order, so a mistyped local path is never blamed on the network:
1. ``builtin:NAME``: a model shipped inside the package (:mod:`fmconvert.zoo`);
2. an existing folder;
3. anything that looks like a path ("./", "../", "/", "~", a trailing "/", or more than
   one "/") and does not exist: "local path not found";
4. a valid Hub id: ``snapshot_download`` (with ``HF_HUB_OFFLINE=1`` only the cache).

Pickle weights (.bin, .ckpt, .pt, .pth) are not downloaded unless ``allow_pickle``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fmconvert.errors import FmconvertError, UsageError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUILTIN_PREFIX = "builtin:"


def looks_like_path(reference: str) -> bool:
    return (
        reference.startswith(("./", "../", "/", "~", ".\\"))
        or reference.endswith(("/", os.sep))
        or reference.count("/") > 1
        or reference in (".", "..")
    )


def resolve(reference: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder holding ``reference``; raises UsageError / FmconvertError with a fix."""
    if reference.startswith(BUILTIN_PREFIX):
        from fmconvert.zoo import builtin_path

        return builtin_path(reference[len(BUILTIN_PREFIX):], kind="model")
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"'{reference}' is a file; expected a diffusers folder (with model_index.json or config.json)")
    if looks_like_path(reference):
        raise UsageError(f"local path '{reference}' does not exist; check the path (no Hub lookup was made)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(reference)
    except HFValidationError:
        raise UsageError(
            f"'{reference}' is neither an existing folder nor a valid Hub id (owner/name); check the spelling"
        ) from None
    return _download(reference, revision, allow_pickle)


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ignore = None if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + ["*.msgpack", "*.h5", "*.onnx*"]
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore, local_files_only=offline))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        if offline or isinstance(error, OfflineModeIsEnabled):
            raise FmconvertError(
                f"Hub model '{where}' is not in the local cache and HF_HUB_OFFLINE=1; download it once with "
                f"network access (hf download {repo_id}) or pass a local folder"
            ) from None
        raise FmconvertError(f"could not reach the Hub for '{where}' and it is not cached; check the network") from None
    except GatedRepoError:
        raise FmconvertError(f"'{repo_id}' is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise FmconvertError(f"revision={revision!r} not found in '{repo_id}'; check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise FmconvertError(
            f"Hub repository '{repo_id}' not found (or private without a token); check the id or log in"
        ) from None
