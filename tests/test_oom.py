"""GPU memory: a default batch made to fit before training; out of memory, one line and a run folder that says oom."""

import json

import torch

from conftest import REPO, read_json
from workshop import config, memory, train
from workshop.shapes import shape_from_config
from workshop.trainer import WorkshopTrainer


def test_out_of_memory_is_reported_in_one_line_and_recorded(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(WorkshopTrainer, "train", out_of_memory)
    run_dir = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of GPU memory"), err
    assert "`workshop estimate` predicts" in err[0]
    assert "--per_device_train_batch_size 4 --gradient_accumulation_steps 2" in err[0]  # tiny: 8 x 1
    assert "--gradient_checkpointing" in err[0] and "zero3_offload" in err[0]
    status = read_json(run_dir / "status.json")
    assert status["status"] == "oom" and status["error"] == err[0].removeprefix("error: ")


GIB = 1024**3
LONGEST = memory.LongestBatch(432)  # 432 tokens, every position a target


def test_the_default_micro_batch_is_halved_until_the_estimate_fits_the_gpu(tokenizer):
    from workshop import model as models

    argv = ["--model_name_or_path", "gpt2-medium", "--from_config", "--deepspeed", str(REPO / "ds_configs/zero2.json")]
    model_args, _, _, args = config.parse(argv)
    shape = shape_from_config(models.model_config(model_args, tokenizer))
    need = {micro: memory.predicted_memory(shape, model_args, args, LONGEST, micro).gpu_total_bytes
            for micro in (16, 8, 4, 2, 1)}
    assert need[16] > need[8] > need[4] > need[2] > need[1]
    assert memory.micro_batch_that_fits(shape, model_args, args, LONGEST, 2 * need[16]) == 16
    assert memory.micro_batch_that_fits(shape, model_args, args, LONGEST, (need[4] + need[8]) / 2 / 0.9) == 4
    assert memory.micro_batch_that_fits(shape, model_args, args, LONGEST, need[1] / 2) == 1  # nothing fits: 1
    assert 0.9 * (need[8] / 0.9) == need[8]  # exactly the share of the card: fits
    assert memory.micro_batch_that_fits(shape, model_args, args, LONGEST, need[8] / 0.9) == 8

    card = int(need[8] / 0.9) + 1
    assert train.fit_batch_to_gpu(argv, model_args, args, shape, LONGEST, card) == (8, 2)  # the same global batch 16
    # a batch given on the command line, or no GPU, is left as it is
    given = [*argv, "--per_device_train_batch_size", "16"]
    given_args = config.parse(given)
    assert train.fit_batch_to_gpu(given, given_args[0], given_args[3], shape, LONGEST, card) == (16, 1)
    assert train.fit_batch_to_gpu(argv, model_args, args, shape, LONGEST, None) == (16, 1)


def test_the_deepspeed_config_is_built_once_with_the_settled_batch(tmp_path):
    from transformers.integrations.deepspeed import deepspeed_config, unset_hf_deepspeed_config

    argv = ["--model_name_or_path", "gpt2-medium", "--from_config", "--deepspeed", str(REPO / "ds_configs/zero2.json")]
    *_, args = config.parse(argv)
    assert deepspeed_config() is None and args.deepspeed_plugin is None  # nothing built while the batch is open
    try:
        args.settle_batch(8, 2)
        assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) \
            == (8, 8, 2)
        ds = args.hf_deepspeed_config.config  # DeepSpeed's "auto" values follow the settled batch
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
            == (8, 2, 16)
        assert deepspeed_config() is ds and args.deepspeed_plugin is not None  # what zero.Init and accelerate read
    finally:
        unset_hf_deepspeed_config()


def test_a_batch_written_into_the_deepspeed_json_is_not_fitted(tmp_path, tokenizer):
    from workshop import model as models

    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds.update(train_batch_size=16, train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=1)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    argv = ["--model_name_or_path", "gpt2-medium", "--from_config", "--deepspeed", str(tmp_path / "ds.json")]
    model_args, _, _, args = config.parse(argv)
    shape = shape_from_config(models.model_config(model_args, tokenizer))
    assert train.fit_batch_to_gpu(argv, model_args, args, shape, LONGEST, 1024**3) == (16, 1)  # 1 GiB: none tried


def test_workshop_train_fits_the_default_batch_before_training(tmp_path, monkeypatch, capsys):
    # The tiny preset without its batch flags, on a pretend GPU just big enough for micro-batch 8 at the
    # run's own longest batch (the CPU has no card to measure).
    argv = ["--model_name_or_path", "tiny-gpt2", "--tokenizer_name_or_path", "builtin", "--dataset_name", "builtin",
            "--max_train_samples", "64", "--max_eval_samples", "16", "--answer_eval_samples", "0",
            "--max_seq_length", "128", "--num_train_epochs", "1", "--save_strategy", "no", "--no_save_model"]
    real_fit = train.fit_batch_to_gpu

    def fit_on_a_small_card(argv_, model_args, args, shape, batch, card):
        card = int(memory.predicted_memory(shape, model_args, args, batch, 8).gpu_total_bytes / 0.9) + 1
        return real_fit(argv_, model_args, args, shape, batch, card)

    monkeypatch.setattr(train, "fit_batch_to_gpu", fit_on_a_small_card)
    run_dir = tmp_path / "run"
    assert train.main([*argv, "--run_dir", str(run_dir)]) == 0
    assert "using --per_device_train_batch_size 8 --gradient_accumulation_steps 2" in capsys.readouterr().out
    metrics = read_json(run_dir / "metrics.json")
    assert (metrics["per_device_train_batch_size"], metrics["gradient_accumulation_steps"]) == (8, 2)
    assert metrics["global_batch_size"] == 16


# (DeepSpeed JSON or none, flags of both commands, `workshop estimate --zero_stage`, the micro-batch, what to try)
NEXT_STEPS = [
    (None, [], "none", 16, "try --per_device_train_batch_size 8 --gradient_accumulation_steps 2 (same global batch), "
     "then --gradient_checkpointing, then ds_configs/zero2.json on several GPUs, then CPU offload "
     "(ds_configs/zero3_offload.json)"),
    ("zero1.json", ["--per_device_train_batch_size", "4"], "1", 4, "try --per_device_train_batch_size 2 "
     "--gradient_accumulation_steps 2 (same global batch), then --gradient_checkpointing, then ds_configs/zero2.json, "
     "then CPU offload (ds_configs/zero3_offload.json)"),
    ("zero2.json", ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"], "2", 2,
     "try --per_device_train_batch_size 1 --gradient_accumulation_steps 6 (same global batch), then "
     "--gradient_checkpointing, then ds_configs/zero3.json, then CPU offload (ds_configs/zero3_offload.json)"),
    # micro-batch 1, checkpointing on, everything offloaded: only more GPUs are left; nothing is suggested twice
    ("zero3_offload_all.json", ["--per_device_train_batch_size", "1", "--gradient_checkpointing"], "3", 1,
     "try more GPUs (multi_node/: ZeRO-3 divides the model states over them)"),  # it does all the others
    ("zero2_offload.json", ["--per_device_train_batch_size", "1"], "2", 1,
     "try --gradient_checkpointing, then ds_configs/zero3.json"),  # offloads already
]


def test_the_out_of_memory_line_gives_the_cards_figures_the_estimate_and_the_next_step_for_each_stage(monkeypatch, capsys):
    """memory.oom_message on a pretend 80 GiB card that reserved 70.5 GiB; its prediction is what the
    `workshop estimate` command prints for the same setup (fp32: the run's precision on a CPU)."""
    from types import SimpleNamespace

    from workshop import estimate
    from workshop.shapes import model_shape

    shape, batch = model_shape("gpt2-medium"), memory.LongestBatch(432, 100)  # 100 targets per sample at most
    parsed, predicted = {}, {}
    for file, flags, stage, micro, _ in NEXT_STEPS:
        deepspeed = ["--deepspeed", str(REPO / "ds_configs" / file)] if file else []
        model_args, _, _, args = config.parse(["--model_name_or_path", "gpt2-medium", "--from_config", *flags, *deepspeed])
        parsed[file] = model_args, args
        capsys.readouterr()
        checkpointing = [flag for flag in flags if flag == "--gradient_checkpointing"]
        assert estimate.main(["--model", "gpt2-medium", "--zero_stage", stage, "--micro_batch", str(micro),
                              "--seq_len", "432", "--targets_per_sample", "100", "--precision", args.precision,
                              *checkpointing, "--json", *deepspeed]) == 0
        (row,) = json.loads(capsys.readouterr().out)["estimates"]
        assert memory.predicted_memory(shape, model_args, args, batch, micro).gib() == row  # every figure, host too
        predicted[file] = row["peak_allocated_gib"]
    assert len(set(predicted.values())) == len(NEXT_STEPS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: int(70.5 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=80 * GIB))
    for file, flags, stage, micro, advice in NEXT_STEPS:
        line = memory.oom_message(shape, *parsed[file], batch)
        assert line == (f"out of GPU memory (reserved 70.5 GiB of the card's 80.0 GiB; `workshop estimate` "
                        f"predicts {predicted[file]:.1f} GiB allocated for this setup): {advice}"), (file, line)
