"""Publish SAEs to the Hugging Face hub and fetch them, with huggingface_hub.

`push` uploads a run's SAE folder, training log, plots and a model card as ONE commit, so a failed
upload publishes nothing, and deletes the repo again if this push created it, so a failed first
push leaves no empty repo either. The token comes from HF_TOKEN or huggingface_hub's own login
and is never printed: errors name the repo, the endpoint and what went wrong, and the token is
scrubbed from any text huggingface_hub returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vitscope.saes.folder import CARD_FILE, WEIGHTS_FILE, load_sae_folder
from vitscope.saes.model_card import model_card, run_metrics
from vitscope.support.errors import Unreachable
from vitscope.support.extras import require
from vitscope.support.outputs import holding
from vitscope.support.run_log import LOG_FILE

if TYPE_CHECKING:
    from huggingface_hub import HfApi

PULLED_FOLDER = holding("a folder pulled into before", ".cache/huggingface")
"""huggingface_hub's metadata in a `local_dir` it downloaded into: `vitscope pull --out` may
update such a folder."""

PUSHED_FILES = (CARD_FILE, WEIGHTS_FILE, LOG_FILE)
"""Besides these, every PNG at the top of the run folder is pushed (report.png, ...)."""


class HubError(Unreachable):
    """The hub could not be reached or refused a request: one line, never the token."""


def push(run_dir: Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload the SAE in `run_dir` to `repo_id` in one commit; returns the commit's URL."""
    require("huggingface_hub", "hub", "vitscope push")
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    sae = load_sae_folder(run_dir)
    token = get_token()
    if not token:
        raise HubError(
            f"push to {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
        )
    files = [run_dir / name for name in PUSHED_FILES if (run_dir / name).is_file()]
    files += sorted(run_dir.glob("*.png"))
    card = model_card(sae.card, run_metrics(run_dir), repo_id)
    operations = [CommitOperationAdd("README.md", card.encode())]
    operations += [CommitOperationAdd(path.name, str(path)) for path in files]
    api = HfApi(endpoint=endpoint, token=token)
    created = False
    try:
        with _one_line_errors(f"push to {repo_id}", api.endpoint, token):
            created = _create_repo(api, repo_id, private)
            info = api.create_commit(
                repo_id, operations, commit_message=f"vitscope push of {run_dir.name}"
            )
    except BaseException as err:  # a repo this push created goes again, so nothing is left
        if created and not _delete_repo(api, repo_id) and isinstance(err, HubError):
            raise HubError(
                f"{str(err).rstrip('.')}; the repo it created is left behind, empty"
            ) from None
        raise
    return info.commit_url


def _create_repo(api: HfApi, repo_id: str, private: bool) -> bool:
    """Create `repo_id`; True if this call made it, so that a failed push may delete it again."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private)
    except HfHubHTTPError as err:
        status = err.response.status_code
        if status == 409:  # it exists
            return False
        if status in (401, 402, 403):  # a token that may write to the repo but not create repos
            try:
                api.repo_info(repo_id)
            except HfHubHTTPError:
                raise err from None
            return False
        raise
    return True


def _delete_repo(api: HfApi, repo_id: str) -> bool:
    """Delete `repo_id` after a failed first push; False if that failed too (no network, or a
    token without the right to delete)."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception:
        return False
    return True


def fetch(
    ref: str,
    revision: str | None = None,
    endpoint: str | None = None,
    local_dir: Path | None = None,
) -> Path:
    """The local path of `owner/name[/path]`: a snapshot of the repo (or of one subfolder), or
    one file when the path names a file such as CLIP-Scope's `22_resid/1200013184.pt`. Files go
    to huggingface_hub's cache, or to `local_dir` (only from a hub it reaches: huggingface_hub
    would otherwise return whatever the folder already holds)."""
    require("huggingface_hub", "hub", f"fetching {ref} from the hub")
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.constants import ENDPOINT

    owner, name, *inside = ref.split("/")
    repo_id, path = f"{owner}/{name}", "/".join(inside)
    with _one_line_errors(f"hub id {ref}", endpoint or ENDPOINT, None):
        if local_dir is not None:
            HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision)
        if path.endswith(".pt"):
            return Path(
                hf_hub_download(
                    repo_id, path, revision=revision, endpoint=endpoint, local_dir=local_dir
                )
            )
        patterns = [f"{path}/*"] if path else None
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            endpoint=endpoint,
            local_dir=local_dir,
        )
    return Path(root) / path


@contextmanager
def _one_line_errors(what: str, endpoint: str, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into a HubError without the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError:
        reason = f"no such repo at {endpoint} (or it is private: `hf auth login`)"
    except RevisionNotFoundError:
        reason = f"no such revision at {endpoint}"
    except LocalEntryNotFoundError:
        reason = (
            f"cannot reach the hub at {endpoint} and it is not in the local hub cache; "
            "connect to the network, or pass a local SAE folder"
        )
    except Exception as err:
        reason = f"{type(err).__name__} from {endpoint}: {_first_line(err)}"
        if type(err).__name__ in ("ConnectError", "ConnectTimeout"):  # httpx's: nothing answered
            reason = f"cannot reach the hub at {endpoint} ({_first_line(err)}); connect to it"
        if isinstance(err.__cause__, HfHubHTTPError):  # "Error while uploading 'x'" says no more
            reason += f" ({_first_line(err.__cause__)})"
    else:
        return
    if token:
        reason = reason.replace(token, "***")
    raise HubError(f"{what}: {reason}")


def _first_line(err: BaseException) -> str:
    """An error's first line, with URLs cut at their query: signed storage URLs carry
    signatures that a log has no use for."""
    first_line = (str(err).strip().splitlines() or [""])[0]
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1", first_line)
