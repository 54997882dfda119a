"""Hub datasets: dataset_info.json entries that name a Hugging Face Hub dataset.

An entry with `hf_hub_url` (and `subset`, `split`, `folder` as LLaMA-Factory reads them:
the `name`, `split` and `data_dir` of `datasets.load_dataset`) is streamed through
`datasets`, row by row, so validation stays flat in memory however big the dataset is.
The validate stage first resolves the entry's revision (`revision`, a tunepipe addition;
default main) to a commit sha, reads exactly that commit and records it. ModelScope /
Modelers URLs are not read: the entry's `hf_hub_url` is used when it has one, and an entry
with only those gets an error saying how to download it and what `file_name` to give it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from tunepipe.data.sources.readers import RawRow
from tunepipe.errors import TunepipeError
from tunepipe.models.hub import (
    DEFAULT_REVISION,
    HubRepo,
    hub_errors,
    quiet_http_logs,
    refuse_other_hubs,
    resolve_commit,
)

log = logging.getLogger(__name__)

OTHER_HUBS = {"ms_hub_url": ("ModelScope", "modelscope download --dataset {repo} --local_dir {dest}"),
              "om_hub_url": ("Modelers", "git clone https://modelers.cn/datasets/{repo} {dest}")}


@dataclass(frozen=True)
class HubDataset:
    """Where an entry's rows live on the Hub."""

    repo_id: str
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    revision: str = DEFAULT_REVISION

    def load_kwargs(self, commit: str | None = None) -> dict:
        """The `datasets.load_dataset` call that reads it (at `commit` once resolved)."""
        return {"path": self.repo_id, "name": self.subset, "data_dir": self.folder, "split": self.split,
                "revision": commit or self.revision, "streaming": True}

    def shown(self) -> str:
        """How a row's location names it: `hf://datasets/org/name/folder (subset en, split train)`."""
        where = f"hf://datasets/{self.repo_id}" + (f"/{self.folder}" if self.folder else "")
        subset = f"subset {self.subset}, " if self.subset else ""
        return f"{where} ({subset}split {self.split})"

    def repo(self, token: str | None = None, cache_dir: str | None = None) -> HubRepo:
        return HubRepo(self.repo_id, repo_type="dataset", revision=self.revision, cache_dir=cache_dir, token=token)


def hub_dataset(name: str, raw: dict, dataset_dir) -> HubDataset:
    """The Hub dataset an entry without `file_name` names, or a clear error for what cannot be read."""
    if raw.get("hf_hub_url"):
        others = [key for key in OTHER_HUBS if raw.get(key)]
        if others:
            log.info("dataset %r: reading hf_hub_url %r (%s not used: tunepipe reads the Hugging Face Hub)",
                     name, raw["hf_hub_url"], " / ".join(others))
        return HubDataset(repo_id=raw["hf_hub_url"], subset=raw.get("subset") or None,
                          split=raw.get("split") or "train", folder=raw.get("folder") or None,
                          revision=raw.get("revision") or DEFAULT_REVISION)
    for key, (hub, command) in OTHER_HUBS.items():
        if raw.get(key):
            dest = f"{dataset_dir}/{name}"
            raise TunepipeError(
                f"dataset {name!r} is only on {hub} ({key}={raw[key]!r}); tunepipe reads the Hugging Face Hub only",
                hint=f"download it with `{command.format(repo=raw[key], dest=dest)}` and give the entry "
                     f"\"file_name\": \"{name}\" (the folder, inside {dataset_dir}), keeping its formatting/columns")
    if raw.get("script_url"):
        raise TunepipeError(f"dataset {name!r}: script_url={raw['script_url']!r}: dataset loading scripts are not run "
                            "(they are code, and datasets no longer supports them)",
                            hint="convert the data to json / jsonl / parquet files and name them in \"file_name\"")
    if raw.get("cloud_file_name"):
        raise TunepipeError(f"dataset {name!r}: cloud_file_name={raw['cloud_file_name']!r}: cloud files are not "
                            "read at run time",
                            hint=f"bring it in versioned with `dvc import-url {raw['cloud_file_name']} "
                                 f"{dataset_dir}/` and name the file in \"file_name\"")
    raise TunepipeError(f"dataset {name!r}: names no file_name nor hf_hub_url")


def resolve(hub: HubDataset, token: str | None = None, cache_dir: str | None = None) -> str:
    """The commit sha the entry's revision names now (the validate stage records it)."""
    return resolve_commit(hub.repo(token, cache_dir))


def stream_rows(hub: HubDataset, commit: str, token: str | None = None,
                cache_dir: str | None = None) -> Iterator[RawRow]:
    """The rows of `commit`, one at a time, as readers.read_rows gives a local file's."""
    from datasets import load_dataset

    refuse_other_hubs()
    quiet_http_logs()
    repo = hub.repo(token, cache_dir)
    shown = hub.shown()
    with dataset_errors(hub, repo):
        rows = load_dataset(**hub.load_kwargs(commit), token=token, cache_dir=cache_dir)
        if getattr(rows, "features", None) is not None:  # typed (parquet): images stay {bytes, path}, as read locally
            rows = rows.decode(False)
        for index, row in enumerate(rows):
            yield RawRow(shown, index, None, row)


def _missing_data_errors() -> tuple[type[BaseException], ...]:
    """The exception types of `datasets` that mean "that repo / folder holds no data"."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetNotFoundError

    return EmptyDatasetError, DatasetNotFoundError


def dataset_errors(hub: HubDataset, repo: HubRepo):
    """hub_errors, plus `datasets`' own: a missing subset, split or folder in one line."""
    import contextlib

    @contextlib.contextmanager
    def translated():
        with hub_errors(repo):
            try:
                yield
            except _missing_data_errors() as exc:
                raise TunepipeError(f"{repo.label}: {_first_line(exc)}",
                                    hint="check the entry's subset / split / folder against the repo") from None
            except ValueError as exc:  # datasets says "BuilderConfig 'x' not found" / "Bad split: x"
                text = _first_line(exc)
                if "BuilderConfig" in text or "split" in text.lower():
                    raise TunepipeError(f"{repo.label}: {text}",
                                        hint="set the entry's \"subset\" / \"split\" to one of those") from None
                raise

    return translated()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
