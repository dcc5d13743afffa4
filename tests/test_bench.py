"""workshop bench on the CPU: its plumbing (the GPU timings themselves are measured on a GPU, not here)."""

import json
import os

from workshop import bench, runner
from workshop.errors import WorkshopError
from workshop.stages import REPO


def test_bench_runs_each_mode_into_its_own_run_folder_and_tabulates_them(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "--modes", "default",
                       "default_length_grouped", "--samples", "32", "--eval_samples", "8", "--no_reference",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["mode"], r["status"]) for r in rows] == [("default", "completed"),
                                                       ("default_length_grouped", "completed")]
    for mode in ("default", "default_length_grouped"):
        metrics = json.loads((out / f"tiny-gpt2-baseline-{mode}" / "metrics.json").read_text())
        assert metrics["train_samples"] == 32 and metrics["stage"] == "bench"
        row = rows[[r["mode"] for r in rows].index(mode)]
        assert [row[k] for k in ("time_per_epoch_s", "first_step_s")] == [metrics["time_per_epoch_s"],
                                                                           metrics["first_step_s"]]
    assert "| tiny-gpt2 | baseline | default_length_grouped |" in (out / "bench.md").read_text()
    assert "this/default" in (out / "bench.md").read_text()  # a lever's time against the default's
    # a second invocation into the same folder would overwrite measurements: refused
    assert bench.main(["--models", "tiny-gpt2", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_targets_are_judged_from_the_rows_of_one_invocation():
    def row(stage, mode, time, loss, memory, micro=4, model="gpt2-medium"):
        return {"model": model, "stage": stage, "mode": mode, "status": "completed", "time_per_epoch_s": time,
                "final_eval_loss": loss, "peak_gpu_allocated_gib": memory, "per_device_train_batch_size": micro}

    rows = [row("baseline", "original", 30.0, 2.00, 14.0), row("baseline", "default", 9.0, 2.03, 20.0, micro=16),
            row("baseline", "default_micro4", 20.0, 2.03, 10.0),
            row("zero3", "original", 100.0, 2.00, 12.0), row("zero3", "default", 60.0, 2.05, 12.5),
            {**row("reference loop", "compiled", 8.0, None, 7.0)},
            row("zero2", "default", 10.0, 2.0, 9.0)]  # no original row: nothing to judge
    checks = {(c["stage"], c["target"]): c for c in bench.targets(rows)}
    assert {stage for stage, _ in checks} == {"baseline", "zero3"}
    assert checks[("baseline", "original/default time")]["met"] is True                 # 3.33x >= 3
    assert checks[("baseline", "eval loss default/original")]["met"] is True            # 1.015 <= 1.02
    assert checks[("baseline", "baseline default/reference loop time")]["met"] is True  # 1.125 <= 1.2
    # memory at the same micro-batch: the default's micro-batch 16 is held against nothing, micro4 is
    assert checks[("baseline", "peak allocated default/original (micro-batch 4)")]["value"] == 10.0 / 14.0
    assert checks[("zero3", "original/default time")]["met"] is False                   # 1.67x < 2
    assert checks[("zero3", "eval loss default/original")]["met"] is False              # 1.025 > 1.02
    assert checks[("zero3", "peak allocated default/original (micro-batch 4)")]["met"] is False  # more memory
    assert "| gpt2-medium | zero3 | original/default time | 1.667 | >= 2 | **no** |" in bench.targets_table(
        bench.targets(rows))
    # without a row at the original's micro-batch, memory is not judged
    unjudged = {c["target"]: c for c in bench.targets(rows[:2]) if c["target"].startswith("peak")}
    assert [c["met"] for c in unjudged.values()] == [None]
    # original and default_micro4 alone (``--modes original default_micro4``): memory is judged, nothing else
    alone = bench.targets([rows[0], rows[2]])
    assert [(c["target"], c["met"]) for c in alone] == [("peak allocated default/original (micro-batch 4)", True)]
    # a reference loop far slower than the Trainer on the same batches is no reference: not judged, and said
    rows[5]["time_per_epoch_s"] = 12.0  # the default's 9.0 / 12.0 = 0.75 < 1 / 1.2
    loop = next(c for c in bench.targets(rows) if c["target"].startswith("baseline default/reference"))
    assert (loop["met"], round(loop["value"], 2)) == (None, 0.75)
    assert ("| baseline default/reference loop time | 0.750 | <= 1.2 | - | 1; the loop ran slower than the default: "
            "no reference |") in bench.targets_table(bench.targets(rows))


def test_a_run_past_its_time_limit_is_stopped_and_reported(tmp_path, capsys):
    row, metrics = bench.train_in_subprocess(tmp_path / "run", ["--preset", "tiny"], timeout_s=1)
    assert (row["status"], row["error"], metrics) == ("timeout", "stopped after 1 s", {})
    assert (tmp_path / "run" / "train.log").exists()


def test_the_reference_loop_takes_the_baseline_defaults_batching():
    fitted = {"model": "gpt2-medium", "stage": "baseline", "mode": "default", "status": "completed",
              "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}  # fitted to a small GPU
    assert bench.baseline_batching([fitted], "gpt2-medium") == (8, 2)
    assert bench.baseline_batching([], "gpt2-medium") == (16, 1)  # no baseline run: the defaults


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    # A job stopped at its time limit keeps the runs it finished: here the second run crashes the bench.
    finished = {"model": "tiny-gpt2", "stage": "baseline", "mode": "default", "status": "completed",
                "time_per_epoch_s": 1.0}

    def run_one(out, model, stage, mode, data, extra, seed, name_seed):
        if mode != "default":
            raise KeyboardInterrupt  # what scancel's SIGINT looks like to Python
        return finished

    monkeypatch.setattr(bench, "run_one", run_one)
    out = tmp_path / "bench"
    try:
        bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "--modes", "default", "default_micro4",
                    "--samples", "8", "--eval_samples", "4", "--no_reference", "--out", str(out)])
    except KeyboardInterrupt:
        pass
    assert json.loads((out / "bench.json").read_text())["rows"] == [finished]
    assert "| tiny-gpt2 | baseline | default |" in (out / "bench.md").read_text()


def test_the_reference_loops_run_after_every_training_run(tmp_path, monkeypatch, capsys):
    # in the bench's own process: what they leave cached would show in a later run's nvidia-smi reading
    calls = []
    monkeypatch.setattr(bench, "run_one", lambda out, model, stage, mode, *rest, **kw: calls.append(
        ("run", model)) or {"model": model, "stage": stage, "mode": mode, "status": "completed"})
    monkeypatch.setattr(bench, "reference_loop", lambda model, data, samples, batching, compiled: calls.append(
        ("loop", model)) or [{"model": model, "stage": "reference loop", "mode": mode, "status": "completed"}
                             for kind in ["compiled" if compiled else "eager"] for mode in (f"{kind}, first pass", kind)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert bench.main(["--models", "tiny-bloom", "tiny-gpt2", "--stages", "baseline", "--modes", "default",
                       "--samples", "8", "--eval_samples", "4", "--out", str(tmp_path / "bench")]) == 0
    assert calls == [("run", "tiny-bloom"), ("run", "tiny-gpt2")] + [("loop", "tiny-bloom")] * 2 + \
        [("loop", "tiny-gpt2")] * 2
    out = capsys.readouterr().out  # each loop says it started (its first pass compiles) and what it measured
    assert "=== tiny-gpt2 | reference loop | compiled: a first pass" in out
    assert "    | tiny-gpt2 | reference loop | compiled, first pass |" in out
    assert "    | tiny-gpt2 | reference loop | compiled |" in out


def test_a_deepspeed_lever_runs_the_stage_json_with_its_keys_set(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "zero2", "--modes",
                       "default_overflow_check", "--samples", "16", "--eval_samples", "4", "--no_reference",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["stage"], r["status"]) for r in rows] == [("zero2", "completed")]  # no DeepSpeed, nothing to change
    written = json.loads((out / "ds_configs" / "default_overflow_check_zero2.json").read_text())
    stage_json = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    assert written == {**stage_json, "bf16": {**stage_json["bf16"], "check_grad_overflow": True}}
    config = json.loads((out / "tiny-gpt2-zero2-default_overflow_check" / "config.json").read_text())
    assert config["deepspeed_config"]["bf16"]["check_grad_overflow"] is True


def test_an_environment_lever_is_set_for_the_training_process_only(tmp_path, monkeypatch):
    started = []

    class Process:  # a training process that prints nothing and fails
        stdout = []

        def __init__(self, cmd, env=None, **kwargs):
            started.append(env)

        def wait(self):
            return 1

    monkeypatch.setattr(runner.subprocess, "Popen", Process)
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)  # no nvidia-smi beside it
    assert bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "--modes", "default", "default_cublaslt",
                       "--samples", "8", "--eval_samples", "4", "--no_reference", "--out", str(tmp_path / "b")]) == 0
    assert started[0] is None  # the bench's own environment
    assert started[1] == {**os.environ, "TORCH_BLAS_PREFER_CUBLASLT": "1"}
    assert "TORCH_BLAS_PREFER_CUBLASLT" not in os.environ


def test_with_several_seeds_the_targets_compare_means_and_show_the_spread():
    def row(mode, seed, time, loss):
        return {"model": "gpt2-medium", "stage": "baseline", "mode": mode, "seed": seed, "status": "completed",
                "time_per_epoch_s": time, "final_eval_loss": loss, "peak_gpu_allocated_gib": 10.0,
                "per_device_train_batch_size": 4}

    rows = [row("original", 1, 30.0, 2.00), row("original", 2, 32.0, 2.04),
            row("default", 1, 10.0, 2.05), row("default", 2, 10.0, 2.03)]
    checks = {c["target"]: c for c in bench.targets(rows)}
    assert checks["original/default time"]["value"] == 31.0 / 10.0
    loss = checks["eval loss default/original"]
    assert loss["value"] == 2.04 / 2.02 and loss["met"] is True and loss["runs"] == 2
    assert abs(loss["seed_spread"] - 0.04 / 2.02) < 1e-12
    assert "| 2; the original's spread 2.0% |" in bench.targets_table(bench.targets(rows))
    # each run's ratio in the table is against the original of its own seed
    assert [line.split("|")[-2].strip() for line in bench.table(rows).splitlines()[2:]] == ["-", "-", "3.00x", "3.20x"]
    # and the table says which seed each row is; with one seed it has no such column
    seed_column = [line.split("|")[4].strip() for line in bench.table(rows).splitlines()]
    assert seed_column == ["seed", "---", "1", "2", "1", "2"]
    assert "seed" not in bench.table(rows[::2])


def test_each_seed_is_a_run_of_its_own(tmp_path, monkeypatch):
    asked = []

    def train(run_dir, flags, timeout_s=None, env=None):
        asked.append((run_dir.name, flags[flags.index("--seed") + 1]))
        return {"status": "completed", "error": None, "wall_s": 1.0}, {"time_per_epoch_s": 1.0, "final_eval_loss": 2.0}

    monkeypatch.setattr(bench, "train_in_subprocess", train)
    assert bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "--modes", "original", "default",
                       "--seeds", "1", "2", "--samples", "8", "--eval_samples", "4", "--no_reference",
                       "--out", str(tmp_path / "bench")]) == 0
    assert asked == [("tiny-gpt2-baseline-original-seed1", "1"), ("tiny-gpt2-baseline-original-seed2", "2"),
                     ("tiny-gpt2-baseline-default-seed1", "1"), ("tiny-gpt2-baseline-default-seed2", "2")]
    checks = json.loads((tmp_path / "bench" / "bench.json").read_text())["targets"]
    assert {c["runs"] for c in checks} == {2}


def test_a_refusal_is_reported_by_its_error_line_not_what_follows_it():
    output = ("loading...\nerror: --nvme_path /x has 63.8 GiB free but ZeRO-Infinity will write about 80.9 GiB there\n"
              "[rank0]:[W1201] Warning: WARNING: destroy_process_group() was not called before program exit\n")
    assert runner.error_line(output) == "--nvme_path /x has 63.8 GiB free but ZeRO-Infinity will write about 80.9 GiB there"
    assert runner.error_line("Traceback ...\nRuntimeError: boom\n") == "RuntimeError: boom"
    assert runner.error_line("") == ""


def test_every_mode_is_flags_that_workshop_train_accepts(tmp_path, monkeypatch):
    """A mode with a mistyped flag would fail only on the GPU machine, after the runs before it."""
    from workshop import config

    monkeypatch.setattr(config, "_cuda_available", lambda: True)  # the original's fp16 needs one
    data = bench.write_data(tmp_path, 4, 2)
    refused = {}
    for mode, flags in bench.MODES.items():
        try:
            config.parse(["--stage", "bench", "--model_name_or_path", "gpt2-medium", "--train_file", str(data[0]),
                          "--validation_file", str(data[1]), *bench.COMMON, *flags])
        except WorkshopError as e:
            refused[mode] = str(e)
    assert refused == {}


def test_combine_makes_one_table_from_a_bench_split_over_jobs(tmp_path, capsys):
    def row(model, stage, mode, time, job):
        return {"model": model, "stage": stage, "mode": mode, "status": "completed", "time_per_epoch_s": time,
                "final_eval_loss": 2.0, "peak_gpu_allocated_gib": 10.0, "per_device_train_batch_size": 16,
                "job": job}

    def loop(model, job):
        return {**row(model, "reference loop", "compiled", 2.0, job), "final_eval_loss": None}

    jobs = {
        # the first job: gpt2-medium's baseline and its loops, then a time limit during ZeRO-3
        "a": [row("gpt2-medium", "baseline", "original", 30.0, "a"),
              row("gpt2-medium", "baseline", "default", 9.0, "a"),
              row("gpt2-medium", "zero3", "original", 60.0, "a"), loop("gpt2-medium", "a")],
        # bloom-560m's ZeRO-1, with loops but not the baseline they compare with: left out
        "b": [row("bloom-560m", "zero1", "original", 40.0, "b"), row("bloom-560m", "zero1", "default", 10.0, "b"),
              loop("bloom-560m", "b")],
        # ZeRO-3 again, whole
        "c": [row("gpt2-medium", "zero3", "original", 50.0, "c"), row("gpt2-medium", "zero3", "default", 20.0, "c")],
    }
    for name, rows in jobs.items():
        (tmp_path / name).mkdir()
        bench.write_results(tmp_path / name, rows, "NVIDIA H100 80GB HBM3 (GPU-0b42632a); torch 2.11.0; 2026-12-05")
    out = tmp_path / "all"
    assert bench.main(["--combine", *(str(tmp_path / n) for n in jobs), "--out", str(out)]) == 0
    combined = json.loads((out / "bench.json").read_text())
    assert [(r["model"], r["stage"], r["mode"], r["job"]) for r in combined["rows"]] == [
        ("gpt2-medium", "baseline", "original", "a"), ("gpt2-medium", "baseline", "default", "a"),
        ("gpt2-medium", "zero3", "original", "c"), ("gpt2-medium", "zero3", "default", "c"),
        ("bloom-560m", "zero1", "original", "b"), ("bloom-560m", "zero1", "default", "b"),
        ("gpt2-medium", "reference loop", "compiled", "a")]
    checks = {(c["model"], c["stage"], c["target"]): c["value"] for c in combined["targets"]}
    assert checks[("gpt2-medium", "zero3", "original/default time")] == 50.0 / 20.0  # both from job c
    assert checks[("gpt2-medium", "baseline", "baseline default/reference loop time")] == 9.0 / 2.0
    text = (out / "bench.md").read_text()
    assert text.startswith("NVIDIA H100 80GB HBM3 (GPU-0b42632a); torch 2.11.0; 2026-12-05\n\nCombined from ")  # one GPU
    # a folder that no bench wrote, and an output folder already used, are refused in one line
    assert bench.main(["--combine", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert f"--combine {tmp_path / 'missing'}: no bench.json there" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert bench.main(["--combine", str(tmp_path / "a"), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    # pieces from another card, of the same model or not, or other versions: each header line kept, to be seen
    bench.write_results(tmp_path / "c", jobs["c"], "NVIDIA H100 80GB HBM3 (GPU-5f1a3b2c); torch 2.11.0; 2026-12-05")
    assert bench.combine([tmp_path / "a", tmp_path / "c"])[1] == (
        "NVIDIA H100 80GB HBM3 (GPU-0b42632a); torch 2.11.0; 2026-12-05; "
        "NVIDIA H100 80GB HBM3 (GPU-5f1a3b2c); torch 2.11.0; 2026-12-05")


def test_the_header_names_the_card_by_the_start_of_its_uuid(monkeypatch):
    """Two H100s can differ in speed: a table put together from pieces must show which card ran each."""
    import uuid
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    card = SimpleNamespace(name="NVIDIA H100 80GB HBM3", uuid=uuid.UUID("0b42632a-bc5c-f731-724b-6936a19c4b24"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    assert bench.environment_line().startswith(f"NVIDIA H100 80GB HBM3 (GPU-0b42632a); torch {torch.__version__}, ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.environment_line().startswith("no GPU; torch ")
