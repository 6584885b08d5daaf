"""Publishing a converted folder to the Hugging Face Hub (``fmconvert push``).

``HfApi(endpoint=HF_ENDPOINT).create_repo(exist_ok=True)`` then a single ``upload_folder``
commit, so a failure never leaves a half-uploaded model. The token comes from ``token``,
``HF_TOKEN`` or the login cache (huggingface_hub's order) and is never printed. Before
anything is sent the folder is checked: it must be a folder written by ``fmconvert wrap``,
hold only the expected files (no pickles), and load with :func:`fmconvert.load`.
With ``report`` (a folder written by ``fmconvert report``) its tables and sample grid go
into the model card, the pictures under ``eval/``.

Visibility (``private``: True or False): a new repo is created with what was asked, and
with neither the Hub's own default applies (``create_repo(private=None)`` sends no
``visibility``: public, or private for an organisation whose new repos are private). An
existing repo's visibility is never changed: if it differs from what was asked
(``model_info().private``) the push is refused before anything is uploaded, naming the
command that changes it (``hf repos settings REPO --private``, huggingface_hub's
``update_repo_settings``). Why refuse rather than flip: a repo may hold other files,
revisions and discussions, and changing who can see all of it as a side effect of an
upload is surprising (``private=False`` on a private repo would publish everything in it);
the change is one explicit command away. The summary's ``private`` is the visibility the
Hub reports after the upload, not the flag.

The refusals that need neither the model nor the network (:func:`visibility`,
:func:`preflight`) import only ``huggingface_hub.constants`` and its repo-id validator,
so the command line makes them before diffusers or torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from fmconvert import __version__
from fmconvert.errors import FmconvertError, UsageError
from fmconvert.files.atomic import link_or_copy
from fmconvert.integration.hub import PICKLE_SUFFIXES

REQUIRED = ("model_index.json", "fmconvert.json", "README.md")


def check_converted_folder(folder: Path) -> list[str]:
    """The files to upload; raises FmconvertError if ``folder`` is not a converted model."""
    from fmconvert.integration.folder import load
    from fmconvert.integration.source import ADAPTER_SHIM

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"'{folder}' does not exist or is not a folder")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise FmconvertError(f"'{folder}' is not a folder written by fmconvert wrap (missing {', '.join(missing)}); "
                             "convert the model first (fmconvert wrap)")
    index = json.loads((folder / "model_index.json").read_text())
    adapters = [name for name, value in index.items() if isinstance(value, list) and value[0] == ADAPTER_SHIM]
    if not adapters:
        raise FmconvertError(f"'{folder}' has no fmconvert adapter in model_index.json; it is not a converted model")
    for name in adapters:
        weights = "network/config.json" if (folder / name / "network").is_dir() else "diffusion_pytorch_model.safetensors"
        for needed in ("config.json", weights, f"{ADAPTER_SHIM}.py"):
            if not (folder / name / needed).is_file():
                raise FmconvertError(f"'{folder}/{name}' lacks {needed}; write the folder again with fmconvert wrap")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise FmconvertError(f"'{folder}' contains pickle files ({pickles[0]}); only safetensors weights are published")
    hidden = [f for f in files if any(part.startswith(".") for part in Path(f).parts)]
    if hidden:
        raise FmconvertError(f"'{folder}' contains hidden files ({hidden[0]}); remove them before pushing")
    try:
        load(folder)
    except Exception as error:  # noqa: BLE001 - any failure to load is the same verdict
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FmconvertError(f"'{folder}' does not load ({first}); write it again with fmconvert wrap") from None
    return files


def _card_with_report(card: str, report: Path) -> str:
    """The model card plus the report's tables (pictures linked under eval/)."""
    text = (report / "report.md").read_text()
    body = text.split("\n", 1)[1] if text.startswith("# ") else text
    body = re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", r"![\1](eval/\2)", body)
    return card.rstrip() + "\n\n## Evaluation (fmconvert report)\n" + body


def _transport_errors() -> type[Exception]:
    try:
        import httpx

        return httpx.TransportError
    except ImportError:  # pragma: no cover - huggingface_hub 2 depends on httpx
        return OSError


def visibility(private: bool, public: bool) -> bool | None:
    """``private`` / ``public`` (the command line's two switches) as ``HfApi.create_repo``'s ``private``: True, False, or None
    (neither: the Hub's default for new repos); both together is a usage error."""
    if private and public:
        raise UsageError("private=True and public=True contradict each other: pass one of them, or neither "
                         "(the Hub's default for a new repo)")
    return True if private else False if public else None


def preflight(repo_id: str, folder: Path | None = None, report: Path | None = None) -> None:
    """The refusals that need neither the model nor the network, made before any heavy import
    or I/O: an invalid repo id (``huggingface_hub.utils.validate_repo_id``), a missing
    ``folder``, a ``report`` folder without report.md, and offline mode
    (``huggingface_hub.constants.is_offline_mode()``: HF_HUB_OFFLINE=1). Imports neither
    torch, diffusers nor httpx."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"'{repo_id}' is not a valid Hub repo id (owner/name)") from None
    if folder is not None and not Path(folder).is_dir():
        raise UsageError(f"'{folder}' does not exist or is not a folder")
    if report is not None and not (Path(report) / "report.md").is_file():
        raise UsageError(f"report={str(report)!r} has no report.md; make one with fmconvert report")
    if constants.is_offline_mode():
        raise FmconvertError("cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it to upload")


def _visibility_refusal(repo_id: str, private: bool, found: bool | None) -> str:
    asked = "private" if private else "public"
    if found is None:
        return (f"the Hub does not say whether '{repo_id}' is private, so a {asked} repo cannot be confirmed; "
                "nothing was uploaded")
    state = "private" if found else "public"
    return (f"'{repo_id}' is {state} on the Hub; asking for a {asked} repo sets the visibility of a new repo and "
            f"never changes an existing one, so nothing was uploaded: change it with hf repos settings {repo_id} "
            f"--{asked}, or push without asking for a visibility")


def push(folder: Path, repo_id: str, private: bool | None = None, revision: str | None = None, create_pr: bool = False,
         commit_message: str | None = None, token: str | None = None, report: Path | None = None) -> dict:
    """Check, then upload ``folder`` to ``repo_id`` in one commit. Returns a summary (JSON-ready).

    ``private``: True or False creates a missing repo private or public; None leaves it to the
    Hub (``HfApi.create_repo(private=None)`` sends no visibility, so an organisation's private
    default holds). With True or False, an existing repo of the other visibility
    (``HfApi.model_info().private``, read after ``create_repo(exist_ok=True)``) is refused
    with a UsageError before anything is uploaded; it is never changed. The summary's
    ``private`` is ``model_info().private`` read after the upload (None if the Hub does not
    say)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    preflight(repo_id, folder, report)
    folder = Path(folder)
    files = check_converted_folder(folder)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="fmconvert", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="fmconvert-push-") as staging:
        upload = folder
        if report is not None:
            report = Path(report)
            upload = Path(staging) / folder.name
            shutil.copytree(folder, upload, copy_function=link_or_copy)
            (upload / "README.md").unlink()
            (upload / "README.md").write_text(_card_with_report((folder / "README.md").read_text(), report))
            (upload / "eval").mkdir()
            for picture in sorted(report.glob("*.png")):
                shutil.copy2(picture, upload / "eval" / picture.name)
            files = sorted(str(p.relative_to(upload)) for p in upload.rglob("*") if p.is_file())
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if private is not None:
                found = api.model_info(repo_id).private
                if found is not private:
                    raise UsageError(_visibility_refusal(repo_id, private, found))
            if revision and revision != "main" and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(upload), repo_id=repo_id, repo_type="model", revision=revision, create_pr=create_pr,
                commit_message=commit_message or f"Upload {folder.name}, converted by fmconvert {__version__}",
            )
        except OfflineModeIsEnabled:
            raise FmconvertError("cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it to upload") from None
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                raise FmconvertError(f"the Hub refused the upload to '{repo_id}' (HTTP {status}): pass token=..., "
                                     "set HF_TOKEN, or log in with hf auth login, with write access") from None
            raise FmconvertError(f"the Hub answered HTTP {status} for '{repo_id}': {str(error).splitlines()[0]}") from None
        except (OSError, _transport_errors()) as error:  # connection refused, DNS, TLS...
            where = endpoint or constants.ENDPOINT
            raise FmconvertError(f"cannot reach the Hub at {where} ({type(error).__name__}); check the network "
                                 "or HF_ENDPOINT") from None
    try:  # the commit is made: a failed read-back is reported as unknown, not as a failed push
        visible = api.model_info(repo_id).private
    except (HfHubHTTPError, OSError, _transport_errors()):
        visible = None
    return {"repo_id": repo_id, "commit_url": info.commit_url, "commit_oid": info.oid, "pr_url": info.pr_url,
            "private": visible, "revision": revision or "main", "files": files}
