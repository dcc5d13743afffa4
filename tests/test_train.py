"""The real entry point, end to end, on the built-in data (CPU, seconds)."""

import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

from conftest import REPO, read_json
from workshop.units import GIB

METRIC_KEYS = [
    "run_id", "stage", "model", "dataset", "precision", "deepspeed", "world_size", "num_nodes",
    "per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size", "max_seq_length",
    "train_samples", "eval_samples", "epochs", "steps_per_epoch", "total_steps", "final_train_loss",
    "eval_loss_per_epoch", "final_eval_loss", "train_runtime_s", "time_per_epoch_s", "first_step_s",
    "train_samples_per_second", "eval_samples_per_second", "tokens_per_second", "mfu", "peak_gpu_allocated_gib",
    "peak_gpu_reserved_gib", "peak_host_rss_gib", "exact_match", "f1", "dropped_too_long", "length_mean", "length_max",
]


def test_run_folder_is_complete(tiny_run):
    for name in ("config.json", "metrics.json", "log_history.json", "steps.jsonl", "status.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (tiny_run / name).is_file(), name
    assert read_json(tiny_run / "status.json")["status"] == "completed"
    config = read_json(tiny_run / "config.json")
    assert config["training"]["precision"] == "fp32" and config["model_info"]["n_params"] > 0
    assert config["model"]["attn_implementation"] == "sdpa"  # as resolved: the flag was left unset


def test_metrics_table_is_filled_from_the_run(tiny_run):
    metrics = read_json(tiny_run / "metrics.json")
    assert [k for k in METRIC_KEYS if k not in metrics] == []
    history = read_json(tiny_run / "log_history.json")
    assert metrics["eval_loss_per_epoch"] == [e["eval_loss"] for e in history if "eval_loss" in e]
    assert metrics["final_train_loss"] == [e["loss"] for e in history if "loss" in e][-1]
    assert metrics["steps_per_epoch"] == 32 and metrics["total_steps"] == 64
    assert metrics["peak_gpu_allocated_gib"] is None  # CPU run
    assert 0 <= metrics["exact_match"] <= 100 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["first_step_s"] < metrics["epoch_times_s"][0]  # from the first epoch's start


def test_loss_goes_down_by_a_clear_margin(tiny_run):
    history = read_json(tiny_run / "log_history.json")
    train_losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert train_losses[-1] < 0.7 * train_losses[0], train_losses
    assert eval_losses[-1] < eval_losses[0]


def test_saved_model_reloads_with_the_trained_weights(tiny_run):
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_run / "model")
    saved = load_file(tiny_run / "model" / "model.safetensors")
    for name, tensor in reloaded.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    initial = AutoModelForCausalLM.from_config(reloaded.config)
    assert not torch.equal(initial.transformer.h[0].mlp.c_fc.weight, reloaded.transformer.h[0].mlp.c_fc.weight)


def test_saved_model_is_the_trained_model_not_the_initial_one(tmp_path, monkeypatch):
    """The model file against the weights the Trainer ended with, in memory, and against the ones it started from.

    (The test above compares the reloaded model with the file it was loaded from and with a fresh random
    initialisation: neither tells trained from untrained weights.) Equal to the last bit: the file holds
    the same fp32 tensors. Tried: saving the model as built (before training) fails both checks."""
    from workshop import model as models
    from workshop import train

    built = {}
    build_model = models.build_model

    def keep(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built["model"], built["initial"] = model, {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(models, "build_model", keep)
    run_dir = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--num_train_epochs", "1",
                       "--max_train_samples", "64", "--eval_strategy", "no", "--save_strategy", "no",
                       "--answer_eval_samples", "0"]) == 0
    saved = load_file(run_dir / "model" / "model.safetensors")
    trained = built["model"].state_dict()
    model = built["model"]
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    assert set(trained) - tied == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(tensor, trained[name].cpu()), name
    # every weight the optimizer steps on moved; buffers (GPT-2's attention bias mask) are not in the file
    moved = [n for n, p in model.named_parameters() if not torch.equal(saved[n], built["initial"][n].cpu())]
    assert moved == [n for n, _ in model.named_parameters()]


def test_console_script_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workshop", "train", "--dataset_name", "nope",
                             "--logs_root", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --dataset_name nope is not known: use one of squad, wikitext, builtin, "
                                     "builtin_text, or --train_file for local data")


def test_tensorboard_event_files_go_into_the_run_folder(tmp_path):
    from workshop import train

    run_dir = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--num_train_epochs", "1",
                       "--answer_eval_samples", "0", "--report_to", "tensorboard"]) == 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("first_step, steps", [([], "steps 2-4"), (["--profile_first_step"], "steps 1-3")],
                         ids=["after_the_first", "from_the_first"])
def test_profile_steps_writes_where_the_time_goes(tmp_path, first_step, steps):
    from workshop import train

    run_dir = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--num_train_epochs", "1", "--profile_steps",
                       "3", *first_step, "--eval_strategy", "no", "--save_strategy", "no", "--answer_eval_samples",
                       "0", "--no_save_model"]) == 0
    text = (run_dir / "profile.txt").read_text()
    assert text.startswith(f"3 optimizer step(s) profiled ({steps})")  # by default the first, warm-up step left out
    assert "aten::mm" in text  # the operations table: matrix products dominate even a tiny model
    assert read_json(run_dir / "profile_trace.json")["traceEvents"]  # the trace chrome://tracing opens


def test_peak_host_memory_covers_what_no_step_saw(monkeypatch):
    """A model built on the host and then moved to the GPU leaves no trace at the logged steps;
    the kernel's high-water mark (ru_maxrss, KiB on Linux) keeps it."""
    import resource
    import types

    import psutil

    from workshop.trainer import MeasureCallback

    measure = MeasureCallback.__new__(MeasureCallback)  # only the memory bookkeeping is needed
    measure.process, measure.cuda, measure.peak_host_rss = psutil.Process(), False, 0
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=64 * 1024**2))
    assert measure.peaks()["peak_host_rss_gib"] == 64


@pytest.mark.parametrize("setup_gib, training_gib", [(3, 2), (3, 5)])
def test_gpu_peak_keeps_the_set_up_apart_from_the_training(monkeypatch, setup_gib, training_gib):
    """The set-up's peak (before the first step) and the training's are kept apart; the run's peak is the larger.
    The reference: a fake allocator whose high-water marks the test sets by hand."""
    import types

    import psutil

    from workshop.trainer import JobClock, MeasureCallback

    high = {"allocated": setup_gib * GIB, "reserved": setup_gib * GIB + 1}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: high["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: high["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: high.update(allocated=0, reserved=0))

    measure = MeasureCallback.__new__(MeasureCallback)
    measure.process, measure.cuda, measure.peak_host_rss, measure.setup_peak = psutil.Process(), True, 0, (0, 0)
    measure.trainer, measure.is_main = types.SimpleNamespace(clock=JobClock(), tokens_seen=torch.tensor(0)), False
    measure.on_train_begin(None, types.SimpleNamespace(global_step=0), None)
    high.update(allocated=training_gib * GIB, reserved=training_gib * GIB)  # the steps
    peaks = measure.peaks()
    assert peaks["peak_gpu_allocated_setup_gib"] == setup_gib
    assert peaks["peak_gpu_allocated_training_gib"] == training_gib
    assert peaks["peak_gpu_allocated_gib"] == max(setup_gib, training_gib)
    assert peaks["peak_gpu_reserved_gib"] == max(setup_gib + 1 / GIB, training_gib)


@pytest.mark.parametrize("schedule", ["epoch", "steps"])
def test_evaluations_and_checkpoints_are_phases_of_their_own_not_training_steps(tmp_path, monkeypatch, capsys,
                                                                                schedule):
    """Each evaluation and each checkpoint made 0.5 s slower: their phases take it, the training steps' and the
    epochs' times (epoch_times_s, time per epoch and samples/s come from them) do not.

    "epoch": each at an epoch's end; "steps": every 4 steps, so that half of them fall inside an epoch. The
    references: the Trainer's own eval_runtime for the evaluation phase, the slowing for the checkpoints, and for
    training_steps the sum of the epochs' times, which a slowed call inside an epoch would move by 1 s. Tolerance 0.3 s: what lies between the epochs (the
    Trainer's logging, the epoch-end callbacks) takes milliseconds, and counting one slowed phase twice adds 1 s.
    Tried: WorkshopTrainer.evaluate not timed as a phase puts 1 s of evaluation into training_steps; an epoch
    timed from its start to its end (perf_counter) puts the "steps" schedule's 2 s inside the epochs into them."""
    import time

    from workshop import train
    from workshop.trainer import WorkshopTrainer

    slow_s = 0.5
    evaluation_loop, save_optimizer = WorkshopTrainer.evaluation_loop, WorkshopTrainer._save_optimizer_and_scheduler

    def slow_evaluation(self, *args, **kwargs):
        time.sleep(slow_s)
        return evaluation_loop(self, *args, **kwargs)

    def slow_checkpoint(self, output_dir):
        time.sleep(slow_s)
        return save_optimizer(self, output_dir)

    monkeypatch.setattr(WorkshopTrainer, "evaluation_loop", slow_evaluation)
    monkeypatch.setattr(WorkshopTrainer, "_save_optimizer_and_scheduler", slow_checkpoint)
    run_dir = tmp_path / "run"
    # 2 epochs x 8 steps: an evaluation and a checkpoint at each epoch's end, or at steps 4, 8, 12 and 16
    every = ["--eval_steps", "4", "--save_steps", "4"] if schedule == "steps" else []
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--max_train_samples", "64",
                       "--eval_strategy", schedule, "--save_strategy", schedule, *every,
                       "--answer_eval_samples", "4"]) == 0
    calls = 4 if schedule == "steps" else 2
    metrics = read_json(run_dir / "metrics.json")
    phases = metrics["time_breakdown_s"]
    # the Trainer's own clock around each evaluation (eval_runtime) against the phase's
    evaluations = [e["eval_runtime"] for e in read_json(run_dir / "log_history.json") if "eval_runtime" in e]
    assert len(evaluations) == calls and sum(evaluations) >= calls * slow_s
    assert phases["evaluation"] == pytest.approx(sum(evaluations), abs=0.3), phases
    assert calls * slow_s <= phases["checkpoints"], phases
    assert phases["training_steps"] == pytest.approx(sum(metrics["epoch_times_s"]), abs=0.3), phases
    for phase in ("preflight", "data", "model_build", "trainer_setup", "final_save", "answer_scoring"):
        assert phases[phase] > 0, phase
    out = capsys.readouterr().out
    # the progress line: the job's elapsed time, the training steps' time left; none left after the last step
    lines = re.findall(r"^step (\d+)/16 \|.* \| elapsed (\d+):(\d\d) \| left ~(\d+):(\d\d)$", out, re.M)
    assert [int(line[0]) for line in lines] == [4, 8, 12, 16], out
    assert lines[-1][3:] == ("0", "00")
    assert "where the job's time went (time_breakdown_s):\n| phase | seconds | share |" in out


def test_versions_are_recorded_without_importing_deepspeed(monkeypatch):
    """config.json names DeepSpeed's version; a run without DeepSpeed must not pay DeepSpeed's start-up for it."""
    import deepspeed

    from workshop import train

    installed = deepspeed.__version__
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` from here on fails
    assert train._versions()["deepspeed"] == installed
