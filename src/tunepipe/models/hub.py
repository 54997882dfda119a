"""The Hugging Face Hub: repos by id, through huggingface_hub's own cache and settings.

Everything that reaches a hub goes through huggingface_hub (models, adapters) or datasets
(hub datasets), so their environment applies unchanged: `HF_ENDPOINT` (a mirror),
`HF_HOME` / `HF_HUB_CACHE` (where downloads go), `HF_TOKEN` or the saved `hf auth login`
(credentials), `HF_HUB_OFFLINE=1` (the cache alone). What is written here is glue: which
files of a model repo to fetch (safetensors only), the resolved commit a stage records,
and one-line errors that name the repo, the revision and what to do, in place of
huggingface_hub's multi-line HTTP errors. A token never appears in a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
# The files a model or adapter needs, and nothing else: weights as safetensors, configs,
# tokenizer files, the chat template, and a repo's own modeling code (fetched, never run
# unless trust_remote_code is set). Pickle weights (.bin / .pt / .pth / .ckpt) are never
# fetched: loading them runs arbitrary code.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
# Copies of the weights in other layouts that some repos ship beside the HF ones.
SKIPPED_FILES = ["original/*", "consolidated*", "*.gguf", "onnx/*", "openvino/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# huggingface_hub retries a dropped download in place from where it stopped; what still fails
# is downloaded again by the next run, and every file that completed stays in the cache.
RERUN_HINT = "run the same command again: the files already downloaded are kept in the cache"
LOGIN_HINT = ("log in with `hf auth login`, or set HF_TOKEN (or hf_hub_token in the config); "
              "for a gated repo, accept its terms on the repo's page first")


@dataclass(frozen=True)
class HubRepo:
    """A repo on the hub, as a stage asks for it."""

    repo_id: str
    repo_type: str = "model"  # "model" or "dataset"
    revision: str = DEFAULT_REVISION
    cache_dir: str | None = None
    token: str | None = None  # None: huggingface_hub's own (HF_TOKEN, saved login)

    @property
    def label(self) -> str:
        """`model repo Qwen/Qwen3-4B (revision main)`: how every message names it."""
        return f"{self.repo_type} repo {self.repo_id!r} (revision {self.revision!r})"


def quiet_http_logs() -> None:
    """huggingface_hub's HTTP client logs every request at INFO, which the CLI shows: keep to warnings."""
    for name in ("httpx2", "httpx"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def is_repo_id(name: str) -> bool:
    """`org/name` as the Hub spells repo ids (huggingface_hub's own rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def refuse_other_hubs() -> None:
    """LLaMA-Factory's switches to ModelScope / Modelers: not supported, and said so."""
    for switch, hub in (("USE_MODELSCOPE_HUB", "ModelScope"), ("USE_OPENMIND_HUB", "Modelers")):
        if os.environ.get(switch, "0").lower() in ("1", "true", "yes"):
            raise TunepipeError(
                f"{switch} is set: tunepipe reads models and datasets from the Hugging Face Hub (or a mirror of it "
                f"via HF_ENDPOINT) only; {hub} is not supported (it could not be tested against a real server)",
                hint=f"unset {switch}, or download the repo with {hub}'s own client and point the config at that dir")


# ---------------------------------------------------------------------------- models and adapters


def download_snapshot(repo: HubRepo) -> Path:
    """The repo's model files at `repo.revision`, in huggingface_hub's cache (downloaded when missing;
    a dropped connection is retried from where it stopped). Offline, the cached snapshot for that revision."""
    from huggingface_hub import snapshot_download

    refuse_other_hubs()
    quiet_http_logs()
    with hub_errors(repo):
        path = snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                 cache_dir=repo.cache_dir, token=repo.token, allow_patterns=MODEL_FILES,
                                 ignore_patterns=SKIPPED_FILES)
    return Path(path)


def fetch_model(repo: HubRepo, needed: str = "config.json") -> tuple[Path, str]:
    """Download (or find cached) a model or adapter repo; (snapshot dir, resolved commit sha).

    The sha is the snapshot dir's name: huggingface_hub's cache keeps each commit's files in
    `snapshots/<sha>/`, which is what makes a branch name resolve to one commit here."""
    path = download_snapshot(repo)
    require_files(repo, path, needed)
    log.info("%s: commit %s, in %s", repo.label, path.name, path)
    return path, path.name


def cached_snapshot(repo: HubRepo, commit: str) -> Path:
    """The snapshot of `commit` (a recorded sha): from the cache without a request when it is
    there, else downloaded again (a cleared cache, another machine)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    pinned = HubRepo(repo.repo_id, repo.repo_type, commit, repo.cache_dir, repo.token)
    try:
        return Path(snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=commit,
                                      cache_dir=repo.cache_dir, local_files_only=True,
                                      allow_patterns=MODEL_FILES, ignore_patterns=SKIPPED_FILES))
    except LocalEntryNotFoundError:
        log.info("%s is not in the cache: downloading it", pinned.label)
    return download_snapshot(pinned)


def require_files(repo: HubRepo, path: Path, needed: str) -> None:
    """A downloaded snapshot must hold `needed` (config.json, adapter_config.json) and safetensors
    weights; a repo with only pickle weights is refused by name."""
    if not (path / needed).is_file():
        raise TunepipeError(f"{repo.label}: has no {needed}",
                            hint="model_name_or_path needs a transformers model repo, adapter_name_or_path "
                                 "a PEFT adapter repo")
    if any(path.rglob("*.safetensors")):
        return
    pickles = [name for name in repo_files(repo, path.name) if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise TunepipeError(f"{repo.label}: has only pickle weights ({', '.join(pickles[:3])}), no .safetensors",
                            hint="tunepipe loads safetensors only (pickle files can run code); convert the "
                                 "weights with transformers' save_pretrained(safe_serialization=True) or pick a "
                                 "repo (or revision) that ships safetensors")
    raise TunepipeError(f"{repo.label}: holds no .safetensors weights")


def repo_files(repo: HubRepo, commit: str) -> list[str]:
    """Every file name of the repo at `commit` (for an error message; [] offline)."""
    from huggingface_hub import HfApi

    if offline():
        return []
    with hub_errors(repo):
        return HfApi().list_repo_files(repo.repo_id, repo_type=repo.repo_type, revision=commit, token=repo.token)


# ---------------------------------------------------------------------------- datasets


def resolve_commit(repo: HubRepo) -> str:
    """The commit sha `repo.revision` (branch, tag or sha) names now."""
    from huggingface_hub import HfApi

    refuse_other_hubs()
    quiet_http_logs()
    if offline():
        raise TunepipeError(f"{repo.label}: HF_HUB_OFFLINE is set, and a hub dataset is streamed from the hub "
                            f"({endpoint()}), never cached",
                            hint="unset HF_HUB_OFFLINE for the validate step (its output, data/validated/, is then "
                                 "cached by DVC), or download the files and give the entry a file_name")
    with hub_errors(repo):
        return HfApi().repo_info(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                 token=repo.token).sha


# ---------------------------------------------------------------------------- errors


@contextlib.contextmanager
def hub_errors(repo: HubRepo) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line TunepipeErrors naming the repo and the way out."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise TunepipeError(f"{repo.label} is gated: {_token_state(repo)}", hint=LOGIN_HINT) from None
    except errors.RevisionNotFoundError:
        raise _no_revision(repo) from None
    except errors.RepositoryNotFoundError:
        raise _not_found(repo) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        raise _not_cached(repo, exc) from None
    except errors.RemoteEntryNotFoundError as exc:
        raise TunepipeError(f"{repo.label}: a file is missing from the repo ({_short(exc)})") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise TunepipeError(f"{repo.label}: {endpoint()} answered HTTP {status}", hint=RERUN_HINT) from None
    except _transport_errors() as exc:
        raise _connection_lost(repo, exc) from None


def _not_found(repo: HubRepo) -> TunepipeError:
    # Some mirrors (olah serving local repos) answer an unknown revision of a known repo as an
    # unknown repo; asking for the default branch tells the two apart.
    if repo.revision != DEFAULT_REVISION and _exists(repo):
        return _no_revision(repo)
    return TunepipeError(f"{repo.label} not found on {endpoint()}, or it is private or gated and "
                         f"{_token_state(repo)}", hint=f"check the repo id; for a private or gated repo, {LOGIN_HINT}")


def _no_revision(repo: HubRepo) -> TunepipeError:
    return TunepipeError(f"{repo.label}: no such revision (branch, tag or commit) in {repo.repo_id!r}",
                         hint="model_revision / an entry's revision names a branch, a tag or a commit sha of the "
                              "repo; unset it for main")


def _exists(repo: HubRepo) -> bool:
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo.repo_id, repo_type=repo.repo_type, revision=DEFAULT_REVISION, token=repo.token)
    except Exception:  # noqa: BLE001 (any failure: not known to exist)
        return False
    return True


def _not_cached(repo: HubRepo, exc: Exception) -> TunepipeError:
    if offline():
        return TunepipeError(f"{repo.label} is not in the cache ({_cache_dir(repo)}) and HF_HUB_OFFLINE is set",
                             hint="unset HF_HUB_OFFLINE to download it once, or copy the cache from a machine "
                                  "that has it")
    cause = exc.__cause__ or exc.__context__
    if cause is not None and isinstance(cause, _transport_errors()):
        return _connection_lost(repo, cause)
    return TunepipeError(f"{repo.label}: cannot reach {endpoint()} and the repo is not in the cache "
                         f"({_cache_dir(repo)})", hint="check the connection (and HF_ENDPOINT), then run again")


def _connection_lost(repo: HubRepo, exc: Exception) -> TunepipeError:
    return TunepipeError(f"{repo.label}: the connection to {endpoint()} failed ({type(exc).__name__}); "
                         "nothing was written to the stage's output", hint=RERUN_HINT)


def _token_state(repo: HubRepo) -> str:
    from huggingface_hub import get_token

    if repo.token:
        return "the token given (hf_hub_token) cannot read it"
    if get_token():
        return "the token of HF_TOKEN / `hf auth login` cannot read it"
    return "no token was given"


def _cache_dir(repo: HubRepo) -> str:
    from huggingface_hub import constants

    return str(repo.cache_dir or constants.HF_HUB_CACHE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures below HTTP (refused, reset, cut mid-body): huggingface_hub's client
    library (httpx2 in 2.x, httpx in 1.x), plus the builtin ConnectionError."""
    found: list[type[BaseException]] = [ConnectionError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(__import__(module).TransportError)
    return tuple(found)


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
