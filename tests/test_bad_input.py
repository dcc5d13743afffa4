"""The catalogue of bad inputs (docs/bad-input.md): every entry has a test here, or names the other test file
that has it (tests/test_docs.py checks that each named test exists).

Each bad input stops `workshop train` with one line, ``error: <what is wrong>: <the fix>``, exit
status 2, before the model is built (so before any GPU time), and leaves earlier results alone:
every test runs against a logs root holding an earlier finished run and checks that the tree is
byte for byte the same afterwards (no new run folder, nothing changed in the old one).

Most cases call ``workshop.train.main`` in this process (a fraction of a second each). The checks
that come after DeepSpeed has started (host memory, NVMe folder, libaio) run in one child process,
so that DeepSpeed's process group never lives in the test process; one more child runs the real
``python -m workshop train`` to check the process exit status. No test touches the network.

Not repeated here: offline compute node with an empty cache (tests/test_offline.py) and running
out of GPU memory at run time (tests/test_oom.py); the catalogue names those tests.

    pytest tests/test_bad_input.py
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.ops.op_builder import AsyncIOBuilder  # noqa: F401  (sets DeepSpeed's env once, at import)

from conftest import REPO
from workshop import preflight, train

CONFIG_DIR = REPO / "ds_configs"
NO_HUB = "http://127.0.0.1:9"  # the discard port: any download attempt fails at once
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "ACCELERATE_USE_DEEPSPEED", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")


# ------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def make_earlier_run(root: Path) -> Path:
    """A finished run folder, as an earlier `workshop train` left it."""
    run = root / "local" / "earlier"
    (run / "model").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"run_id": "earlier", "final_train_loss": 1.23}) + "\n")
    (run / "status.json").write_text(json.dumps({"status": "completed", "error": None}) + "\n")
    (run / "model" / "config.json").write_text('{"model_type": "gpt2"}\n')
    return run


class Logs:
    def __init__(self, root: Path):
        self.root = root
        self.earlier = make_earlier_run(root)
        self.before = snapshot(root)

    def untouched(self) -> bool:
        return snapshot(self.root) == self.before


@pytest.fixture
def logs(tmp_path) -> Logs:
    return Logs(tmp_path / "logs")


@pytest.fixture(autouse=True)
def launcher_env():
    """init_env and the Trainer set RANK, WORLD_SIZE, MASTER_PORT, ... in os.environ: put the environment
    back as it was (left behind, they would make later tests' child processes start process groups)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved = dict(os.environ)
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)
    unset_hf_deepspeed_config()  # a parsed DeepSpeed config would make later model builds partition


def error_line(err: str) -> str:
    """The one `error: ...` line; nothing else on stderr but log lines, and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def stops(capsys, logs: Logs, flags: list[str], match: str, first: list[str] = (), code: int = 2) -> str:
    """`workshop train [first] --preset tiny --logs_root <logs> <flags>` stops with `match`, exit `code`,
    and leaves the logs root as it was."""
    argv = [*first, "--preset", "tiny", "--logs_root", str(logs.root), *flags]
    result = train.main(argv)
    err = capsys.readouterr().err
    line = error_line(err)
    assert err.strip() == line, err  # in this process, nothing else is printed before it
    assert result == code, (argv, line)
    assert re.search(match, line), (match, line)
    assert logs.untouched(), f"{argv} changed {logs.root}"
    return line


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ flags and settings
@pytest.mark.parametrize("flags, match", [
    pytest.param(["--learning_rat", "1e-4"], r"^error: unknown flag --learning_rat: did you mean --learning_rate\?$",
                 id="unknown_flag"),
    pytest.param(["--max_seq_length", "abc"], r"--max_seq_length.*: invalid int value: 'abc': see workshop train --help",
                 id="value_of_wrong_type"),
    pytest.param(["--learning_rate"], r"--learning_rate.*: expected one argument", id="value_missing"),
    pytest.param(["--eval_strategy", "sometimes"],
                 r"--eval_strategy sometimes: sometimes is not a valid IntervalStrategy, please select one of",
                 id="value_not_allowed"),
    pytest.param(["--learning_rate", "1e-4", "run.yaml"],
                 r"unexpected argument\(s\) \['run.yaml'\]: .* a settings file \(.json/.yaml\) goes first",
                 id="stray_argument"),
    pytest.param(["--preset", "huge"], r"--preset huge is not known: use one of tiny", id="unknown_preset"),
    pytest.param(["--stage", "zero4"], r"--stage zero4 is not known: use one of local, baseline", id="unknown_stage"),
    pytest.param(["--precision", "bf16"], r"--precision bf16 needs a GPU and none is visible: use --precision fp32",
                 id="bf16_without_gpu"),
    pytest.param(["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size 0 must be at least 1",
                 id="batch_size_zero"),
    pytest.param(["--num_train_epochs", "0"], r"--num_train_epochs 0.0 trains nothing", id="no_epochs"),
    pytest.param(["--profile_steps", "-1"], r"--profile_steps -1 must be at least 0 \(0: off\)$", id="negative_profile"),
    pytest.param(["--profile_first_step"], r"--profile_first_step profiles nothing without --profile_steps N",
                 id="profile_first_step_alone"),
    pytest.param(["--pad_to_multiple_of", "0"], r"--pad_to_multiple_of 0 must be at least 1", id="pad_multiple_zero"),
    # Ranges, each checked while the flags are read (config.RANGES). Before, the first five ended in a
    # traceback after the run folder was written, the others trained on as if the flag had not been given.
    pytest.param(["--learning_rate", "-1"], r"^error: --learning_rate -1.0 must be above 0 \(e.g. 5e-5\)$",
                 id="negative_learning_rate"),
    pytest.param(["--seed", "4294967296"], r"--seed 4294967296 must be at least 0 and at most 4294967295$",
                 id="seed_numpy_refuses"),
    pytest.param(["--adam_beta2", "1"], r"--adam_beta2 1.0 must be at least 0 and below 1$", id="beta_of_one"),
    pytest.param(["--eval_accumulation_steps", "0"], r"--eval_accumulation_steps 0 must be at least 1$",
                 id="eval_accumulation_zero"),
    pytest.param(["--dataloader_num_workers", "-1"], r"--dataloader_num_workers -1 must be at least 0 \(0: load in",
                 id="negative_workers"),
    pytest.param(["--learning_rate", "0"], r"--learning_rate 0.0 must be above 0", id="learning_rate_zero"),
    pytest.param(["--max_steps", "0"], r"--max_steps 0 must be at least 1 \(or -1: train for --num_train_epochs\)$",
                 id="max_steps_zero"),
    pytest.param(["--weight_decay", "-0.1"], r"--weight_decay -0.1 must be at least 0 \(0: none\)$",
                 id="negative_weight_decay"),
    pytest.param(["--max_grad_norm", "-1"], r"--max_grad_norm -1.0 must be at least 0 \(0: no clipping\)$",
                 id="negative_grad_norm"),
    pytest.param(["--label_smoothing_factor", "1.5"], r"--label_smoothing_factor 1.5 must be at least 0 and below 1",
                 id="ratio_above_one"),
    pytest.param(["--logging_steps", "-4"], r"--logging_steps -4.0 must be above 0 \(below 1: a fraction of the "
                                            r"training steps\)$", id="negative_interval"),
    pytest.param(["--save_strategy", "steps", "--save_steps", "2.5"],
                 r"--save_steps 2.5 must be a whole number from 1 on \(below 1: a fraction", id="interval_not_whole"),
    pytest.param(["--warmup_steps", "1.5"], r"--warmup_steps 1.5 must be a whole number from 1 on", id="warmup_not_whole"),
    pytest.param(["--save_total_limit", "0"], r"--save_total_limit 0 must be at least 1$", id="keep_no_checkpoint"),
    pytest.param(["--ddp_timeout", "0"], r"--ddp_timeout 0 must be at least 1 \(seconds\)$", id="timeout_zero"),
    pytest.param(["--max_eval_samples", "-1"], r"--max_eval_samples -1 must be at least 1$", id="negative_samples"),
    pytest.param(["--answer_eval_samples", "-1"], r"--answer_eval_samples -1 must be at least 0 \(0 skips",
                 id="negative_answers"),
    pytest.param(["--learning_rate", "nan"], r"^error: --learning_rate nan must be a finite number", id="nan"),
    pytest.param(["--num_train_epochs", "inf"], r"--num_train_epochs inf must be a finite number", id="infinite"),
    pytest.param(["--train_sampling_strategy", "shuffled"], r"--train_sampling_strategy shuffled is not known: use "
                 r"random, sequential, group_by_length, batch_rebalance$", id="unknown_sampling"),
    pytest.param(["--attn_implementation", "fast"], r"--attn_implementation fast is not known: use sdpa, eager, "
                 r".*, or a hub kernel \(org/name\)$", id="unknown_attention"),
    pytest.param(["--report_to", "tensorbored"], r"--report_to tensorbored is not known: use none, all, or one of "
                 r".*tensorboard", id="unknown_report_to"),

    # Each of these ended in a traceback once the run folder was written (or, the empty ones and the flags
    # not read, ran on as if the flag had not been given, --logs_root "" into the current folder).
    pytest.param(["--tokenizer_name_or_path", ""], r"^error: --tokenizer_name_or_path is empty: give a value, or leave "
                 r"the flag out for its default$", id="empty_name"),
    pytest.param(["--logs_root", ""], r"^error: --logs_root is empty", id="empty_path"),
    pytest.param(["--resume_from_checkpoint", " "], r"^error: --resume_from_checkpoint is empty", id="empty_trainer_path"),
    pytest.param(["--output_dir", "ckpt"], r"^error: --output_dir is not read by workshop train \(checkpoints go to "
                 r"<run folder>/checkpoints.*\): drop it$", id="flag_not_read"),
    pytest.param(["--preprocessing_num_workers=4"], r"^error: --preprocessing_num_workers is not read by workshop "
                 r"train \(the data is tokenised in one batched call", id="retired_flag"),
    pytest.param(["--optim", "adamw_torch_4bit"], r"^error: --optim adamw_torch_4bit cannot be used here \(You need to "
                 r"have `torchao>=0.4.0`.*\): install what it needs, or leave --optim out", id="optimizer_not_installed"),
    pytest.param(["--optim", "sgd", "--optim_args", "momentum"], r"^error: --optim_args momentum: give key=value "
                 r"pairs separated by commas", id="optimizer_args_not_pairs"),
    pytest.param(["--lr_scheduler_type", "warmup_stable_decay"], r"^error: --lr_scheduler_type warmup_stable_decay: "
                 r"get_wsd_schedule\(\) missing .*'num_decay_steps': give the schedule's arguments as JSON in "
                 r"--lr_scheduler_kwargs$", id="schedule_needs_arguments"),
    pytest.param(["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"min_lr": 0}'],
                 r"--lr_scheduler_type cosine --lr_scheduler_kwargs '\{\"min_lr\": 0\}': .*unexpected keyword "
                 r"argument 'min_lr'", id="schedule_argument_unknown"),
    pytest.param(["--lr_scheduler_kwargs", "min_lr=0"], r"^error: --lr_scheduler_kwargs min_lr=0 is not a JSON object",
                 id="kwargs_not_json"),
    pytest.param(["--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"reentrant": false}'],
                 r"--gradient_checkpointing_kwargs: reentrant is not an argument of torch.utils.checkpoint: use "
                 r"use_reentrant, ", id="checkpointing_argument_unknown"),
    pytest.param(["--gradient_checkpointing_kwargs", '{"use_reentrant": false}'], r"--gradient_checkpointing_kwargs "
                 r"does nothing without --gradient_checkpointing", id="checkpointing_kwargs_alone"),
    pytest.param(["--torch_compile_mode", "fastest"], r"^error: --torch_compile_mode fastest is not known: use "
                 r"default, .*max-autotune$", id="unknown_compile_mode"),
    pytest.param(["--torch_compile_backend", "nope"], r"^error: --torch_compile_backend nope is not known: use no, "
                 r"eager, .*inductor", id="unknown_compile_backend"),
    pytest.param(["--attn_implementation", "flash_attention_2"], r"^error: --attn_implementation flash_attention_2 "
                 r"cannot run here \(the package for FlashAttention2 doesn't seem to be installed\): install it on a "
                 r"GPU node, or use sdpa$", id="attention_not_installed"),
    pytest.param(["--load_best_model_at_end", "--save_strategy", "no"], r"but found - Evaluation strategy: .*EPOCH - "
                 r"Save strategy: .*NO: see workshop train --help$", id="trainer_message_of_several_lines"),
])
def test_bad_flags(capsys, logs, flags, match):
    stops(capsys, logs, flags, match)


def test_report_to_an_integration_not_installed(capsys, logs, monkeypatch):
    """wandb known to transformers but not installed here: before, the Trainer failed once config.json was written."""
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    stops(capsys, logs, ["--report_to", "wandb"],
          r"--report_to wandb needs the wandb package, which is not installed: pip install wandb, or drop --report_to$")


def test_packages_the_choices_need(monkeypatch):
    """Which --optim and --attn_implementation choices need a package that is not installed here, as the checks
    see it: the optimizers of the Trainer's list with extras, the flash attentions. Pinned so that a choice
    which starts to pass unchecked (a transformers upgrade that moves a check) shows here."""
    from transformers.training_args import OptimizerNames
    from transformers.utils import is_kernels_available

    from workshop import config
    from workshop.errors import WorkshopError

    if is_kernels_available():
        pytest.skip("the kernels package stands in for flash attention")
    refused = set()
    for name in [o.value for o in OptimizerNames] + ["flash_attention_2", "flash_attention_3", "org/kernel"]:
        flag = "--attn_implementation" if "attention" in name or "/" in name else "--optim"
        extra = ["--optim_target_modules", "all-linear"] if name.startswith(("galore", "apollo")) else []
        try:
            config.parse(["--preset", "tiny", flag, name, *extra])
        except WorkshopError:
            refused.add(name)
    installed_here = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"}
    assert set(OptimizerNames) - refused == installed_here  # bitsandbytes, torchao, galore, ... are extras
    assert {"flash_attention_2", "flash_attention_3", "org/kernel"} <= refused


def test_an_optimizer_that_needs_the_model_is_not_refused_for_its_absence(monkeypatch):
    """GaLore, APOLLO and LOMO, installed, reach for the model's modules once their package and flags are
    checked: the stand-in model ends the check there, passing, instead of refusing a run that would work."""
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    from workshop import config

    monkeypatch.setitem(trainer_optimizer._OPTIMIZER_HANDLERS, OptimizerNames.LOMO,
                        lambda ctx: (None, {"params": list(ctx.model.named_parameters())}))
    assert config.parse(["--preset", "tiny", "--optim", "lomo"])[3].optim == "lomo"


def test_the_edges_of_each_range_are_allowed():
    """The values at the edge of each range, and the "off" values, are settings, not mistakes."""
    from workshop import config

    for flags in (["--weight_decay", "0", "--max_grad_norm", "0", "--warmup_steps", "0.5", "--logging_steps", "0.5"],
                  ["--max_steps", "-1", "--seed", "0", "--data_seed", "4294967295", "--label_smoothing_factor", "0"],
                  ["--max_steps", "3", "--num_train_epochs", "0", "--adam_beta1", "0", "--dataloader_num_workers", "0"],
                  ["--answer_eval_samples", "0", "--profile_steps", "0", "--save_total_limit", "1", "--eval_delay", "0"],
                  ["--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "0.25"],
                  ["--max_seq_length", "1", "--ddp_timeout", "1", "--warmup_steps", "1", "--learning_rate", "1e-12"],
                  ["--train_sampling_strategy", "sequential", "--attn_implementation", "eager", "--report_to", "none"]):
        config.parse(["--preset", "tiny", *flags])


def test_help_works(capsys):
    """Every message about a flag ends in "see workshop train --help": it must print, not crash."""
    with pytest.raises(SystemExit) as exit_status:
        train.main(["--help"])
    assert exit_status.value.code == 0
    assert "--train_sampling_strategy" in capsys.readouterr().out


def test_settings_file_that_is_not_yaml(capsys, logs, tmp_path):
    path = write(tmp_path / "run.yaml", "max_seq_length: [64\nnum_train_epochs: 1\n")
    stops(capsys, logs, [], r"settings file .*run.yaml is not valid JSON/YAML \(.*\): fix the file", first=[path])


def test_settings_file_that_is_not_json(capsys, logs, tmp_path):
    path = write(tmp_path / "run.json", '{"max_seq_length": 64,}')
    stops(capsys, logs, [], r"settings file .*run.json is not valid JSON/YAML", first=[path])


def test_settings_file_missing(capsys, logs, tmp_path):
    stops(capsys, logs, [], r"settings file .*nope.yaml does not exist: check the path",
          first=[str(tmp_path / "nope.yaml")])


def test_resume_from_a_folder_that_is_no_checkpoint(capsys, logs, tmp_path):
    stops(capsys, logs, ["--resume_from_checkpoint", str(tmp_path / "checkpoint-9")],
          r"--resume_from_checkpoint .*checkpoint-9 is not a checkpoint folder \(no trainer_state.json\): give "
          r"<run folder>/checkpoints/checkpoint-N, or --run_dir of the stopped run")


# ------------------------------------------------------------------------------------------ model
def test_unknown_model_path(capsys, logs, tmp_path):
    stops(capsys, logs, ["--model_name_or_path", str(tmp_path / "no-such-model")],
          r"--model_name_or_path .*no-such-model could not be loaded \(.*\): check the name or the local path")


def test_unknown_tokenizer(capsys, logs, tmp_path):
    stops(capsys, logs, ["--tokenizer_name_or_path", str(tmp_path / "no-such-tokenizer")],
          r"--tokenizer_name_or_path .*no-such-tokenizer could not be loaded")


def test_sequence_longer_than_the_models_positions(capsys, logs):
    stops(capsys, logs, ["--max_seq_length", "2048"],
          r"--max_seq_length 2048 is longer than the model's 512 positions: use --max_seq_length 512 or less")


# ------------------------------------------------------------------------------------------- data
def test_unknown_dataset_name(capsys, logs):
    stops(capsys, logs, ["--dataset_name", "imagenet"],
          r"--dataset_name imagenet is not known: use one of squad, wikitext, builtin, builtin_text, or --train_file")


def test_missing_data_file(capsys, logs, tmp_path):
    stops(capsys, logs, ["--train_file", str(tmp_path / "train.jsonl")], r"--train_file .*train.jsonl does not exist")


def test_data_file_of_unknown_kind(capsys, logs, tmp_path):
    path = write(tmp_path / "train.csv", "question,context,answer\n")
    stops(capsys, logs, ["--train_file", path], r"--train_file .*train.csv: use a .json/.jsonl \(SQuAD format\)")


def test_unreadable_data_file(capsys, logs, tmp_path, monkeypatch):
    path = write(tmp_path / "train.jsonl", "{}\n")
    real_access = os.access
    # chmod 000 does not stop root (CI containers): refuse reading this one file instead.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == path else real_access(p, mode, **kw))
    stops(capsys, logs, ["--train_file", path], r"--train_file .*train.jsonl is not readable: check its permissions")


def test_bad_json_line(capsys, logs, tmp_path):
    good = json.dumps({"question": "q?", "context": "c a", "answers": {"text": ["a"], "answer_start": [2]}})
    path = write(tmp_path / "train.jsonl", good + "\n" + '{"question": "q?", "context": \n')
    stops(capsys, logs, ["--train_file", path], r"train.jsonl line 2 is not valid JSON \(.*\): fix that line")


def test_bad_json_file(capsys, logs, tmp_path):
    path = write(tmp_path / "train.json", '[{"question": "q?",]')
    stops(capsys, logs, ["--train_file", path], r"train.json is not valid JSON \(.* at line 1\): fix the file")


def test_squad_record_missing_keys(capsys, logs, tmp_path):
    path = write(tmp_path / "train.jsonl", json.dumps({"question": "q?", "context": "c"}) + "\n")
    stops(capsys, logs, ["--train_file", path],
          r"record 1 of .*train.jsonl lacks answers: SQuAD format needs question, context and answers")


def test_empty_data_file(capsys, logs, tmp_path):
    path = write(tmp_path / "train.jsonl", "\n")
    stops(capsys, logs, ["--train_file", path], r"--train_file .*train.jsonl holds no samples")


def test_every_sample_too_long(capsys, logs):
    stops(capsys, logs, ["--max_seq_length", "8"],
          r"no samples left after tokenisation \(--max_train_samples / the training data\): raise --max_seq_length")


# ---------------------------------------------------------------------------------- output folder
def test_run_folder_holding_a_finished_run(capsys, logs):
    stops(capsys, logs, ["--run_dir", str(logs.earlier)],
          r"--run_dir .*earlier already holds a finished run: give a new --run_dir or remove it")


def test_run_dir_is_a_file(capsys, logs):
    stops(capsys, logs, ["--run_dir", str(logs.earlier / "metrics.json")], r"--run_dir .*metrics.json is a file")


def test_run_dir_inside_a_file(capsys, logs):
    stops(capsys, logs, ["--run_dir", str(logs.earlier / "metrics.json" / "run")],
          r"--run_dir .*: .*metrics.json is a file, not a folder: choose another --run_dir or --logs_root")


def test_logs_root_is_a_file(capsys, logs, tmp_path):
    afile = write(tmp_path / "logs.txt", "")
    line = stops(capsys, logs, ["--logs_root", afile], r"logs.txt is a file, not a folder")
    assert Path(afile).read_text() == ""


def test_run_dir_in_a_read_only_folder(capsys, logs):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o500 folder anyway; test_run_dir_not_writable covers the check")
    locked = logs.root / "locked"
    locked.mkdir()
    logs.before = snapshot(logs.root)
    locked.chmod(0o500)
    try:
        stops(capsys, logs, ["--run_dir", str(locked / "run")], r"locked is not writable: choose a folder you can write")
    finally:
        locked.chmod(0o700)


def test_run_dir_not_writable(capsys, logs, monkeypatch):
    """The same check, as root too: the folder says it cannot be written (a read-only mount, an ACL)."""
    locked = logs.root / "locked"
    locked.mkdir()
    logs.before = snapshot(logs.root)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (False if Path(p) == locked and mode & os.W_OK
                                                             else real_access(p, mode, **kw)))
    stops(capsys, logs, ["--run_dir", str(locked / "run")],
          r"--run_dir .*locked/run: .*locked is not writable: choose a folder you can write to \(--run_dir or --logs_root\)")


def test_output_disk_full(capsys, logs, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0))
    stops(capsys, logs, [], r"--run_dir .*: .*/logs/local has 0.0 MiB free but this run writes at least [\d.]+ MiB \(a "
                            r"checkpoint .* and the final model of 0.2M parameters\): free some space")


# ------------------------------------------------------------------------------------------- GPUs
@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (9, 0)][i])


def test_more_processes_than_gpus(capsys, logs, two_gpus, monkeypatch):
    """torchrun --nproc_per_node 4 on a node where 2 GPUs are visible."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    stops(capsys, logs, [], r"^error: 4 training processes on this node but only 2 GPU\(s\) visible "
                            r"\(CUDA_VISIBLE_DEVICES=0,1\): start at most 2 \(torchrun --nproc_per_node 2, "
                            r"NPROC_PER_NODE=2 for the job scripts\) or ask SLURM for 4 \(#SBATCH --gres=gpu:4\)$")


def test_process_count_check_passes_when_gpus_suffice_or_on_cpu(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    preflight.check_gpu_count()
    monkeypatch.setenv("LOCAL_SIZE", "3")  # the deepspeed launcher's name, when torchrun's is absent
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(train.WorkshopError, match="3 training processes on this node but only 2"):
        preflight.check_gpu_count()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU processes (gloo) need no GPU
    preflight.check_gpu_count()


def test_cuda_arch_list_deepspeed_cannot_parse_is_fixed(two_gpus, monkeypatch, caplog):
    """TORCH_CUDA_ARCH_LIST=9.0a (some H100 images) crashes DeepSpeed's op builds; the
    pre-flight replaces it with the visible GPUs' list and says so (the run goes on)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with caplog.at_level(logging.WARNING, logger="workshop.preflight"):
        assert preflight.fix_cuda_arch_list() == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "TORCH_CUDA_ARCH_LIST=9.0a cannot be parsed by DeepSpeed's op builder; using 9.0" in caplog.text


# ------------------------------------------------------------------- DeepSpeed JSON (checked at parse)
def ds_json(tmp_path, **sections) -> str:
    config = json.loads((CONFIG_DIR / "zero2.json").read_text())
    config.update(sections)
    return write(tmp_path / "ds.json", json.dumps(config))


def test_ds_batch_size_written_for_another_gpu_count(capsys, logs, tmp_path):
    """train_batch_size 32 hard-coded for 4 GPUs x micro-batch 8, then run on one."""
    stops(capsys, logs, ["--deepspeed", ds_json(tmp_path, train_batch_size=32)],
          r"--deepspeed .*ds.json: train_batch_size=32 but --per_device_train_batch_size x "
          r"--gradient_accumulation_steps x 1 processes gives 8. Set these to \"auto\" in the JSON")


def test_ds_values_that_contradict_the_flags(capsys, logs, tmp_path):
    path = ds_json(tmp_path, gradient_clipping=1.0, optimizer={"type": "AdamW", "params": {"lr": 5e-5}})
    stops(capsys, logs, ["--deepspeed", path, "--max_grad_norm", "0.5"],
          r"--deepspeed .*ds.json: gradient_clipping=1.0 but --max_grad_norm gives 0.5; optimizer.params.lr=5e-05 "
          r"but --learning_rate gives 0.003. Set these to \"auto\"")


def test_ds_misspelled_key(capsys, logs, tmp_path):
    """DeepSpeed would ignore this key silently."""
    stops(capsys, logs, ["--deepspeed", ds_json(tmp_path, zero_optimization={"stage": 2, "overlap_com": True})],
          r"unknown key 'zero_optimization.overlap_com' \(did you mean 'zero_optimization.overlap_comm'\?\)")


def test_ds_config_missing(capsys, logs, tmp_path):
    stops(capsys, logs, ["--deepspeed", str(tmp_path / "zero9.json")],
          r"--deepspeed .*zero9.json: no such file; pick one of ds_configs/\*.json")


def test_ds_config_not_json(capsys, logs, tmp_path):
    path = write(tmp_path / "ds.json", '{\n  "zero_optimization": {"stage": 2}, // ZeRO-2\n}\n')
    stops(capsys, logs, ["--deepspeed", path], r"ds.json: invalid JSON at line 2 column \d+: .*no comments")


def test_nvme_config_without_nvme_path(capsys, logs):
    stops(capsys, logs, ["--deepspeed", str(CONFIG_DIR / "zero3_nvme.json")],
          r"zero3_nvme.json offloads to NVMe: pass --nvme_path DIR")


def test_nvme_path_without_nvme_config(capsys, logs, tmp_path):
    stops(capsys, logs, ["--nvme_path", str(tmp_path)], r"--nvme_path is only read by an NVMe offload config")


# ---------------------------------------------------- after DeepSpeed starts: in one child process
# Each case: flags after `--preset tiny`, and what the child fakes (a full disk under a folder, the host
# memory available, libaio missing). gpt2's shape (124M parameters, built from its config on the meta
# device, nothing downloaded) gives sizes in whole GiB.
GPT2_SHAPE = ["--model_name_or_path", "gpt2", "--from_config", "--tokenizer_name_or_path", "builtin",
              "--save_strategy", "no", "--no_save_model"]
CHILD = r"""
import contextlib, io, json, os, shutil, sys, tempfile
from unittest import mock
import psutil
import torch.distributed as dist
from deepspeed.ops.op_builder import AsyncIOBuilder
from workshop import cli

GIB = 1024**3
real_disk_usage, real_memory = shutil.disk_usage, psutil.virtual_memory
results = {}
for name, case in json.loads(sys.argv[1]).items():
    with contextlib.ExitStack() as stack:
        if "full_disk" in case:
            folder = case["full_disk"]
            stack.enter_context(mock.patch("shutil.disk_usage", lambda path: real_disk_usage(path)._replace(
                free=GIB if os.path.abspath(path).startswith(folder) else real_disk_usage(path).free)))
        if "host_memory_gib" in case:
            available = int(case["host_memory_gib"] * GIB)
            stack.enter_context(mock.patch("psutil.virtual_memory", lambda: real_memory()._replace(available=available)))
        if "read_only" in case:  # root writes anywhere: a read-only mount, as the write probe sees it
            folder, real_temporary_file = case["read_only"], tempfile.TemporaryFile

            def temporary_file(*args, dir=None, **kwargs):
                if dir is not None and os.path.abspath(dir).startswith(folder):
                    raise PermissionError(13, "Permission denied")
                return real_temporary_file(*args, dir=dir, **kwargs)

            stack.enter_context(mock.patch("tempfile.TemporaryFile", temporary_file))
        if case.get("no_libaio"):
            stack.enter_context(mock.patch.object(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False))
        err = stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        code = cli.main(["train", *case["argv"]])
    results[name] = {"code": code, "stderr": err.getvalue(), "process_group_left": not dist.is_initialized()}
print("RESULTS " + json.dumps(results))
"""


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "HF_ENDPOINT": NO_HUB, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def after_deepspeed_starts(tmp_path_factory):
    """{case: (Logs, child's result)}, plus the real `python -m workshop train` exit status, run at once."""
    tmp = tmp_path_factory.mktemp("ds_resources")
    nvme = tmp / "nvme"
    nvme.mkdir()
    (tmp / "nvme_file").write_text("")
    nvme_config = ["--deepspeed", str(CONFIG_DIR / "zero3_nvme.json")]
    cases = {
        "nvme_missing": {"argv": nvme_config + ["--nvme_path", str(tmp / "missing")]},
        "nvme_not_a_folder": {"argv": nvme_config + ["--nvme_path", str(tmp / "nvme_file")]},
        "nvme_full": {"argv": GPT2_SHAPE + nvme_config + ["--nvme_path", str(nvme)], "full_disk": str(nvme)},
        "nvme_read_only": {"argv": nvme_config + ["--nvme_path", str(nvme)], "read_only": str(nvme)},
        "no_libaio": {"argv": nvme_config + ["--nvme_path", str(nvme)], "no_libaio": True},
        "host_memory": {"argv": GPT2_SHAPE + ["--deepspeed", str(CONFIG_DIR / "zero3_offload_all.json")],
                        "host_memory_gib": 1.0},
    }
    logs = {name: Logs(tmp / name / "logs") for name in [*cases, "cli"]}
    for name, case in cases.items():
        case["argv"] = ["--preset", "tiny", "--logs_root", str(logs[name].root), *case["argv"]]
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=tmp, env=child_env(),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cli = subprocess.Popen([sys.executable, "-m", "workshop", "train", "--preset", "tiny", "--logs_root",
                            str(logs["cli"].root), *nvme_config, "--nvme_path", str(tmp / "missing")],
                           cwd=tmp, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    results = json.loads(next(line for line in out.splitlines() if line.startswith("RESULTS "))[len("RESULTS "):])
    cli_out, cli_err = cli.communicate(timeout=300)
    results["cli"] = {"code": cli.returncode, "stderr": cli_err}
    return {name: (logs[name], results[name]) for name in logs}


@pytest.mark.parametrize("case, match", [pytest.param(*c, id=c[0]) for c in [
    ("nvme_missing", r"--nvme_path .*/missing does not exist; create it \(mkdir -p .*\) on the node's local NVMe"),
    ("nvme_not_a_folder", r"--nvme_path .*/nvme_file is not a folder; pass a folder on the node's local NVMe disk"),
    ("nvme_full", r"--nvme_path .*/nvme has 1.0 GiB free but ZeRO-Infinity will write about 2.\d GiB there; "
                  r"free some space or pass a larger disk"),
    ("nvme_read_only", r"--nvme_path .*/nvme is not writable \(Permission denied\); pass a folder you own"),
    ("no_libaio", r"zero3_nvme.json offloads to NVMe, which needs DeepSpeed's async_io op and so libaio: "
                  r"apt-get install libaio-dev \(dnf install libaio-devel"),
    ("host_memory", r"zero3_offload_all.json offloads about 2.\d GiB to host memory but this node has 1.0 GiB "
                    r"available; ask for more \(#SBATCH --mem\)"),
    ("cli", r"--nvme_path .*/missing does not exist"),
]])
def test_checks_once_deepspeed_has_started(after_deepspeed_starts, case, match):
    logs, result = after_deepspeed_starts[case]
    line = error_line(result["stderr"])
    assert result["code"] == 2, line  # for "cli": the exit status of the process itself
    assert re.search(match, line), (match, line)
    assert logs.untouched()
    if case != "cli":  # in process: DeepSpeed's group is destroyed on the way out (left, NCCL warns after the error)
        assert result["process_group_left"]
