"""``workshop prefetch``: put the model, tokenizer and data set of a run into the Hugging Face caches.

Compute nodes on many clusters have no internet. Run this once where there is (the login node),
with the same model and data flags as the job, then run the job with the hub offline:

    workshop prefetch --model_name_or_path gpt2 --dataset_name squad     # login node
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1                        # it prints what to export
    sbatch baseline/baseline.slurm --model_name_or_path gpt2 --dataset_name squad

    workshop prefetch --check_only --model_name_or_path gpt2             # anywhere: is it all cached?

The caches live under $HF_HOME (default ~/.cache/huggingface): the compute nodes must see that
folder, so on a cluster point HF_HOME at a shared file system before both prefetch and the job.
The SQuAD metric needs nothing: workshop/evaluation.py computes exact match and F1 itself.
After downloading, everything is loaded back in a child process with the hub offline, exactly as
a job on a compute node will load it.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

from workshop import data_loader, shapes
from workshop import model as models
from workshop.config import DataArguments, ModelArguments
from workshop.errors import WorkshopError
from workshop.hub import DATASET_SOURCES, model_command

NOTHING_TO_FETCH = ("none", "builtin", "builtin_text")

# Top-level files a causal LM needs besides its weights: config.json, generation_config.json,
# tokenizer.json / tokenizer_config.json / special_tokens_map.json, BPE vocab.json + merges.txt,
# SentencePiece *.model, tiktoken files. Sub-folders (onnx/, flax, ...) are never needed.
CONFIG_AND_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")

# One weight format is enough, in the order transformers itself looks for them: repositories such
# as gpt2 also ship TensorFlow, Flax, ONNX and Rust copies that would triple the download.
WEIGHT_FORMATS = (("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
CACHE_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")  # exported to the job where the user set them


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workshop prefetch",
        description="Download a run's model, tokenizer and data set into the Hugging Face caches (run it on a "
                    "login node with internet), then check that they load with the hub offline. Give it the same "
                    "model and data flags as the job.")
    p.add_argument("--model_name_or_path", default="bigscience/bloom-560m",
                   help="Hub name of the model (weights, config and tokenizer). 'none' skips the model; tiny-gpt2, "
                        "tiny-bloom and local folders need nothing. Default: %(default)s, as workshop train.")
    p.add_argument("--tokenizer_name_or_path", default=None,
                   help="Tokenizer, when the job uses one other than the model's ('builtin' needs nothing).")
    p.add_argument("--from_config", action="store_true",
                   help="The job builds the model from its configuration (random weights): fetch the config and "
                        "tokenizer only, not the weights (gpt2-xl: 6 GB saved).")
    p.add_argument("--dataset_name", default="squad", choices=sorted(DATASET_SOURCES) + list(NOTHING_TO_FETCH),
                   help="Data set the job trains on; 'none' skips it. Default: %(default)s, as workshop train.")
    p.add_argument("--dataset_config_name", default=None,
                   help="Hub configuration; wikitext defaults to wikitext-2-raw-v1, as workshop train.")
    p.add_argument("--check_only", action="store_true",
                   help="Download nothing: check that everything loads with the hub offline, as on a compute node. "
                        "Run it inside a job to see what is missing.")
    return p


# --------------------------------------------------------------------------------- what to fetch
def from_hub(name: str | None) -> bool:
    """A hub repository id, as opposed to nothing, a model built from a config, or a local folder."""
    return bool(name) and name not in NOTHING_TO_FETCH and name not in shapes.TINY_MODELS and not os.path.isdir(name)


def tokenizer_name(args) -> str | None:
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    return None if args.model_name_or_path in shapes.TINY_MODELS else args.model_name_or_path


def dataset_source(args) -> tuple[str, str | None] | None:
    if args.dataset_name not in DATASET_SOURCES:
        return None
    path, default_config = DATASET_SOURCES[args.dataset_name]
    # As workshop train: SQuAD has one configuration and ignores --dataset_config_name.
    return path, (args.dataset_config_name or default_config) if default_config else None


def _weight_files(files: list[str]) -> list[str]:
    for single, index, shards in WEIGHT_FORMATS:
        if index in files:
            return [index] + fnmatch.filter(files, shards)
        if single in files:
            return [single]
    return []


def _config_and_tokenizer_files(files: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and f.endswith(CONFIG_AND_TOKENIZER_SUFFIXES)]


def _hub_error(flag: str, name: str, error: Exception) -> WorkshopError:
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return WorkshopError(f"{flag} {name} is gated: accept its licence on https://huggingface.co/{name}, then log "
                             "in on this machine (`hf auth login` or export HF_TOKEN) and run prefetch again")
    if isinstance(error, (RepositoryNotFoundError, HFValidationError)):
        return WorkshopError(f"{flag} {name} is not a repository on the hub: check the spelling (e.g. gpt2, "
                             "bigscience/bloom-560m), log in for a private one, or give a local folder")
    return _cache_error(flag, name, error) or _unreachable(flag, name, error)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def _unreachable(flag: str, name: str, error: Exception) -> WorkshopError:
    return WorkshopError(f"{flag} {name}: could not reach the hub ({_reason(error)}): run prefetch on a login node "
                         "with internet (behind a proxy: export HTTPS_PROXY)")


def _cache_error(flag: str, name: str, error: Exception) -> WorkshopError | None:
    """A full or read-only cache folder, which is not a network problem and has another fix."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        return WorkshopError(f"{flag} {name}: could not write to the cache ({_reason(error)}): point HF_HOME at a "
                             "shared folder with space that you can write to, before prefetch and the job")
    return None


def _download_repo(flag: str, name: str, with_weights: bool) -> None:
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        siblings = api.model_info(name, files_metadata=True).siblings or []
        sizes = {s.rfilename: s.size or 0 for s in siblings}
        wanted = _config_and_tokenizer_files(list(sizes))
        if with_weights:
            weights = _weight_files(list(sizes))
            if not weights:
                raise WorkshopError(f"{flag} {name} has no model.safetensors or pytorch_model.bin on the hub: use a "
                                    "model with PyTorch weights, or --from_config to train from random weights")
            wanted += [w for w in weights if w not in wanted]
        print(f"{flag} {name}: {len(wanted)} files, {sum(sizes[f] for f in wanted) / 1e6:.1f} MB", flush=True)
        # Exact file names as patterns: nothing else from the repository comes down.
        huggingface_hub.snapshot_download(name, allow_patterns=wanted)
    except WorkshopError:
        raise
    except Exception as e:  # network, authentication, disk: one line that says which
        raise _hub_error(flag, name, e) from None


def _download_dataset(dataset: str, path: str, config: str | None) -> None:
    import datasets

    print(f"--dataset_name {dataset}: {path}" + (f" ({config})" if config else ""), flush=True)
    try:
        # Fills both caches: the hub cache with the parquet files and HF_DATASETS_CACHE with the
        # prepared Arrow tables, which is what load_dataset reads when the hub is offline.
        datasets.load_dataset(path, config)
    except Exception as e:
        raise _cache_error("--dataset_name", dataset, e) or _unreachable("--dataset_name", dataset, e) from None


def download(args) -> None:
    tokenizer = tokenizer_name(args)
    if from_hub(args.model_name_or_path):
        _download_repo("--model_name_or_path", args.model_name_or_path, with_weights=not args.from_config)
    if from_hub(tokenizer) and tokenizer != args.model_name_or_path:
        _download_repo("--tokenizer_name_or_path", tokenizer, with_weights=False)
    source = dataset_source(args)
    if source:
        _download_dataset(args.dataset_name, *source)


# ------------------------------------------------------------------------------------ the check
def offline_flags() -> tuple[bool, bool]:
    """(hub offline, datasets offline) as the libraries decided at import time (they read the
    variables once; HF_HUB_OFFLINE=1 makes both offline, HF_DATASETS_OFFLINE only the second)."""
    import datasets
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE), bool(datasets.config.HF_HUB_OFFLINE)


def _check_weights(name: str, command_line: str) -> str:
    import huggingface_hub

    folder = Path(huggingface_hub.snapshot_download(name, local_files_only=True))
    files = [p.name for p in folder.iterdir()]
    weights = _weight_files(files)
    if weights and weights[0].endswith(".index.json"):  # sharded: every shard the index names
        weights = sorted(set(json.loads((folder / weights[0]).read_text())["weight_map"].values()))
    missing = [w for w in weights if not (folder / w).is_file()]
    if not weights or missing:
        what = ", ".join(missing) or "model.safetensors or pytorch_model.bin"
        raise WorkshopError(f"--model_name_or_path {name}: the weights ({what}) are not in the local cache: run "
                            f"`{command_line}` on a login node with internet")
    return ", ".join(weights)


def check(args) -> list[str]:
    """Load everything the way a job does; one line per item found. Assumes the hub is offline."""
    found = []
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path,
                                tokenizer_name_or_path=args.tokenizer_name_or_path, from_config=args.from_config)
    model_needed = args.model_name_or_path not in NOTHING_TO_FETCH + shapes.TINY_MODELS
    if model_needed or from_hub(tokenizer_name(args)):
        tokenizer = models.load_tokenizer(model_args)
        found.append(f"tokenizer {tokenizer_name(args) or 'builtin'} ({len(tokenizer)} tokens)")
        if model_needed:
            config = models.model_config(model_args, tokenizer)
            weights = "none needed (--from_config)" if args.from_config else (
                "local folder" if not from_hub(args.model_name_or_path)
                else _check_weights(args.model_name_or_path, model_command(model_args)))
            found.append(f"model {args.model_name_or_path} ({config.model_type}, weights: {weights})")
    if dataset_source(args):
        data_args = DataArguments(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name)
        _, train, evaluation = data_loader.load_raw(data_args, seed=0)
        found.append(f"dataset {args.dataset_name} ({len(train)} train, {len(evaluation)} validation records)")
    return found


def _run_offline_child(argv: list[str]) -> int:
    """This command with --check_only, in a fresh process with the hub offline: the libraries read
    the offline variables once at import, so only a new process sees what a compute node sees."""
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run([sys.executable, "-m", "workshop", "prefetch", "--check_only", *argv], env=env).returncode


def exports() -> list[str]:
    lines = [f"export {key}={os.environ[key]}" for key in CACHE_ENV if os.environ.get(key)]
    return lines + [f"export {key}={value}" for key, value in OFFLINE_ENV.items()]


def quiet_libraries() -> None:
    import datasets
    import transformers

    # "Using the latest cached version ..." is the expected path offline, not news.
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        if args.check_only:
            if not all(offline_flags()):
                return _run_offline_child([a for a in argv if a != "--check_only"])
            quiet_libraries()
            for line in check(args):
                print(f"  in the cache: {line}")
            print("everything this run needs is in the cache: it runs with " +
                  " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items()))
            return 0
        if any(offline_flags()):
            unset = " ".join(f"-u {k}" for k in (*OFFLINE_ENV, "TRANSFORMERS_OFFLINE") if k in os.environ)
            raise WorkshopError(f"the hub is offline in this shell: prefetch needs it: run `env {unset} workshop "
                                "prefetch ...` on a login node with internet")
        download(args)
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print("checking that it all loads with the hub offline, as on a compute node ...", flush=True)
    rc = _run_offline_child(argv)
    if rc != 0:
        return rc
    import datasets
    import huggingface_hub

    print(f"\ncaches: {huggingface_hub.constants.HF_HUB_CACHE} and {datasets.config.HF_DATASETS_CACHE}: the compute "
          "nodes must see these folders (set HF_HOME to a shared file system if they do not).\n"
          "In the job script, or in the shell you run sbatch from:\n" + "\n".join(f"  {line}" for line in exports()))
    return 0
