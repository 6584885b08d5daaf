"""``fmconvert push``: publish a converted folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fmconvert.cli.options import AsJson, Private, Public
from fmconvert.cli.output import emit_json, handle_errors, interactive, log


@handle_errors
def push(
    folder: Path = typer.Argument(..., help="A folder written by fmconvert wrap."),
    repo_id: str = typer.Argument(..., help="owner/name on the Hub (HF_ENDPOINT picks the Hub)."),
    private: Private = False,
    public: Public = False,
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to the branch."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message"),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the login cache); never printed."),
    report: Optional[Path] = typer.Option(None, "--report", help="A folder from fmconvert report: its tables and grids go into the model card."),
    as_json: AsJson = False,
):
    """Publish a converted folder to the Hugging Face Hub in one commit.

    Refused before diffusers or torch is imported: --private with --public, an invalid repo
    id, a missing FOLDER or --report, offline mode (HF_HUB_OFFLINE=1). --private/--public set
    a new repo's visibility (HfApi.create_repo); an existing repo of the other visibility is
    refused before any upload, never changed (hf repos settings REPO --private changes it).
    --json's "private" is the visibility the Hub reports after the upload (HfApi.model_info)."""
    from fmconvert.integration.push import preflight, visibility
    from fmconvert.integration.push import push as push_folder

    asked = visibility(private, public)
    preflight(repo_id, folder, report)
    interactive(as_json)
    summary = push_folder(folder, repo_id, asked, revision, create_pr, commit_message, token, report)
    if as_json:
        emit_json(summary)
    else:
        seen = {True: "private", False: "public"}.get(summary["private"], "visibility unknown")
        log(f"pushed {len(summary['files'])} files to {repo_id} ({seen}): {summary['pr_url'] or summary['commit_url']}")
