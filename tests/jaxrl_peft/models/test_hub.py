"""Hub ids resolve against a real Hugging Face cache layout built in tmp_path; no network.

The layout (`models--org--name/{blobs,refs,snapshots}`) is checked against huggingface_hub's own
readers (`scan_cache_dir`, `try_to_load_from_cache`) and transformers' `AutoConfig`, so the tests
fail if the fabricated cache or the resolver drifts from what the real tools read.
"""

import fnmatch
import hashlib
import json
import shlex
from pathlib import Path

import huggingface_hub
import huggingface_hub.cli.download as hf_cli_download
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import transformers
from huggingface_hub.cli.hf import app as hf_cli

from jaxrl_peft.data import loaders
from jaxrl_peft.models import hub

SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40
DAPO = "open-r1/DAPO-Math-17k-Processed"


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ("main",),
               repo_type: str = "model") -> Path:
    """Writes one snapshot of `repo_id` the way huggingface_hub does: content-addressed blobs, symlinks, refs."""
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, content in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def tiny_model_files(tmp_path: Path, hidden_size: int = 16) -> dict[str, bytes]:
    """config.json written by transformers' Qwen2Config, one safetensors tensor, a tokenizer config."""
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=hidden_size, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    out = tmp_path / f"saved_{hidden_size}"
    config.save_pretrained(out)
    weights = {"model.embed_tokens.weight": np.zeros((32, hidden_size), np.float32)}
    return {"config.json": (out / "config.json").read_bytes(), "model.safetensors": safetensors.numpy.save(weights),
            "tokenizer_config.json": b"{}"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under HF_HOME, offline."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def test_hub_id_resolves_to_its_cached_snapshot(cache, tmp_path):
    files = tiny_model_files(tmp_path)
    snapshot = cache_repo(cache, "org/tiny", files, SHA_MAIN)
    resolved = hub.resolve_model("org/tiny")
    assert resolved.path == snapshot and resolved.commit == SHA_MAIN
    expected_config = huggingface_hub.try_to_load_from_cache("org/tiny", "config.json", cache_dir=cache)
    assert Path(expected_config) == resolved.path / "config.json"
    cached = huggingface_hub.scan_cache_dir(cache)
    assert [(repo.repo_id, [rev.commit_hash for rev in repo.revisions]) for repo in cached.repos] == [
        ("org/tiny", [SHA_MAIN])]
    assert transformers.AutoConfig.from_pretrained(resolved.path).hidden_size == 16


def test_hf_hub_cache_overrides_hf_home(cache, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    snapshot = cache_repo(other, "org/tiny", tiny_model_files(tmp_path), SHA_MAIN)
    with pytest.raises(hub.NotCachedError):
        hub.resolve_model("org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert hub.hub_cache_dir() == other
    assert hub.resolve_model("org/tiny").path == snapshot


def test_uncached_id_offline_names_the_id_and_the_download_command(cache):
    with pytest.raises(hub.HubError) as error:
        hub.resolve_model("org/missing", revision="v1")
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, hub.NotCachedError)
    assert "org/missing" in message and "HF_HUB_OFFLINE" in message and str(cache) in message
    command = shlex.split(next(line for line in message.splitlines() if line.strip().startswith("hf download")))
    assert command[:3] == ["hf", "download", "org/missing"]
    assert command[command.index("--revision") + 1] == "v1"
    includes = [command[i + 1] for i, word in enumerate(command) if word == "--include"]
    needed = ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors",
              "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    unwanted = ["pytorch_model.bin", "model.pth", "README.md", "original/consolidated.00.pth"]
    assert all(any(fnmatch.fnmatchcase(name, pattern) for pattern in includes) for name in needed)
    assert not any(fnmatch.fnmatchcase(name, pattern) for pattern in includes for name in unwanted)


def download_requests(monkeypatch, resolve) -> tuple[dict, dict]:
    """(what `resolve` asks huggingface_hub for, what the `hf download` command in its error asks for).

    Both downloads are stubbed; the command is parsed by huggingface_hub's real CLI.
    """
    asked, cli_asked = [], []

    def record_and_miss(*args, **kwargs):
        asked.append(dict(kwargs, filename=args[1] if len(args) > 1 else None))
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record_and_miss)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", record_and_miss)
    with pytest.raises(hub.NotCachedError) as error:
        resolve()
    command = next(line for line in str(error.value).splitlines() if line.strip().startswith("hf download"))
    monkeypatch.setattr(hf_cli_download, "snapshot_download", lambda **kwargs: cli_asked.append(kwargs) or "/x")
    monkeypatch.setattr(hf_cli_download, "hf_hub_download", lambda **kwargs: cli_asked.append(kwargs) or "/x")
    hf_cli(shlex.split(command)[1:], standalone_mode=False)
    return asked[-1], cli_asked[-1]


def test_the_printed_command_fetches_what_the_resolver_needs(cache, monkeypatch):
    asked, cli = download_requests(monkeypatch, lambda: hub.resolve_model("org/tiny", revision="v1"))
    assert (cli["repo_id"], cli["repo_type"], cli["revision"]) == ("org/tiny", "model", "v1")
    assert cli["allow_patterns"] == asked["allow_patterns"] and cli["ignore_patterns"] is None
    asked, cli = download_requests(monkeypatch, lambda: hub.resolve_model("BlinkDL/rwkv7-g1:a/b.pth", kind="rwkv_pth"))
    assert (cli["repo_id"], cli["filename"], cli["revision"]) == ("BlinkDL/rwkv7-g1", "a/b.pth", None)
    assert asked["filename"] == "a/b.pth"
    asked, cli = download_requests(monkeypatch, lambda: hub.resolve_dataset(DAPO, revision="v2"))
    assert (cli["repo_id"], cli["repo_type"], cli["revision"], cli["allow_patterns"]) == (DAPO, "dataset", "v2", None)
    assert asked["repo_type"] == "dataset"


def test_downloads_disabled_without_offline_env_is_the_same_clear_error(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(hub.NotCachedError, match=r"allow_download=False[\s\S]*hf download org/missing"):
        hub.resolve_model("org/missing", allow_download=False)


def test_revision_pin_picks_the_branch_or_commit_snapshot(cache, tmp_path):
    cache_repo(cache, "org/tiny", tiny_model_files(tmp_path, 16), SHA_MAIN)
    cache_repo(cache, "org/tiny", tiny_model_files(tmp_path, 32), SHA_V2, refs=("v2",))
    by_branch = hub.resolve_model("org/tiny", revision="v2")
    by_sha = hub.resolve_model("org/tiny", revision=SHA_MAIN)
    assert (by_branch.commit, by_sha.commit, hub.resolve_model("org/tiny").commit) == (SHA_V2, SHA_MAIN, SHA_MAIN)
    assert transformers.AutoConfig.from_pretrained(by_branch.path).hidden_size == 32
    assert transformers.AutoConfig.from_pretrained(by_sha.path).hidden_size == 16
    with pytest.raises(hub.NotCachedError, match="revision v3"):
        hub.resolve_model("org/tiny", revision="v3")


def test_partial_snapshot_is_not_a_model_but_serves_a_dry_run(cache, tmp_path):
    files = tiny_model_files(tmp_path)
    snapshot = cache_repo(cache, "org/tiny", {"config.json": files["config.json"]}, SHA_MAIN)
    with pytest.raises(hub.NotCachedError, match=r"missing \*\.safetensors[\s\S]*hf download org/tiny"):
        hub.resolve_model("org/tiny")
    assert hub.resolve_config_only("org/tiny") == (snapshot, SHA_MAIN, ())
    assert hub.resolve_config_only("org/uncached") is None


def test_missing_shard_of_an_index_is_reported(cache, tmp_path):
    files = tiny_model_files(tmp_path)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    cache_repo(cache, "org/sharded", {"config.json": files["config.json"],
                                      "model.safetensors.index.json": json.dumps(index).encode(),
                                      "model-00001-of-00002.safetensors": files["model.safetensors"]}, SHA_MAIN)
    with pytest.raises(hub.NotCachedError, match="model-00002-of-00002.safetensors"):
        hub.resolve_model("org/sharded")


def test_encoder_without_safetensors_falls_back_to_torch_weights(cache):
    files = {"config.json": b"{}", "preprocessor_config.json": b"{}", "pytorch_model.bin": b"torch"}
    snapshot = cache_repo(cache, "microsoft/wavlm-base-plus", files, SHA_MAIN)
    assert hub.resolve_model("microsoft/wavlm-base-plus", kind="encoder") == (snapshot, SHA_MAIN, ())
    with pytest.raises(hub.NotCachedError, match=r"missing \*\.safetensors"):
        hub.resolve_model("microsoft/wavlm-base-plus", kind="hf")


def test_dry_run_never_asks_for_weights(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(cache_repo(cache, repo_id, {"config.json": b"{}"}, SHA_MAIN))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_config_only("org/tiny", revision="main").commit == SHA_MAIN
    (kwargs,) = calls
    assert kwargs["revision"] == "main" and Path(kwargs["cache_dir"]) == cache and not kwargs["local_files_only"]
    assert "config.json" in kwargs["allow_patterns"] and "tokenizer.json" in kwargs["allow_patterns"]
    assert not [p for p in kwargs["allow_patterns"] if fnmatch.fnmatchcase("model-00001-of-00002.safetensors", p)]


def test_rwkv_pth_names_one_file_of_the_repo(cache):
    snapshot = cache_repo(cache, "BlinkDL/rwkv7-g1", {"rwkv7-g1a-0.1b.pth": b"weights", "README.md": b"x"}, SHA_MAIN)
    resolved = hub.resolve_model("BlinkDL/rwkv7-g1:rwkv7-g1a-0.1b.pth", kind="rwkv_pth")
    assert resolved == (snapshot / "rwkv7-g1a-0.1b.pth", SHA_MAIN, ())
    assert resolved.path.read_bytes() == b"weights"
    with pytest.raises(hub.HubError, match="org/name:file.pth"):
        hub.resolve_model("BlinkDL/rwkv7-g1", kind="rwkv_pth")
    with pytest.raises(hub.NotCachedError, match="hf download BlinkDL/rwkv7-g1 other.pth"):
        hub.resolve_model("BlinkDL/rwkv7-g1:other.pth", kind="rwkv_pth")


def test_local_paths_pass_through_and_missing_paths_say_so(cache, tmp_path):
    model_dir = tmp_path / "org" / "tiny"
    model_dir.mkdir(parents=True)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"x")
    assert hub.resolve_model(model_dir) == (model_dir, None, ())
    assert hub.resolve_model(str(pth), kind="rwkv_pth") == (pth, None, ())
    for missing in (str(tmp_path / "nope"), "./org/tiny", "a/b/c", "data/dapo-math-17k.parquet"):
        with pytest.raises(hub.HubError, match=f"{missing} does not exist"):
            hub.resolve_model(missing)
    with pytest.raises(hub.HubError, match="dataset file data/train.parquet does not exist"):
        hub.resolve_dataset("data/train.parquet")


@pytest.mark.parametrize("spec, expected", [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", True), (DAPO, True), ("BlinkDL/rwkv7-g1:x/y.pth", True),
    ("org/name:all", True), ("name-only", False), ("a/b/c", False), ("./org/name", False),
    ("/abs/org", False), ("data/train.parquet", False), ("org/-bad", False), ("org/na--me", False),
    ("org/na..me", False), ("", False)])
def test_is_hub_id(spec, expected):
    assert hub.is_hub_id(spec) is expected


def parquet_bytes(rows: list[dict]) -> bytes:
    """A parquet file of `rows` as bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


DAPO_CARD = b"""---
dataset_info:
- config_name: all
  features: []
configs:
- config_name: all
  data_files:
  - split: train
    path: all/train-*
  default: true
- config_name: cn
  data_files:
  - split: train
    path: cn/train-*
- config_name: en
  data_files:
  - split: train
    path: en/train-*
---
# DAPO-Math-17k-Processed
"""


def dapo_rows(language: str, count: int) -> list[dict]:
    """Rows with the fields of open-r1/DAPO-Math-17k-Processed."""
    return [{"prompt": f"{language} problem {index}", "solution": str(index), "data_source": "math_dapo"}
            for index in range(count)]


def test_dataset_id_resolves_to_the_default_config_parquet(cache):
    files = {"README.md": DAPO_CARD,
             "all/train-00000-of-00001.parquet": parquet_bytes(dapo_rows("en", 3) + dapo_rows("cn", 2)),
             "en/train-00000-of-00001.parquet": parquet_bytes(dapo_rows("en", 3)),
             "cn/train-00000-of-00001.parquet": parquet_bytes(dapo_rows("cn", 2))}
    snapshot = cache_repo(cache, DAPO, files, SHA_MAIN, repo_type="dataset")
    resolved = hub.resolve_dataset(DAPO)
    assert resolved == (snapshot / "all/train-00000-of-00001.parquet", SHA_MAIN,
                        (snapshot / "all/train-00000-of-00001.parquet",))
    assert pq.read_table(resolved.path).to_pylist() == dapo_rows("en", 3) + dapo_rows("cn", 2)
    english = hub.resolve_dataset(f"{DAPO}:en")
    assert [row["prompt"] for row in loaders.read_rows(english.path)] == [f"en problem {i}" for i in range(3)]
    with pytest.raises(hub.HubError, match=r"no dataset config 'fr'; it has \['all', 'cn', 'en'\]"):
        hub.resolve_dataset(f"{DAPO}:fr")
    with pytest.raises(hub.HubError, match="has no split 'test'"):
        hub.resolve_dataset(DAPO, split="test")


def test_dataset_without_card_configs_uses_the_default_file_layout(cache):
    shards = {f"data/train-0000{i}-of-00002.parquet": parquet_bytes(dapo_rows(str(i), 2)) for i in range(2)}
    test_file = {"data/test-00000-of-00001.parquet": parquet_bytes(dapo_rows("test", 1))}
    snapshot = cache_repo(cache, "org/plain", {"README.md": b"# no metadata\n", **shards, **test_file}, SHA_MAIN,
                          repo_type="dataset")
    resolved = hub.resolve_dataset("org/plain")
    assert resolved.path == snapshot and resolved.commit == SHA_MAIN
    assert resolved.files == tuple(snapshot / name for name in sorted(shards))
    assert hub.resolve_dataset("org/plain", split="test").path == snapshot / "data/test-00000-of-00001.parquet"


def test_uncached_dataset_offline_gives_the_whole_repo_command(cache):
    with pytest.raises(hub.NotCachedError) as error:
        hub.resolve_dataset(DAPO)
    message = str(error.value)
    assert f"hf download {DAPO} --repo-type dataset\n" in message and "HF_HUB_OFFLINE" in message


def test_dataset_card_without_its_data_offline_names_the_config_files(cache, monkeypatch):
    cache_repo(cache, DAPO, {"README.md": DAPO_CARD}, SHA_MAIN, repo_type="dataset")
    with pytest.raises(hub.NotCachedError, match="split 'train'") as error:
        hub.resolve_dataset(f"{DAPO}:en")
    command = next(line for line in str(error.value).splitlines() if line.strip().startswith("hf download"))
    cli_asked = []
    monkeypatch.setattr(hf_cli_download, "snapshot_download", lambda **kwargs: cli_asked.append(kwargs) or "/x")
    hf_cli(shlex.split(command)[1:], standalone_mode=False)
    (cli,) = cli_asked
    wanted = ["README.md", "en/train-00000-of-00001.parquet"]
    unwanted = ["all/train-00000-of-00001.parquet", "cn/train-00000-of-00001.parquet"]
    assert cli["repo_type"] == "dataset"
    assert all(any(fnmatch.fnmatchcase(name, p) for p in cli["allow_patterns"]) for name in wanted)
    assert not any(fnmatch.fnmatchcase(name, p) for p in cli["allow_patterns"] for name in unwanted)


def test_local_dataset_file_passes_through(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(parquet_bytes(dapo_rows("en", 1)))
    assert hub.resolve_dataset(path) == (path, None, (path,))
