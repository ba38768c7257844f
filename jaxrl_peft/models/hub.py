"""Hub ids for everything a config names: a local path passes through, `org/name` is fetched from the
Hugging Face Hub into the standard cache (only the files the loaders read) and pinned to a commit.

Specs: a local directory or file; `org/name` (a model or dataset repo); `org/name:file.pth` (one file of
a model repo, e.g. an official RWKV-7 checkpoint); `org/name:config` for a dataset config. The cache
location and offline mode are read from the environment at call time (`HF_HUB_CACHE`, `HF_HOME`,
`XDG_CACHE_HOME`, `HF_HUB_OFFLINE`), not from `huggingface_hub.constants`, which are frozen at import.
Every resolution returns the local path and the commit sha it came from, for the run record.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal, NamedTuple

import huggingface_hub
import yaml
from huggingface_hub import errors as hub_errors
from huggingface_hub.repocard import metadata_load

ModelKind = Literal["hf", "rwkv_pth", "encoder"]

CONFIG_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TORCH_WEIGHT_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
LOCAL_SUFFIXES = DATA_SUFFIXES + (".pth", ".pt", ".safetensors", ".bin", ".csv")
# Default data files of a dataset repo without a `configs:` block (the `datasets` library's conventions).
DEFAULT_SPLIT_PATTERNS = ("{split}.parquet", "{split}-*.parquet", "data/{split}-*", "data/{split}.*",
                          "{split}/*", "data/{split}/*", "*/{split}-*.parquet")

_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?::(?P<file>[^:\s]+))?")
_SHA = re.compile(r"[0-9a-f]{40}")


class HubError(ValueError):
    """A spec that cannot be resolved: a missing path, an uncached id offline, or a Hub failure."""


class NotCachedError(HubError):
    """A hub id that is needed but is not (fully) in the cache, and cannot be downloaded now."""


class Resolved(NamedTuple):
    """Where a spec lives on disk, and the Hub commit it came from (None for a plain local path)."""

    path: Path  # the directory or file the loaders read
    commit: str | None  # 40-hex commit sha of the cached snapshot
    files: tuple[Path, ...] = ()  # dataset data files (one split); empty for models


def hub_cache_dir() -> Path:
    """The hub cache the environment names now: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now; read per call so tests and launchers can set it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(spec: str) -> bool:
    """A spec that is meant as a filesystem path even when nothing exists there."""
    return (spec.startswith(("/", "./", "../", "~", "\\")) or spec.count("/") != 1
            or (":" not in spec and spec.lower().endswith(LOCAL_SUFFIXES)))


def is_hub_id(spec: str) -> bool:
    """True for `org/name` or `org/name:file` that is not an existing local path and not path-like."""
    spec = os.fspath(spec)
    if os.path.exists(os.path.expanduser(spec)) or _looks_like_path(spec.split(":", 1)[0]):
        return False
    match = _HUB_ID.fullmatch(spec)
    return bool(match) and ".." not in match.group("repo") and "--" not in match.group("repo")


def _split_spec(spec: str) -> tuple[str, str | None]:
    """(`org/name`, the part after `:` or None)."""
    match = _HUB_ID.fullmatch(spec)
    return match.group("repo"), match.group("file")


def commit_of(path: str | os.PathLike) -> str | None:
    """The commit sha of a path inside a hub cache snapshot (`.../snapshots/<sha>/...`), else None."""
    parts = Path(path).parts
    for index in range(len(parts) - 1):
        if parts[index] == "snapshots" and _SHA.fullmatch(parts[index + 1]):
            return parts[index + 1]
    return None


def _snapshot_root(path: Path) -> Path:
    """The `snapshots/<sha>` directory that holds `path`."""
    while path.parent.name != "snapshots":
        path = path.parent
    return path


def download_command(repo_id: str, revision: str | None, repo_type: str = "model",
                     patterns: tuple[str, ...] = (), filename: str | None = None) -> str:
    """The `hf download` command line (huggingface_hub's CLI) that fetches what a resolve needs."""
    words = ["hf", "download", repo_id]
    if filename:
        words.append(filename)
    if repo_type != "model":
        words += ["--repo-type", repo_type]
    if revision:
        words += ["--revision", revision]
    for pattern in patterns:
        words += ["--include", pattern]
    return " ".join(shlex.quote(word) for word in words)


def _offline_message(repo_id: str, revision: str | None, command: str, allow_download: bool) -> str:
    """The one message for a hub id that is needed but is not (fully) in the cache."""
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not allow_download:
        why = "downloads are disabled (allow_download=False)"
    else:
        why = "the Hub could not be reached"
    return (f"{repo_id} (revision {revision or 'main'}) is not a local path and is not in the Hugging Face "
            f"cache {hub_cache_dir()}, and {why}. Download it where the Hub is reachable (same HF_HOME) with:\n"
            f"  {command}\nthen run again; with HF_HUB_OFFLINE=1 the cached copy is used without network.")


def _fetch(repo_id: str, revision: str | None, repo_type: str, patterns: tuple[str, ...] | None,
           filename: str | None, allow_download: bool, command: str | None = None) -> Path:
    """snapshot_download / hf_hub_download into the cache the environment names; Hub errors become HubError.

    `command` is the download command the not-cached message shows (default: exactly this fetch).
    """
    cache = hub_cache_dir()
    local_only = hub_offline() or not allow_download
    command = command or download_command(repo_id, revision, repo_type, patterns or (), filename)
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(
                repo_id, filename, repo_type=repo_type, revision=revision, cache_dir=cache,
                local_files_only=local_only))
        return Path(huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
            allow_patterns=list(patterns) if patterns else None, local_files_only=local_only))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as error:
        raise NotCachedError(_offline_message(repo_id, revision, command, allow_download)) from error
    except hub_errors.RevisionNotFoundError as error:
        raise HubError(f"{repo_id}: revision {revision!r} does not exist on the Hub") from error
    except hub_errors.RemoteEntryNotFoundError as error:
        raise HubError(f"{repo_id}: no file {filename!r} at revision {revision or 'main'}") from error
    except hub_errors.RepositoryNotFoundError as error:
        raise HubError(f"{repo_id}: no such {repo_type} repo on the Hub, or it is private/gated "
                       f"(log in with `hf auth login`): {error}") from error


def _check_weights(snapshot: Path, repo_id: str, revision: str | None, patterns: tuple[str, ...],
                   allow_download: bool, accept_torch_bin: bool) -> None:
    """Raises the not-cached message when a snapshot lacks config.json or a weight shard.

    huggingface_hub returns a partial snapshot offline when it has no cached file listing for it (e.g.
    one a dry run filled with config.json only), so the weights are checked here.
    """
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    for index_file in list(snapshot.glob("*.index.json")):
        shards = set(json.loads(index_file.read_text()).get("weight_map", {}).values())
        missing += sorted(shard for shard in shards if not (snapshot / shard).is_file())
    has_weights = any(snapshot.glob("*.safetensors")) or (
        accept_torch_bin and any(snapshot.glob("pytorch_model*.bin")))
    if not has_weights:
        missing.append("*.safetensors")
    if missing:
        command = download_command(repo_id, revision, "model", patterns)
        raise NotCachedError(f"{snapshot}: the cached snapshot is incomplete (missing {', '.join(missing)}). "
                             + _offline_message(repo_id, revision, command, allow_download))


def resolve_model(spec: str | os.PathLike, revision: str | None = None, kind: ModelKind = "hf",
                  allow_download: bool = True) -> Resolved:
    """A local checkpoint as it is, or a hub model fetched (config, tokenizer, safetensors only) and pinned.

    kind 'hf': a transformers directory; 'encoder': the same plus preprocessor_config.json, falling back
    to pytorch_model*.bin when the repo has no safetensors; 'rwkv_pth': `org/name:file.pth`, one file.
    `revision` (branch, tag or sha) applies to hub ids only.
    """
    spec = os.fspath(spec)
    local = Path(spec).expanduser()
    if local.exists():
        return Resolved(local, commit_of(local.absolute()))
    if not is_hub_id(spec):
        raise HubError(f"model path {spec} does not exist (and it is not a hub id `org/name`"
                       f"{' or `org/name:file.pth`' if kind == 'rwkv_pth' else ''})")
    repo_id, filename = _split_spec(spec)
    if kind == "rwkv_pth" and filename is None:
        raise HubError(f"{spec}: an RWKV .pth on the Hub is named `org/name:file.pth` "
                       f"(e.g. BlinkDL/rwkv7-g1:rwkv7-g1a-0.1b-20250728-ctx4096.pth)")
    if filename is not None:
        path = _fetch(repo_id, revision, "model", None, filename, allow_download)
        return Resolved(path, commit_of(path))
    patterns = CONFIG_FILES + WEIGHT_PATTERNS
    snapshot = _fetch(repo_id, revision, "model", patterns, None, allow_download)
    if kind == "encoder" and not any(snapshot.glob("*.safetensors")):
        snapshot = _fetch(repo_id, commit_of(snapshot) or revision, "model", TORCH_WEIGHT_PATTERNS, None,
                          allow_download)
    _check_weights(snapshot, repo_id, revision, patterns, allow_download, accept_torch_bin=kind == "encoder")
    return Resolved(snapshot, commit_of(snapshot))


def resolve_config_only(spec: str | os.PathLike, revision: str | None = None) -> Resolved | None:
    """config.json and tokenizer files only (never weights), so a --dry_run can compute shapes.

    A local path passes through; None when offline and not cached, or for a single `org/name:file.pth`.
    """
    spec = os.fspath(spec)
    local = Path(spec).expanduser()
    if local.exists():
        return Resolved(local, commit_of(local.absolute()))
    if not is_hub_id(spec):
        raise HubError(f"model path {spec} does not exist (and it is not a hub id `org/name`)")
    repo_id, filename = _split_spec(spec)
    if filename is not None:
        return None
    try:
        snapshot = _fetch(repo_id, revision, "model", CONFIG_FILES, None, allow_download=True)
    except NotCachedError:
        return None
    if not (snapshot / "config.json").is_file():
        return None
    return Resolved(snapshot, commit_of(snapshot))


def _choose_config(configs: list[dict[str, Any]], config_name: str | None, spec: str) -> dict[str, Any]:
    """The dataset config `load_dataset` would pick: the named one, the `default: true` one, or the only one."""
    by_name = {entry.get("config_name", "default"): entry for entry in configs}
    if config_name is not None:
        if config_name not in by_name:
            raise HubError(f"{spec}: no dataset config {config_name!r}; it has {sorted(by_name)}")
        return by_name[config_name]
    defaults = [entry for entry in configs if entry.get("default")]
    if defaults:
        return defaults[0]
    if "default" in by_name:
        return by_name["default"]
    if len(configs) == 1:
        return configs[0]
    raise HubError(f"{spec}: the dataset has configs {sorted(by_name)} and none is the default; "
                   f"name one as `{spec}:<config>`")


def _split_patterns(data_files: Any, split: str) -> tuple[str, ...]:
    """The path globs of `split` in a dataset card's `data_files` (str, list of str, or list of {split, path})."""
    if isinstance(data_files, str):
        return (data_files,) if split == "train" else ()
    if isinstance(data_files, dict):
        data_files = [data_files]
    patterns: list[str] = []
    for entry in data_files or ():
        if isinstance(entry, str):
            patterns += [entry] if split == "train" else []
        elif entry.get("split", "train") == split:
            paths = entry.get("path", ())
            patterns += [paths] if isinstance(paths, str) else list(paths)
    return tuple(patterns)


def _card_patterns(snapshot: Path, config_name: str | None, split: str, spec: str) -> tuple[str, ...] | None:
    """Data-file globs for `split` from README.md's `configs:` block; None when the card has none."""
    card = snapshot / "README.md"
    try:
        metadata = metadata_load(card) if card.is_file() else None
    except (ValueError, yaml.YAMLError) as error:
        raise HubError(f"{card}: the dataset card's YAML header is invalid ({error})") from error
    configs = (metadata or {}).get("configs")
    if not configs:
        if config_name is not None:
            raise HubError(f"{spec}: the dataset card declares no configs, so config {config_name!r} is unknown")
        return None
    chosen = _choose_config(configs, config_name, spec)
    patterns = _split_patterns(chosen.get("data_files"), split)
    if not patterns:
        raise HubError(f"{spec}: config {chosen.get('config_name', 'default')!r} has no split {split!r}")
    return patterns


def _matching_files(snapshot: Path, patterns: tuple[str, ...]) -> tuple[Path, ...]:
    """Data files under `snapshot` whose repo-relative path matches one of `patterns`."""
    found = []
    for file in sorted(snapshot.rglob("*")):
        relative = file.relative_to(snapshot).as_posix()
        if file.is_file() and file.suffix.lower() in DATA_SUFFIXES and \
                any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns):
            found.append(file)
    return tuple(found)


def resolve_dataset(spec: str | os.PathLike, revision: str | None = None, split: str = "train",
                    allow_download: bool = True) -> Resolved:
    """A local parquet/json(l) file as it is, or a hub dataset's data files of `split` fetched and pinned.

    `org/name:config` picks a config of the dataset card; without one, the card's default config is used
    (e.g. open-r1/DAPO-Math-17k-Processed, the study's training set). `path` is the file when the split
    has one file, else the snapshot directory; `files` lists them all.
    """
    spec = os.fspath(spec)
    local = Path(spec).expanduser()
    if local.exists():
        files = (local,) if local.is_file() else tuple(
            file for file in sorted(local.rglob("*")) if file.suffix.lower() in DATA_SUFFIXES)
        return Resolved(local, commit_of(local.absolute()), files)
    if not is_hub_id(spec):
        raise HubError(f"dataset file {spec} does not exist (and it is not a hub dataset id `org/name`)")
    repo_id, config_name = _split_spec(spec)
    whole_repo = download_command(repo_id, revision, "dataset")
    card_snapshot = _fetch(repo_id, revision, "dataset", ("README.md",), None, allow_download, whole_repo)
    commit = commit_of(card_snapshot)
    patterns = _card_patterns(card_snapshot, config_name, split, spec)
    if patterns is None:
        patterns = tuple(pattern.format(split=split) for pattern in DEFAULT_SPLIT_PATTERNS)
    snapshot = _fetch(repo_id, commit or revision, "dataset", patterns, None, allow_download)
    files = _matching_files(snapshot, patterns)
    if not files and allow_download and not hub_offline():
        raise HubError(f"{spec}: the dataset has no .parquet/.json/.jsonl files of split {split!r} "
                       f"(patterns {list(patterns)}) at commit {commit}")
    if not files:
        command = download_command(repo_id, revision, "dataset", ("README.md",) + patterns)
        raise NotCachedError(f"{spec}: no .parquet/.json/.jsonl files of split {split!r} (patterns "
                             f"{list(patterns)}) in {snapshot}. "
                             + _offline_message(repo_id, revision, command, allow_download))
    return Resolved(files[0] if len(files) == 1 else _snapshot_root(files[0]), commit, files)
