"""Compute nodes without internet: the prefetch command and jobs that run with the hub offline.

No test touches the network. The caches live in temporary folders; every child process gets
HF_ENDPOINT pointed at a closed local port, so a bug that goes online fails instead of downloading.
"Filled from local files" means: a tiny model saved with save_pretrained and placed in the hub
cache layout under a made-up repository id, and a SQuAD-shaped data set prepared by datasets'
own JSON builder and placed where load_dataset("rajpurkar/squad") looks for it offline.

    pytest tests/test_offline.py
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, read_json
from workshop import builtin_data, hub, prefetch
from workshop import model as models
from workshop.config import ModelArguments
from workshop.errors import WorkshopError

FAKE_REPO = "workshop-test/tiny-gpt2"
NO_HUB = "http://127.0.0.1:9"  # the discard port: connections are refused at once


# ------------------------------------------------------------------------- the caches, faked
def put_in_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> Path:
    """Place a folder's files as a download of repo_id would leave them (huggingface_hub's cache
    layout: models--<org>--<name>/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main})."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()  # any 40 hex digits do
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def put_squad_in_datasets_cache(datasets_cache: Path, splits: dict[str, list[dict]], work: Path) -> None:
    """Offline, load_dataset("rajpurkar/squad") reads the prepared Arrow tables under
    <HF_DATASETS_CACHE>/rajpurkar___squad/plain_text/<version>/<hash>/squad-<split>.arrow. datasets'
    JSON builder writes exactly that (tables, dataset_info.json) for dataset_name "squad"; the
    namespace folder is the only thing named here."""
    from datasets.packaged_modules.json.json import Json

    work.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        (work / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    builder = Json(cache_dir=str(work / "build"), dataset_name="squad", config_name="plain_text",
                   config_id="plain_text", hash="0" * 40,
                   data_files={split: str(work / f"{split}.jsonl") for split in splits})
    builder.download_and_prepare()
    datasets_cache.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work / "build" / "squad"), str(datasets_cache / "rajpurkar___squad"))


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory, tokenizer):
    """A 2-layer GPT-2 and the built-in tokenizer, saved as a hub repository holds them."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model_args = ModelArguments(model_name_or_path="tiny-gpt2", tokenizer_name_or_path="builtin")
    models.build_model(model_args, tokenizer, models.model_config(model_args, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def squad_splits() -> dict[str, list[dict]]:
    return {"train": builtin_data.squad_records(48, seed=0), "validation": builtin_data.squad_records(8, seed=1)}


def cache_env(root: Path) -> dict[str, str]:
    """HF_HOME and both caches in root, nothing reachable (the variables are read at import)."""
    return {"HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(root / "hf" / "hub"),
            "HF_DATASETS_CACHE": str(root / "hf" / "datasets"), "HF_ENDPOINT": NO_HUB}


def offline_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_OFFLINE"}
    return {**env, **cache_env(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def workshop(*runs: tuple[list[str], dict, Path]) -> list[subprocess.CompletedProcess]:
    """`python -m workshop <args>` for each (args, env, cwd), all at once (each spends seconds importing).
    Fresh processes, because huggingface_hub, transformers and datasets read the variables at import."""
    procs = [(args, subprocess.Popen([sys.executable, "-m", "workshop", *args], env=env, cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for args, env, cwd in runs]
    results = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------- empty cache
EMPTY_CACHE_CASES = {  # job flags -> the command its error must quote
    "model": (["--model_name_or_path", "gpt2"], "`workshop prefetch --model_name_or_path gpt2`"),
    "data": (["--preset", "tiny", "--dataset_name", "squad"],
             "`workshop prefetch --model_name_or_path none --dataset_name squad`"),
    "tokenizer": (["--preset", "tiny", "--tokenizer_name_or_path", "gpt2"],
                  "`workshop prefetch --model_name_or_path tiny-gpt2 --tokenizer_name_or_path gpt2`"),
}


def test_empty_cache_stops_at_once_naming_the_prefetch_command(tmp_path):
    env = offline_env(tmp_path)
    jobs = [(["train", *flags, "--logs_root", str(tmp_path / case)], env, tmp_path)
            for case, (flags, _) in EMPTY_CACHE_CASES.items()]
    check = (["prefetch", "--check_only", "--model_name_or_path", "gpt2", "--dataset_name", "none"], env, tmp_path)
    *results, checked = workshop(*jobs, check)
    for (case, (_, fix)), result in zip(EMPTY_CACHE_CASES.items(), results):
        assert result.returncode == 2, (case, result.stderr[-2000:])
        line = error_line(result)
        assert "not in the local cache and the hub is offline" in line and fix in line, (case, line)
        assert not (tmp_path / case).exists(), case  # nothing written in the logs root
    # The same check, run inside a job script, says what to fetch before any training starts.
    assert checked.returncode == 2
    assert "run `workshop prefetch --model_name_or_path gpt2` on a login node" in error_line(checked)


# --------------------------------------------------------------------------- filled cache
def test_with_the_cache_filled_from_local_files_a_job_runs_offline(tmp_path, saved_tiny_model):
    env = offline_env(tmp_path)
    put_in_hub_cache(Path(env["HF_HUB_CACHE"]), FAKE_REPO, saved_tiny_model)
    put_squad_in_datasets_cache(Path(env["HF_DATASETS_CACHE"]), squad_splits(), tmp_path / "squad")

    run_dir = tmp_path / "logs" / "run"
    check, result = workshop(
        (["prefetch", "--check_only", "--model_name_or_path", FAKE_REPO], env, tmp_path),
        (["train", "--preset", "tiny", "--model_name_or_path", FAKE_REPO, "--tokenizer_name_or_path", FAKE_REPO,
          "--dataset_name", "squad", "--max_train_samples", "16", "--max_eval_samples", "4", "--answer_eval_samples",
          "2", "--num_train_epochs", "1", "--run_dir", str(run_dir)], env, tmp_path))
    assert check.returncode == 0, check.stderr[-2000:]
    assert f"model {FAKE_REPO} (gpt2, weights: model.safetensors)" in check.stdout
    assert "dataset squad (48 train, 8 validation records)" in check.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["model"] == FAKE_REPO and metrics["dataset"] == "squad" and metrics["train_samples"] == 16
    assert read_json(run_dir / "status.json")["status"] == "completed"


def test_missing_weights_are_named(tmp_path, saved_tiny_model):
    env = offline_env(tmp_path)
    snapshot = put_in_hub_cache(Path(env["HF_HUB_CACHE"]), FAKE_REPO, saved_tiny_model)
    (snapshot / "model.safetensors").unlink()  # an interrupted download: config and tokenizer only
    [result] = workshop((["prefetch", "--check_only", "--model_name_or_path", FAKE_REPO, "--dataset_name", "none"],
                         env, tmp_path))
    assert result.returncode == 2
    assert (f"--model_name_or_path {FAKE_REPO}: the weights (model.safetensors or pytorch_model.bin) are not in the "
            f"local cache: run `workshop prefetch --model_name_or_path {FAKE_REPO}`") in error_line(result)


# ------------------------------------------------------------------------ the prefetch command
GPT2_LIKE_REPO = ["config.json", "generation_config.json", "merges.txt", "vocab.json", "tokenizer.json",
                  "tokenizer_config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
                  "flax_model.msgpack", "rust_model.ot", "64-8bits.tflite", "onnx/config.json",
                  "onnx/decoder_model.onnx", "README.md", ".gitattributes"]


def test_prefetch_downloads_one_weight_format_then_checks_offline_and_prints_the_exports(
        tmp_path, saved_tiny_model, monkeypatch, capfd):
    """The hub is replaced by local files; everything after the download is the real code path,
    the offline check in a child process included."""
    import datasets
    import huggingface_hub

    for key, value in cache_env(tmp_path).items():
        monkeypatch.setenv(key, value)  # the offline child reads these
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    asked = {}

    def model_info(self, repo_id, files_metadata=False, **kwargs):
        siblings = [SimpleNamespace(rfilename=name, size=1000) for name in GPT2_LIKE_REPO]
        return SimpleNamespace(siblings=siblings)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked[repo_id] = sorted(allow_patterns)
        return str(put_in_hub_cache(tmp_path / "hf" / "hub", repo_id, saved_tiny_model))

    def load_dataset(path, name=None, **kwargs):
        asked[path] = name
        put_squad_in_datasets_cache(tmp_path / "hf" / "datasets", squad_splits(), tmp_path / "squad")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    assert prefetch.main(["--model_name_or_path", FAKE_REPO, "--dataset_name", "squad"]) == 0
    out = capfd.readouterr().out
    assert asked[FAKE_REPO] == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert asked["rajpurkar/squad"] is None
    assert f"in the cache: model {FAKE_REPO}" in out and "in the cache: dataset squad" in out
    for line in (f"export HF_HOME={tmp_path / 'hf'}", "export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1"):
        assert line in out


def test_prefetch_without_internet_says_so(tmp_path):
    env = {**offline_env(tmp_path)}
    del env["HF_HUB_OFFLINE"], env["HF_DATASETS_OFFLINE"]
    [result] = workshop((["prefetch", "--model_name_or_path", "gpt2"], env, tmp_path))
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: --model_name_or_path gpt2: could not reach the hub (")
    assert line.endswith("run prefetch on a login node with internet (behind a proxy: export HTTPS_PROXY)")


def test_prefetch_refuses_a_shell_where_the_hub_is_offline(monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert prefetch.main(["--model_name_or_path", "gpt2"]) == 2
    assert "`env -u HF_HUB_OFFLINE workshop prefetch ...`" in capsys.readouterr().err


def test_a_full_cache_is_not_called_a_network_problem(monkeypatch):
    import errno

    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kwargs: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=name, size=1) for name in GPT2_LIKE_REPO]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(WorkshopError, match=r"^--model_name_or_path gpt2: could not write to the cache \(OSError: "
                                            r".*No space left on device\): point HF_HOME at a shared folder"):
        prefetch._download_repo("--model_name_or_path", "gpt2", with_weights=True)


def test_weight_files_follow_transformers_order():
    sharded = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "pytorch_model.bin", "consolidated.safetensors"]
    assert prefetch._weight_files(sharded) == sharded[:3]
    assert prefetch._weight_files(["pytorch_model.bin", "tf_model.h5"]) == ["pytorch_model.bin"]
    assert prefetch._weight_files(["tf_model.h5"]) == []


def test_the_printed_command_mirrors_the_job_flags():
    job = ModelArguments(model_name_or_path="gpt2-xl", from_config=True)
    assert hub.model_command(job) == "workshop prefetch --model_name_or_path gpt2-xl --from_config"
    assert hub.dataset_command("wikitext", "wikitext-2-raw-v1") == \
        "workshop prefetch --model_name_or_path none --dataset_name wikitext"
    assert hub.dataset_command("wikitext", "wikitext-103-raw-v1").endswith(
        "--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1")
