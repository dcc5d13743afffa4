import json

import pytest

from workshop import config, train
from workshop.errors import WorkshopError


def test_defaults_are_the_workshops():
    model, data, ws, args = config.parse([])
    assert model.model_name_or_path == "bigscience/bloom-560m" and data.dataset_name == "squad"
    assert data.max_train_samples == 500 and data.loss_on == "answer"
    # the original's global batch of 16 (4 x 4), as one micro-batch
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (16, 1, 3)
    assert args.logging_nan_inf_filter is False  # its check waits for the GPU after every micro-batch
    assert (args.learning_rate, args.weight_decay) == (5e-5, 0.01)
    assert args.eval_strategy == "epoch"
    # a checkpoint every 30 minutes (the workshop's clock), none by the Trainer's own schedule
    assert (args.save_strategy, args.save_minutes) == ("no", 30)
    assert args.precision == "fp32"  # no GPU here; bf16/fp16 are picked on GPUs


@pytest.mark.parametrize("flags, strategy, minutes", [
    (["--save_minutes", "5"], "no", 5),
    (["--save_strategy", "epoch"], "epoch", 0),  # the Trainer's schedule as given, nothing by the clock
    (["--save_strategy", "no", "--save_minutes", "5"], "no", 0),
    (["--load_best_model_at_end"], "epoch", 0),  # a checkpoint at every evaluation, which the best model needs
    (["--load_best_model_at_end", "--eval_strategy", "steps", "--eval_steps", "4", "--save_steps", "4"], "steps", 0),
], ids=["minutes", "epoch", "no", "best", "best_steps"])
def test_checkpoints_by_time_unless_a_strategy_is_given_or_the_best_model_kept(flags, strategy, minutes):
    args = config.parse(flags)[3]
    assert (args.save_strategy, args.save_minutes) == (strategy, minutes)


def test_negative_save_minutes_is_refused():
    with pytest.raises(WorkshopError, match=r"^--save_minutes -1.0 must be 0 \(no checkpoint by time\) or more$"):
        config.parse(["--save_minutes", "-1"])


def test_preset_then_flags_win():
    model, data, _, args = config.parse(["--preset", "tiny", "--learning_rate", "1e-4"])
    assert model.model_name_or_path == "tiny-gpt2" and data.dataset_name == "builtin"
    assert args.learning_rate == 1e-4


@pytest.mark.parametrize("suffix, text", [
    (".json", json.dumps({"preset": "tiny", "max_seq_length": 64, "num_train_epochs": 1})),
    (".yaml", "preset: tiny\nmax_seq_length: 64\nnum_train_epochs: 1\n"),
])
def test_settings_file_with_flags_after_it(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    _, data, _, args = config.parse([str(path), "--num_train_epochs", "2"])
    assert data.max_seq_length == 64 and args.num_train_epochs == 2


def _bad_input(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    return [
        (["--model_name_or_path", str(tmp_path / "no-such-model")], "--model_name_or_path"),
        (["--dataset_name", "imagenet"], "--dataset_name imagenet is not known"),
        (["--train_file", str(tmp_path / "missing.jsonl")], "--train_file .* does not exist"),
        (["--train_file", str(bad_json)], "bad.json is not valid JSON"),
        (["--max_seq_length", "2048"], "--max_seq_length 2048 is longer than the model's 512 positions"),
        (["--max_seq_length", "8"], "no samples left after tokenisation"),
        (["--learning_rat", "1e-4"], "did you mean --learning_rate"),
        (["--preset", "huge"], "--preset huge is not known"),
        (["--precision", "bf16"], "--precision bf16 needs a GPU"),
        (["--loss_on", "prompt"], "--loss_on prompt is not known"),
    ]


def test_each_bad_input_stops_with_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    logs = tmp_path / "logs"
    for flags, message in _bad_input(tmp_path):
        code = train.main(["--preset", "tiny", "--logs_root", str(logs)] + flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, flags
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert __import__("re").search(message, err[0]), (message, err[0])
        assert not logs.exists(), flags


def test_a_finished_run_folder_is_never_overwritten(tiny_run, capsys):
    before = (tiny_run / "metrics.json").read_bytes()
    assert train.main(["--preset", "tiny", "--run_dir", str(tiny_run)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (tiny_run / "metrics.json").read_bytes() == before


def test_bad_settings_file_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(WorkshopError, match="must hold a mapping"):
        config.parse([str(path)])
