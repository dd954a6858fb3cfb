"""Hugging Face ids as users write them, resolved through huggingface_hub: its cache, HF_TOKEN, HF_HUB_OFFLINE,
HF_ENDPOINT and revisions are the hub library's own.

`org/name` names a model repository: a Hugging Face checkpoint (config.json and safetensors) or, when the repository
holds GGUF files and no checkpoint, one of them: `org/name:Q4_K_M` picks the file whose name carries that tag,
`org/name:file.gguf` a file by name, and `org/name` alone the repository's only GGUF or its Q4_K_M. `@revision`
(a branch, tag or commit) may end any of them. Only what the converter reads is fetched.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeLLMError

# A repository id as the hub spells it, an optional :tag (a quantization or a GGUF file name), an optional @revision
HUB_ID = re.compile(r"^(?:hf\.co/|huggingface\.co/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<tag>[\w.+-]+))?"
                    r"(?:@(?P<revision>[\w./-]+))?$")

# What the converter reads from a checkpoint repository: weights, configs, tokenizer and chat template files
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt"]
DEFAULT_GGUF_TAG = "Q4_K_M"  # what ollama and llama.cpp's -hf pick when a GGUF repository is named alone


@dataclass(frozen=True)
class HubId:
    repo: str
    tag: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.tag}" if self.tag else "") + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubId | None:
    """The id in `text`, or None when it cannot be one."""
    m = HUB_ID.match(text)
    if m is None or text.startswith(("./", "../", "/", "~")):
        return None
    return HubId(m["repo"], m["tag"], m["revision"])


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # (submodules the package loads lazily)
        import huggingface_hub.errors  # noqa: F401
    except ImportError as e:  # pragma: no cover - an install problem
        raise EdgeLLMError("Hugging Face ids need the huggingface_hub package: pip install huggingface_hub") from e
    return huggingface_hub


def _offline() -> bool:
    return bool(_hub().constants.HF_HUB_OFFLINE)


def repo_files(hub_id: HubId) -> tuple[list[str], bool]:
    """The repository's file names, and whether they came from the hub (False: from the local cache only, when
    offline or the hub is unreachable)."""
    hub = _hub()
    errors = hub.errors
    if not _offline() and reachable(hub.constants.ENDPOINT):
        try:
            return hub.HfApi().list_repo_files(hub_id.repo, revision=hub_id.revision), True
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
            raise EdgeLLMError(f"{hub_id}: {_first_line(e)}") from None
        except Exception:  # the hub cannot be reached: what the cache holds may do
            pass
    try:
        folder = Path(hub.snapshot_download(hub_id.repo, revision=hub_id.revision, local_files_only=True))
    except errors.IncompleteSnapshotError as e:  # a GGUF repository of which one file was fetched: that one will do
        folder = Path(e.snapshot_path)
    except Exception:
        where = hub.constants.HF_HUB_CACHE
        reason = ("HF_HUB_OFFLINE is set" if _offline() else
                  f"the hub ({hub.constants.ENDPOINT}) could not be reached")
        raise EdgeLLMError(f"{hub_id} is not in the Hugging Face cache ({where}) and {reason}; download it where "
                           f"there is a network (`hf download {hub_id.repo}`), or give a local folder or .gguf "
                           "file") from None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()), False


def reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all: a machine without a network finds out at once, not after the hub
    client's retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def pick_gguf(hub_id: HubId, files: list[str]) -> str:
    """The GGUF file of the repository that `hub_id` names (its tag, or the default)."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if hub_id.tag and hub_id.tag.lower().endswith(".gguf"):
        found = [f for f in ggufs if f == hub_id.tag or f.rsplit("/", 1)[-1] == hub_id.tag]
    else:
        tag = (hub_id.tag or DEFAULT_GGUF_TAG).lower()
        found = [f for f in ggufs if re.search(rf"(^|[^a-z0-9]){re.escape(tag)}([^a-z0-9]|$)",
                                               f.rsplit("/", 1)[-1].lower())]
        if not found and hub_id.tag is None and len(ggufs) == 1:
            found = ggufs
    found = [f for f in found if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f) or "-00001-of-" in f]
    if len(found) != 1:
        listed = ", ".join(f.rsplit("/", 1)[-1] for f in ggufs[:12]) or "none"
        what = "several" if found else "no"
        raise EdgeLLMError(f"{hub_id}: {what} GGUF file(s) match; name one as {hub_id.repo}:FILE.gguf or "
                           f"{hub_id.repo}:QUANT (the repository's GGUF files: {listed})")
    if re.search(r"-00001-of-\d{5}\.gguf$", found[0]):
        raise EdgeLLMError(f"{hub_id}: {found[0]} is split into several files, which edgellm does not read; join them "
                           "with llama.cpp's gguf-split --merge and give the joined file")
    return found[0]


def fetch(hub_id: HubId) -> Path:
    """A local checkpoint folder or GGUF file for `hub_id`, from the hub cache (fetched into it when missing)."""
    hub = _hub()
    files, online = repo_files(hub_id)
    local_only = not online
    checkpoint = "config.json" in files and any(f.endswith(".safetensors") for f in files)
    try:
        if checkpoint:
            wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in CHECKPOINT_FILES)]
            folder = hub.snapshot_download(hub_id.repo, revision=hub_id.revision, allow_patterns=wanted,
                                           local_files_only=local_only)
            return Path(folder)
        if any(f.lower().endswith(".gguf") for f in files):
            return Path(hub.hf_hub_download(hub_id.repo, pick_gguf(hub_id, files), revision=hub_id.revision,
                                            local_files_only=local_only))
    except EdgeLLMError:
        raise
    except Exception as e:
        raise EdgeLLMError(f"{hub_id}: could not fetch it ({_first_line(e)})") from None
    raise EdgeLLMError(f"{hub_id}: the repository holds neither a Hugging Face checkpoint (config.json and "
                       ".safetensors files) nor GGUF files" + ("" if online else " in the local cache"))
