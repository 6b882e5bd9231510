"""Publish SAEs to the Hugging Face hub and fetch them, with huggingface_hub.

`push` uploads a run's SAE folder, training log, plots and a model card as ONE commit, so a failed
upload publishes nothing. The token comes from HF_TOKEN or huggingface_hub's own login and is
never printed: errors name the repo, the endpoint and what went wrong, and the token is scrubbed
from any text huggingface_hub returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitscope.saes.model_card import model_card, run_metrics
from vitscope.support.extras import require
from vitscope.train.sae_folder import CARD_FILE, WEIGHTS_FILE, load_sae_folder

PUSHED_FILES = (CARD_FILE, WEIGHTS_FILE, "log.jsonl")
"""Besides these, every PNG at the top of the run folder is pushed (report.png, ...)."""


class HubError(Exception):
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
    with _one_line_errors(f"push to {repo_id}", api.endpoint, token):
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, commit_message=f"vitscope push of {run_dir.name}"
        )
    return info.commit_url


def fetch(
    ref: str,
    revision: str | None = None,
    endpoint: str | None = None,
    local_dir: Path | None = None,
) -> Path:
    """The local path of `owner/name[/path]`: a snapshot of the repo (or of one subfolder), or
    one file when the path names a file such as CLIP-Scope's `22_resid/1200013184.pt`. Files go
    to huggingface_hub's cache, or to `local_dir`."""
    require("huggingface_hub", "hub", f"fetching {ref} from the hub")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.constants import ENDPOINT

    owner, name, *inside = ref.split("/")
    repo_id, path = f"{owner}/{name}", "/".join(inside)
    with _one_line_errors(f"hub id {ref}", endpoint or ENDPOINT, None):
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
        first_line = (str(err).strip().splitlines() or [""])[0]
        reason = f"{type(err).__name__} from {endpoint}: {first_line}"
    else:
        return
    if token:
        reason = reason.replace(token, "***")
    raise HubError(f"{what}: {reason}")
