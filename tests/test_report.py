"""workshop report on a hand-made run folder (tests/fixtures/run_zero2) and copies of it: the numbers are
exactly those of the log history, metrics.json and the nvidia-smi / host memory CSVs; the files are written."""

import csv
import math
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from workshop import memory as mem
from workshop import report
from workshop.units import GIB

FIXTURE = Path(__file__).parent / "fixtures" / "run_zero2"
GPU_CSV = FIXTURE / "gpu_memory-gpu-node017.csv"
HOST_CSV = FIXTURE / "host_memory-gpu-node017.csv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture
def run_dir(tmp_path):
    """A writable copy of the fixture, at logs/deepspeed_single_gpu/4711 as train.py would put it."""
    target = tmp_path / "logs" / "deepspeed_single_gpu" / "4711"
    shutil.copytree(FIXTURE, target)
    return target


@pytest.fixture  # made for each test: mutmut counts a test as reaching summarize only where it calls it
def row():
    return report.summarize(report.load_run(FIXTURE))


def test_numbers_are_exactly_the_log_historys(row):
    history = read_json(FIXTURE / "log_history.json")
    train = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    summary = history[-1]
    assert row["final_train_loss"] == train[-1]["loss"]
    assert row["mean_train_loss"] == summary["train_loss"]
    assert row["eval_loss_per_epoch"] == [e["eval_loss"] for e in evals]
    assert row["final_eval_loss"] == evals[-1]["eval_loss"]
    assert row["eval_samples_per_second"] == evals[-1]["eval_samples_per_second"]
    assert row["steps_per_epoch"] == 16 and row["total_steps"] == summary["step"] == 32
    assert row["train_runtime_s"] == summary["train_runtime"]


def test_numbers_are_exactly_the_nvidia_smi_and_host_csvs(row):
    with GPU_CSV.open() as f:
        gpu = list(csv.DictReader(f, skipinitialspace=True))
    with HOST_CSV.open() as f:
        host = list(csv.DictReader(f))
    assert row["peak_nvidia_smi_gib"] == max(int(r["memory.used [MiB]"]) for r in gpu) / 1024
    assert row["nvidia_smi_peak_by_host"] == {"gpu-node017": row["peak_nvidia_smi_gib"]}
    assert row["gpu_name"] == gpu[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert row["peak_host_used_gib"] == max(int(r["used_mib"]) for r in host) / 1024


def test_measurements_from_metrics_json_and_settings_from_config(row):
    metrics = read_json(FIXTURE / "metrics.json")
    for key in ("time_per_epoch_s", "tokens_per_second", "mfu", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib",
                "peak_host_rss_gib", "exact_match", "f1"):
        assert row[key] == metrics[key], key
    assert (row["zero_stage"], row["offload_optimizer"], row["world_size"]) == (2, None, 1)


def test_train_samples_per_second_is_an_epochs_samples_over_the_time_per_epoch(row):
    """On the clock of time per epoch (training steps alone), not the Trainer's, which counts the two
    evaluations and the checkpoints: the fixture's 64 samples / 1.6257 s = 39.4, where the Trainer says 12.96."""
    metrics = read_json(FIXTURE / "metrics.json")
    trainers = read_json(FIXTURE / "log_history.json")[-1]["train_samples_per_second"]
    assert row["train_samples_per_second"] == 64 / 1.6256892619104526
    assert row["train_samples_per_second"] > 3 * trainers == 3 * 12.964
    assert (metrics["train_samples"], metrics["time_per_epoch_s"]) == (64, 1.6256892619104526)
    assert row["setting"] == "ZeRO-2" and row["status"] == "completed"


def test_prediction_beside_measurement(row):
    config = read_json(FIXTURE / "config.json")
    info = config["model_info"]
    shape = mem.ModelShape("", "gpt2", info["n_params"], info["vocab_size"] * info["hidden_size"], info["n_layers"],
                           info["hidden_size"], info["n_heads"], info["vocab_size"], "sdpa")
    expected = mem.predict(shape, mem.Settings(512, 4, 2, precision="bf16",
                                               fast_kernels=False,  # recorded before the flag existed
                                               deepspeed=mem.DeepSpeedSettings.from_config(config["deepspeed_config"], 1024)))
    assert row["predicted_peak_allocated_gib"] == expected.peak_allocated_bytes / GIB
    assert row["predicted_gpu_total_gib"] == expected.gpu_total_bytes / GIB
    assert row["predicted_host_gib"] == expected.host_bytes / GIB
    # the fixture's peak is a real H100 measurement of this configuration
    assert abs(row["allocated_over_predicted"] - 1) < 0.15 and abs(row["nvidia_smi_over_predicted"] - 1) < 0.15


def test_the_prediction_uses_the_runs_attention(run_dir):
    """Eager attention keeps the attention matrix: the report predicts with the attention config.json records
    (sdpa where it records none, as in the fixture)."""
    config = read_json(run_dir / "config.json")
    config["model"]["attn_implementation"] = "eager"
    (run_dir / "config.json").write_text(json.dumps(config))
    info = config["model_info"]
    ds = mem.DeepSpeedSettings.from_config(config["deepspeed_config"], 1024)
    eager, sdpa = (mem.predict(mem.ModelShape("", "gpt2", info["n_params"], info["vocab_size"] * info["hidden_size"],
                                              info["n_layers"], info["hidden_size"], info["n_heads"], info["vocab_size"],
                                              attn),
                               mem.Settings(512, 4, 2, precision="bf16", fast_kernels=False, deepspeed=ds))
                   for attn in ("eager", "sdpa"))
    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == eager.peak_allocated_bytes / GIB != sdpa.peak_allocated_bytes / GIB


def test_the_model_type_recorded_in_model_info_wins_for_a_model_outside_the_shapes_table(run_dir):
    """A model from a local folder: the shapes table does not know it, config.json's model_info says BLOOM, and
    the prediction uses BLOOM's activation figures, not the fallback's."""
    config, metrics_json = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    config["model_info"]["model_type"] = "bloom"
    metrics_json["model"] = config["model"]["model_name_or_path"] = "my_models/bloom_variant"
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics_json))
    info = config["model_info"]
    ds = mem.DeepSpeedSettings.from_config(config["deepspeed_config"], 1024)
    bloom, unknown = (mem.predict(mem.ModelShape("", kind, info["n_params"], info["vocab_size"] * info["hidden_size"],
                                                 info["n_layers"], info["hidden_size"], info["n_heads"],
                                                 info["vocab_size"], "sdpa"),
                                  mem.Settings(512, 4, 2, precision="bf16", fast_kernels=False, deepspeed=ds))
                      for kind in ("bloom", "unknown"))
    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == bloom.peak_allocated_bytes / GIB != unknown.peak_allocated_bytes / GIB


@pytest.mark.parametrize("ds_file, offload", [("zero3_offload_all.json", ("cpu", "cpu")), ("zero3.json", (None, None))])
def test_the_prediction_follows_the_runs_offload_precision_and_largest_layer(run_dir, ds_file, offload):
    """A ZeRO-3 run in fp32 whose model_info records its largest layer (it sets the host memory of ZeRO-3 in fp32):
    the report predicts for exactly that, offload included (memory.predict with those settings, made here by
    hand); a run whose precision or micro-batch is unknown gets no prediction."""
    config, metrics_json = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    ds_json = json.loads((Path(__file__).parents[1] / "ds_configs" / ds_file).read_text())
    config["deepspeed_config"] = ds_json
    config["model_info"]["largest_layer_params"] = 12_345_678
    metrics_json.update(zero_stage=3, offload_optimizer=offload[0], offload_param=offload[1], precision="fp32")
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics_json))
    info = config["model_info"]
    shape = mem.ModelShape("", "gpt2", info["n_params"], 12_345_678, info["n_layers"], info["hidden_size"],
                           info["n_heads"], info["vocab_size"], "sdpa")
    expected = mem.predict(shape, mem.Settings(512, 4, 3, *offload, precision="fp32", fast_kernels=False,
                                               deepspeed=mem.DeepSpeedSettings.from_config(ds_json, 1024)))
    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == expected.peak_allocated_bytes / GIB
    assert row["predicted_host_gib"] == expected.host_bytes / GIB

    for unknown in ({"precision": "int8"}, {"per_device_train_batch_size": None}):
        (run_dir / "metrics.json").write_text(json.dumps({**metrics_json, **unknown}))
        config["training"].update(unknown)
        (run_dir / "config.json").write_text(json.dumps(config))
        assert report.summarize(report.load_run(run_dir))["predicted_peak_allocated_gib"] is None, unknown


def test_the_prediction_follows_the_runs_gpu_and_node_count_and_gradient_checkpointing(run_dir):
    """8 GPUs on 2 nodes with --gradient_checkpointing: ZeRO-2 splits gradients and optimizer states 8 ways (GPU),
    a node hosts 4 processes (host), the activations are the layers' inputs (GPU); memory.predict with exactly
    those settings, made here by hand. Each setting moves the prediction: a report that dropped one is wrong."""
    config, metrics_json = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    config["training"]["gradient_checkpointing"] = True
    metrics_json.update(world_size=8, num_nodes=2)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics_json))
    info = config["model_info"]
    shape = mem.ModelShape("", "gpt2", info["n_params"], info["vocab_size"] * info["hidden_size"], info["n_layers"],
                           info["hidden_size"], info["n_heads"], info["vocab_size"], "sdpa")
    ds = mem.DeepSpeedSettings.from_config(config["deepspeed_config"], 1024)

    def predicted(world, nodes, checkpointing):
        return mem.predict(shape, mem.Settings(512, 4, 2, None, None, world, nodes, "bf16", checkpointing,
                                               fast_kernels=False, deepspeed=ds))

    expected = predicted(8, 2, True)
    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == expected.peak_allocated_bytes / GIB
    assert row["predicted_host_gib"] == expected.host_bytes / GIB
    for other in (predicted(1, 1, True), predicted(8, 2, False)):
        assert other.peak_allocated_bytes != expected.peak_allocated_bytes
    assert predicted(8, 1, True).host_bytes != expected.host_bytes


def test_without_a_recorded_largest_layer_the_prediction_takes_the_embedding(run_dir):
    """A run folder from before model_info recorded the largest layer: ZeRO-3 on 2 GPUs gathers the largest layer
    (4 bytes a parameter), which the report then takes to be the embedding, 50257 x 1024 for GPT-2 medium."""
    config, metrics_json = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    assert "largest_layer_params" not in config["model_info"]
    ds_json = json.loads((Path(__file__).parents[1] / "ds_configs" / "zero3.json").read_text())
    config["deepspeed_config"] = ds_json
    metrics_json.update(zero_stage=3, world_size=2)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics_json))
    info = config["model_info"]

    def predicted(largest):
        shape = mem.ModelShape("", "gpt2", info["n_params"], largest, info["n_layers"], info["hidden_size"],
                               info["n_heads"], info["vocab_size"], "sdpa")
        return mem.predict(shape, mem.Settings(512, 4, 3, world_size=2, precision="bf16", fast_kernels=False,
                                               deepspeed=mem.DeepSpeedSettings.from_config(ds_json, 1024)))

    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == predicted(50257 * 1024).peak_allocated_bytes / GIB
    assert predicted(50257 * 1024).peak_allocated_bytes - predicted(0).peak_allocated_bytes == 4 * 50257 * 1024


def test_the_prediction_assumes_the_runs_own_longest_batch(run_dir):
    """With --fast_kernels the output layer makes logits at the targets only: the report predicts for the
    most targets a sample of the run's data has (config.json's data_stats), not for every position."""
    config = read_json(run_dir / "config.json")
    config["model"]["fast_kernels"] = True
    config["data_stats"]["targets_max"] = 7
    (run_dir / "config.json").write_text(json.dumps(config))
    info = config["model_info"]
    shape = mem.ModelShape("gpt2-medium", "gpt2", info["n_params"], info["vocab_size"] * info["hidden_size"], info["n_layers"],
                           info["hidden_size"], info["n_heads"], info["vocab_size"], "sdpa")
    ds = mem.DeepSpeedSettings.from_config(config["deepspeed_config"], 1024)
    targets, every = (mem.predict(shape, mem.Settings(512, 4, 2, precision="bf16", deepspeed=ds, targets_per_sample=t))
                      for t in (7, None))
    assert targets.logits_bytes == 12 * 4 * 7 * info["vocab_size"] < every.logits_bytes
    row = report.summarize(report.load_run(run_dir))
    assert row["predicted_peak_allocated_gib"] == targets.peak_allocated_bytes / GIB != every.peak_allocated_bytes / GIB


def test_cli_writes_markdown_csv_and_pngs_into_the_run_folder(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| run | setting |" in printed and "deepspeed_single_gpu/4711" in printed
    for name in ("report.md", "report.csv", "loss.png", "gpu_memory.png", "peaks.png"):
        assert (run_dir / name).is_file(), name
    for png in ("loss.png", "gpu_memory.png", "peaks.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
    assert not list(run_dir.glob(".*tmp")), "temporary files left behind"
    markdown = (run_dir / "report.md").read_text()
    assert "| final_train_loss | 6.204 |" in markdown and "![loss](loss.png)" in markdown
    with (run_dir / "report.csv").open() as f:
        (written,) = list(csv.DictReader(f))
    metrics = read_json(run_dir / "metrics.json")
    assert float(written["final_train_loss"]) == metrics["final_train_loss"]
    assert json.loads(written["eval_loss_per_epoch"]) == metrics["eval_loss_per_epoch"]
    assert float(written["peak_nvidia_smi_gib"]) == 12253 / 1024


def test_many_runs_compared_with_scaling_efficiency(tmp_path, capsys):
    logs = tmp_path / "logs"
    speeds = {1: 12.0, 2: 21.6, 4: 38.4}  # samples/s: 90 % and 80 % of linear
    for world, sps in speeds.items():
        target = logs / "multi_node" / f"run{world}"
        shutil.copytree(FIXTURE, target)
        metrics = read_json(target / "metrics.json")
        # 64 samples an epoch: the time per epoch that gives these samples/s
        metrics.update(world_size=world, stage="multi_node", run_id=f"run{world}", time_per_epoch_s=64 / sps)
        (target / "metrics.json").write_text(json.dumps(metrics))
        history = read_json(target / "log_history.json")
        # The Trainer's samples/s, evaluation and checkpoints included, say perfect scaling: not the report's clock.
        history[-1]["train_samples_per_second"] = 10.0 * world
        (target / "log_history.json").write_text(json.dumps(history))
        (target / "checkpoints" / "checkpoint-16").mkdir(parents=True)  # never searched
        (target / "checkpoints" / "checkpoint-16" / "log_history.json").write_text("[]")
    failed = logs / "offload" / "oom"  # died before logging: keeps its row
    failed.mkdir(parents=True)
    shutil.copy(FIXTURE / "config.json", failed)
    (failed / "status.json").write_text(json.dumps({"status": "oom", "error": "OutOfMemoryError: CUDA out of memory"}))
    assert len(report.find_run_dirs([logs])) == 4
    assert report.main([str(logs)]) == 0
    out = logs / "report"
    for name in ("report.md", "report.csv", "loss.png", "gpu_memory.png", "peaks.png"):
        assert (out / name).is_file(), name
    with (out / "report.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert [float(rows[f"multi_node/run{w}"]["scaling_efficiency"]) for w in (1, 2, 4)] == pytest.approx([1, 0.9, 0.8])
    assert rows["offload/oom"]["status"] == "oom" and rows["offload/oom"]["final_train_loss"] == ""
    assert rows["offload/oom"]["predicted_peak_allocated_gib"]  # the prediction still says what it needed
    out = capsys.readouterr().out
    assert "90.0%" in out
    assert "Scaling efficiency compares" not in out  # every multi-GPU run has its one-GPU run: nothing to explain


def test_format_table_for_train_py():
    metrics = read_json(FIXTURE / "metrics.json")
    table = report.format_table(metrics).splitlines()
    assert table[:2] == ["| metric | value |", "|---|---|"] and len(table) == 2 + len(metrics)
    assert "| offload_optimizer | - |" in table and "| peak_gpu_allocated_gib | 8.57 |" in table
    assert "| eval_loss_per_epoch | 8.4, 6.414 |" in table and f"| mfu | {100 * metrics['mfu']:.1f}% |" in table


def test_csv_reader_is_robust_to_restarts_and_cut_lines(tmp_path):
    lines = GPU_CSV.read_text().splitlines()
    broken = tmp_path / "gpu_memory-a.csv"
    broken.write_text("\n".join(lines[:10] + lines[:1] + lines[10:] + ["2026/11/23 14:03:02.1, 0, NVIDIA H1"]))
    assert report.read_gpu_csv(broken) == report.read_gpu_csv(GPU_CSV)


def test_no_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folders") and err.count("\n") == 1


def test_report_on_a_real_tiny_run_with_a_recorded_nvidia_smi_csv(tiny_run, tmp_path):
    """A run folder written by `workshop train` itself, plus an nvidia-smi CSV recorded on an H100."""
    run = tmp_path / "logs" / "baseline" / "tiny"
    shutil.copytree(tiny_run, run)
    shutil.copy(GPU_CSV, run / GPU_CSV.name)
    row = report.summarize(report.load_run(run))
    history = read_json(run / "log_history.json")
    evals = [e for e in history if "eval_loss" in e]
    summary = next(e for e in history if "train_runtime" in e)
    assert row["final_train_loss"] == [e["loss"] for e in history if "loss" in e][-1]
    assert row["eval_loss_per_epoch"] == [e["eval_loss"] for e in evals]
    assert row["eval_samples_per_second"] == evals[-1]["eval_samples_per_second"]
    assert row["train_runtime_s"] == summary["train_runtime"]
    with GPU_CSV.open() as f:
        gpu = list(csv.DictReader(f, skipinitialspace=True))
    assert row["peak_nvidia_smi_gib"] == max(int(r["memory.used [MiB]"]) for r in gpu) / 1024
    metrics = read_json(run / "metrics.json")
    assert row["tokens_per_second"] == metrics["tokens_per_second"]
    assert row["time_per_epoch_s"] == metrics["time_per_epoch_s"]
    # train.py's figure and the report's are one number: 256 samples an epoch in the tiny preset
    assert row["train_samples_per_second"] == metrics["train_samples_per_second"] == 256 / metrics["time_per_epoch_s"]
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    for name in ("loss.png", "gpu_memory.png", "peaks.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_the_peak_batch_length_follows_the_padding_the_run_recorded(tmp_path):
    def seq(data, device="cuda"):
        config = {"data": {"max_seq_length": 512, **data}, "data_stats": {"length_max": 426},
                  "environment": {"device": device}}
        return report._seq_len_at_peak(report.Run(tmp_path, config=config))

    assert seq({"pad_to_multiple_of": 64}) == 448
    assert seq({"pad_to_multiple_of": None}, device="cpu") == 426
    assert seq({}) == 432                          # a run folder from before the flag: 8 on a GPU
    assert seq({"pad_to_max_length": True}) == 512


def test_the_peak_batch_length_from_metrics_json_and_where_the_run_folder_says_nothing(tmp_path):
    """Where config.json lacks the data's numbers, metrics.json's; where no device is recorded, a CPU run's collator
    (no multiple), as for a CPU run from before --pad_to_multiple_of; where neither the longest sample nor the
    longest allowed is recorded, none (and no prediction)."""
    def seq(metrics, config):
        return report._seq_len_at_peak(report.Run(tmp_path, config=config, metrics=metrics))

    gpu = {"environment": {"device": "NVIDIA H100 80GB HBM3"}}
    assert seq({"max_seq_length": 512, "length_max": 426}, gpu) == 432  # 426 up to a multiple of 8
    assert seq({"max_seq_length": 512}, gpu) == 512                     # longest sample unknown: the longest allowed
    assert seq({"length_max": 426}, gpu) == 432                         # longest allowed unknown
    assert seq({"length_max": 426}, {"data": {}}) == 426
    assert seq({"length_max": 426}, {"environment": {"device": "cpu"}}) == 426
    assert seq({}, {}) is None


def _rewrite_csv(source: Path, target: Path, column: str, change) -> list[dict]:
    """A copy of a logger's CSV with ``column`` changed row by row; the rows written, as the csv module reads them."""
    with source.open() as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields, rows = reader.fieldnames, list(reader)
    for i, r in enumerate(rows):
        r[column] = str(change(i, int(r[column])))
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_several_hosts_each_keep_their_peak_and_the_row_takes_the_largest(run_dir):
    """A multi-node run writes one GPU and one host CSV per node. Reference: the CSVs read here with the csv module.
    The second node has the higher GPU peak (2 GPUs, the larger on GPU 1), the first the higher host peak, so a
    report that read only the first or only the last node, or took the smallest peak, is wrong on one of them."""
    gpu_b = _rewrite_csv(GPU_CSV, run_dir / "gpu_memory-gpu-node018.csv", "memory.used [MiB]",
                         lambda i, used: used + 700 * (i % 2))  # odd rows: GPU 1 of the node, 700 MiB more
    host_b = _rewrite_csv(HOST_CSV, run_dir / "host_memory-gpu-node018.csv", "used_mib", lambda i, used: used - 3000)
    with GPU_CSV.open() as f:
        gpu_a = list(csv.DictReader(f, skipinitialspace=True))
    with HOST_CSV.open() as f:
        host_a = list(csv.DictReader(f))
    gpu_peaks = {"gpu-node017": max(int(r["memory.used [MiB]"]) for r in gpu_a) / 1024,
                 "gpu-node018": max(int(r["memory.used [MiB]"]) for r in gpu_b) / 1024}
    host_peaks = {"gpu-node017": max(int(r["used_mib"]) for r in host_a) / 1024,
                  "gpu-node018": max(int(r["used_mib"]) for r in host_b) / 1024}
    assert gpu_peaks["gpu-node018"] > gpu_peaks["gpu-node017"] and host_peaks["gpu-node017"] > host_peaks["gpu-node018"]
    row = report.summarize(report.load_run(run_dir))
    assert row["nvidia_smi_peak_by_host"] == gpu_peaks
    assert row["peak_nvidia_smi_gib"] == gpu_peaks["gpu-node018"]
    assert row["host_used_peak_by_host"] == host_peaks
    assert row["peak_host_used_gib"] == host_peaks["gpu-node017"]


def test_without_metrics_json_no_time_or_throughput_and_peaks_from_steps(run_dir):
    """A run killed before metrics.json: no time per epoch, samples/s or tokens/s, rather than numbers on
    another clock (the Trainer's runtime and steps.jsonl's intervals count evaluation and checkpoints);
    losses from the log history, peaks the largest of steps.jsonl's. By hand."""
    (run_dir / "metrics.json").unlink()
    history = read_json(run_dir / "log_history.json")
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert next(e for e in history if "train_runtime" in e)["train_runtime"] and steps[0]["tokens_per_s"]
    row = report.summarize(report.load_run(run_dir))
    for key in ("time_per_epoch_s", "train_samples_per_second", "tokens_per_second", "mfu", "exact_match"):
        assert row[key] is None, key
    assert row["final_train_loss"] == [e["loss"] for e in history if "loss" in e][-1]
    assert row["peak_gpu_allocated_gib"] == max(s["gpu_peak_allocated_gib"] for s in steps)
    assert row["peak_gpu_reserved_gib"] == max(s["gpu_peak_reserved_gib"] for s in steps)
    assert row["peak_host_rss_gib"] == max(s["host_rss_gib"] for s in steps)


def test_the_set_up_peak_is_shown_beside_the_runs_peak(run_dir):
    """metrics.json's peak before the first step goes to the memory table, next to the run's peak; older runs
    without it show a dash."""
    metrics = read_json(run_dir / "metrics.json")
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "peak_gpu_allocated_setup_gib": 1.25}))
    row = report.summarize(report.load_run(run_dir))
    assert row["peak_gpu_allocated_setup_gib"] == 1.25
    table = report.markdown_table([row], report.MEMORY).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[header.index("set-up peak")] == "1.25"


def test_metrics_json_peaks_win_over_the_logged_steps_and_the_folder_is_named(run_dir):
    """metrics.json's peaks also cover what no logged step saw (the set-up, the last steps): they win over
    steps.jsonl's. Made larger than every step's here, by hand."""
    metrics = read_json(run_dir / "metrics.json")
    peaks = {"peak_gpu_allocated_gib": 99.0, "peak_gpu_reserved_gib": 98.0, "peak_host_rss_gib": 97.0}
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, **peaks}))
    row = report.summarize(report.load_run(run_dir))
    assert {k: row[k] for k in peaks} == peaks
    assert row["run_dir"] == str(run_dir)


def test_a_failed_runs_error_and_the_epochs_it_did(run_dir):
    """No epoch count recorded (a run stopped before metrics.json, its config without it): the epochs the log
    history reached; status.json's error beside it."""
    (run_dir / "metrics.json").unlink()
    config = read_json(run_dir / "config.json")
    config["training"].pop("num_train_epochs", None)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    history = read_json(run_dir / "log_history.json")
    row = report.summarize(report.load_run(run_dir))
    assert row["epochs"] == max(e["epoch"] for e in history if "epoch" in e)
    assert (row["status"], row["error"]) == ("failed", "RuntimeError: boom")


def test_no_prediction_where_the_run_folder_lacks_the_models_shape(run_dir):
    config = read_json(run_dir / "config.json")
    config.pop("model_info", None)
    config["model"] = {**config.get("model", {}), "model_name_or_path": "my-own-model"}
    (run_dir / "config.json").write_text(json.dumps(config))
    row = report.summarize(report.load_run(run_dir))
    assert row["peak_gpu_allocated_gib"] is not None
    for key in ("predicted_peak_allocated_gib", "predicted_gpu_total_gib", "predicted_host_gib",
                "allocated_over_predicted", "nvidia_smi_over_predicted"):
        assert row[key] is None, key


SOURCES_METRICS = {"stage": "m_stage", "run_id": "m_id", "model": "m_model", "dataset": "m_data", "precision": "fp16",
                   "deepspeed": "m.json", "zero_stage": 1, "offload_optimizer": "cpu", "offload_param": "cpu",
                   "num_nodes": 4, "global_batch_size": 64, "max_seq_length": 256, "epochs": 3, "train_samples": 100}
SOURCES_LABELS = {"stage": "l_stage", "run_id": "l_id", "model": "l_model", "dataset": "l_data", "deepspeed": "l.json"}
SOURCES_CONFIG = {"workshop": {"stage": "c_stage"}, "model": {"model_name_or_path": "c_model"},
                  "data": {"dataset_name": "c_data", "max_seq_length": 128}, "data_stats": {"train_samples": 50},
                  "training": {"precision": "bf16", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3,
                               "num_train_epochs": 5},
                  "environment": {"num_nodes": 2, "world_size": 2},
                  "deepspeed_config": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"},
                                                             "offload_param": {"device": "nvme"}}}}


@pytest.mark.parametrize("has, expected", [
    ("metrics", {"status": "completed", **SOURCES_METRICS}),
    ("labels", {"status": None, **SOURCES_LABELS, "precision": "bf16", "zero_stage": 3, "offload_optimizer": "nvme",
                "offload_param": "nvme", "num_nodes": 2, "global_batch_size": 2 * 3 * 2, "max_seq_length": 128,
                "epochs": 5, "train_samples": 50}),
    ("config", {"status": None, "stage": "c_stage", "run_id": "folder_id", "model": "c_model", "dataset": "c_data",
                "deepspeed": None, "global_batch_size": None}),  # no accumulation recorded: no global batch
    ("folder", {"stage": "folder_stage", "run_id": "folder_id", "num_nodes": 1}),
])
def test_settings_come_from_metrics_json_then_config_jsons_labels_then_its_sections(tmp_path, has, expected):
    """The sources disagree on purpose: each key from the first that has it (metrics.json; config.json's
    labels, where a run failed before metrics.json; config.json's own sections; the folder's names)."""
    config = {"labels": SOURCES_LABELS, **SOURCES_CONFIG} if has in ("metrics", "labels") else {}
    if has == "config":
        config = {**SOURCES_CONFIG, "training": {k: v for k, v in SOURCES_CONFIG["training"].items()
                                                 if k != "gradient_accumulation_steps"}}
    run = report.Run(path=tmp_path / "folder_stage" / "folder_id", config=config,
                     metrics=SOURCES_METRICS if has == "metrics" else {})
    found = report.settings(run)
    assert {k: found[k] for k in expected} == expected


# The fill-in tables of the rung READMEs, column for column: what a participant checks their table against.
FILL_IN = ["run", "setting", "final train loss", "eval loss per epoch", "train samples/s", "eval samples/s",
           "steps/epoch", "time/epoch (s)", "peak allocated (GiB)", "peak nvidia-smi (GiB)"]
RUNG_EXTRAS = {"baseline": [], "deepspeed_single_gpu": [], "offload": ["peak host used (GiB)"],
               "multi_node": ["GPUs", "scaling efficiency"]}


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table that follows `heading` (header first, the |---| line left out)."""
    lines = text.splitlines()
    start = lines.index(heading) + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_each_rung_gets_its_fill_in_table_with_perplexity_for_text(tmp_path, capsys):
    logs = tmp_path / "logs"
    for stage, dataset in (("baseline", "builtin"), ("deepspeed_single_gpu", "wikitext"), ("offload", "builtin"),
                           ("multi_node", "builtin")):
        target = logs / stage / "1"
        shutil.copytree(FIXTURE, target)
        metrics = read_json(target / "metrics.json")
        metrics.update(stage=stage, dataset=dataset)
        (target / "metrics.json").write_text(json.dumps(metrics))
    assert report.main([str(logs), "--no_plots"]) == 0
    out = capsys.readouterr().out
    history = read_json(FIXTURE / "log_history.json")
    evals = [e for e in history if "eval_loss" in e]
    for stage, extras in RUNG_EXTRAS.items():
        header, row = table_after(out, f"## {stage}")
        text = ["perplexity"] if stage == "deepspeed_single_gpu" else []
        assert header == FILL_IN + extras + text, stage
        assert row[0] == f"{stage}/1" and row[1] == "ZeRO-2"
        # The table shows 4 significant digits: a relative rounding of at most 5e-4.
        assert float(row[2]) == pytest.approx([e for e in history if "loss" in e][-1]["loss"], rel=5e-4)
        assert [float(v) for v in row[3].split(", ")] == pytest.approx([e["eval_loss"] for e in evals], rel=5e-4)
        assert int(row[6]) == 16
        if text:
            assert float(row[-1]) == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=5e-4)


def test_perplexity_is_exp_of_the_final_eval_loss(tiny_run):
    history = read_json(tiny_run / "log_history.json")
    final_eval = [e["eval_loss"] for e in history if "eval_loss" in e][-1]
    metrics = read_json(tiny_run / "metrics.json")
    assert metrics["perplexity"] == pytest.approx(math.exp(final_eval), rel=1e-12)
    assert report.summarize(report.load_run(tiny_run))["perplexity"] == pytest.approx(math.exp(final_eval), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# The report's own arithmetic and layout, on hand-made rows (what mutmut found untested).
# ----------------------------------------------------------------------------------------------
def _row(run, world, sps, **settings):
    row = dict(run=run, model="gpt2", dataset="squad", precision="bf16", zero_stage=2, offload_optimizer=None,
               offload_param=None, per_device_train_batch_size=4, gradient_accumulation_steps=1,
               max_seq_length=512, world_size=world, train_samples_per_second=sps)
    row.update(settings)
    return row


def test_scaling_efficiency_by_hand_within_groups_that_differ_only_in_gpu_count():
    rows = [
        _row("alone", 4, 40.0, model="gpt2-medium"),  # first: a group of one must not end the loop
        _row("a2", 2, 20.0), _row("a2bis", 2, 24.0), _row("a4", 4, 40.0), _row("a8", 8, 66.0),
        _row("b2", 2, 10.0, zero_stage=3), _row("b4", 4, 16.0, zero_stage=3),  # two GPU counts only
        _row("c4", 4, 40.0, max_seq_length=1024),  # differs in a setting from every other: alone
        _row("nospeed", 2, None),  # no samples/s: in no group
    ]
    report.add_scaling_efficiency(rows)
    got = {r["run"]: r["scaling_efficiency"] for r in rows}
    # Group a: the smallest count is 2, two runs of it: 10 and 12 samples/s per GPU, mean 11.
    # Exact to float rounding (one division each): rel 1e-12.
    assert {k: v for k, v in got.items() if v is not None} == pytest.approx(
        {"a2": 10 / 11, "a2bis": 12 / 11, "a4": 10 / 11, "a8": 8.25 / 11, "b2": 1.0, "b4": 0.8}, rel=1e-12)
    assert [k for k, v in got.items() if v is None] == ["alone", "c4", "nospeed"]  # not "" or 0: shown as "-"


def test_scaling_efficiency_only_against_runs_that_differ_in_gpu_count_alone_and_the_report_says_why_not():
    """Sample count, epochs, the GPU: each changes samples/s per GPU without any scaling, so a run that differs in
    one of them gets no efficiency, and the report names the closest one-GPU run and the settings they differ in;
    a group whose smallest count is more than one GPU says so."""
    same = dict(device="H100", epochs=3.0, train_samples=500)
    rows = [
        _row("one", 1, 10.0, **same),
        _row("four", 4, 36.0, **same),
        _row("four_short", 4, 40.0, **{**same, "epochs": 2.0, "train_samples": 64}),
        _row("four_h200", 4, 60.0, **{**same, "device": "H200"}),
        _row("two_z3", 2, 10.0, **{**same, "zero_stage": 3}), _row("eight_z3", 8, 32.0, **{**same, "zero_stage": 3}),
        _row("failed", 8, None, **same),  # no speed: nothing to say
    ]
    report.add_scaling_efficiency(rows)
    got = {r["run"]: r["scaling_efficiency"] for r in rows}
    # four: 36/4 = 9 per GPU against 10; eight_z3: 32/8 = 4 against 10/2 = 5.
    assert {k: v for k, v in got.items() if v is not None} == pytest.approx(
        {"one": 1.0, "four": 0.9, "two_z3": 1.0, "eight_z3": 0.8}, rel=1e-12)
    notes = [
        "`four_short` (4 GPUs): no scaling efficiency: no one-GPU run differs from it in the GPU count alone; the "
        "closest, `one`, differs in train_samples 500 vs 64, epochs 3.0 vs 2.0",
        "`four_h200` (4 GPUs): no scaling efficiency: no one-GPU run differs from it in the GPU count alone; the "
        "closest, `one`, differs in device H100 vs H200",
        "`two_z3` (2 GPUs): against two_z3, its smallest GPU count: no comparable one-GPU run",
        "`eight_z3` (8 GPUs): against two_z3, its smallest GPU count: no comparable one-GPU run",
    ]
    assert report.scaling_notes(rows) == notes
    # Between the rung tables and the Training section: a heading line, then the notes as a list, blank lines around.
    assert ("|\n\nScaling efficiency compares runs that differ in their GPU count alone:\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n## Training\n") in report.comparison_markdown(rows)
    alone = [_row("two", 2, 10.0), _row("four_z3", 4, 30.0, zero_stage=3)]  # each its own group: no efficiency
    report.add_scaling_efficiency(alone)
    assert report.scaling_notes(alone) == ["`two` (2 GPUs): no scaling efficiency: no one-GPU run among these runs",
                                           "`four_z3` (4 GPUs): no scaling efficiency: no one-GPU run among these runs"]


def test_setting_label_names_stage_offloads_and_gpu_count():
    """The rung tables' "setting" column, as the rung READMEs spell it; a row without a GPU count is one GPU."""
    assert report.setting_label({"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "nvme",
                                 "world_size": 8}) == "ZeRO-3 + opt cpu + params nvme x8 GPUs"
    assert report.setting_label({"zero_stage": 2, "offload_optimizer": None, "world_size": None}) == "ZeRO-2"
    assert report.setting_label({"zero_stage": None, "world_size": 1}) == "Trainer"


def test_scaling_against_names_every_run_at_the_smallest_count_and_the_closest_one_gpu_run_is_the_nearest():
    """Two one-GPU runs at the base (a folder name may hold spaces): the two-GPU run is measured against both
    and needs no note; every row has scaling_against (a CSV column), None outside a group; a run after one with
    an efficiency still gets its note; of several one-GPU runs the note names the one differing in fewest
    settings; a run that recorded no GPU count is taken for one GPU and gets no note."""
    rows = [
        _row("other", 1, 12.0, precision="fp32", max_seq_length=1024),  # differs from 4730 in two settings
        _row("4711", 1, 10.0), _row("4712 (rerun)", 1, 12.0),
        _row("4720", 2, 18.0),  # against 4711 and 4712 (rerun)
        _row("4730", 2, 20.0, precision="fp16"),  # in no group: 4711 differs from it in precision alone
        _row("unknown", None, 15.0),
    ]
    report.add_scaling_efficiency(rows)
    # 10 and 12 samples/s per GPU at one GPU, mean 11; 4720: 18 / 2 = 9 per GPU.
    assert {r["run"]: r["scaling_efficiency"] for r in rows if r["scaling_efficiency"] is not None} == (
        pytest.approx({"4711": 10 / 11, "4712 (rerun)": 12 / 11, "4720": 9 / 11}, rel=1e-12))
    assert {r["run"]: r["scaling_against"] for r in rows} == {
        "other": None, "4711": "4711, 4712 (rerun)", "4712 (rerun)": "4711, 4712 (rerun)",
        "4720": "4711, 4712 (rerun)", "4730": None, "unknown": None}
    assert report.scaling_notes(rows) == [
        "`4730` (2 GPUs): no scaling efficiency: no one-GPU run differs from it in the GPU count alone; the "
        "closest, `4711`, differs in precision bf16 vs fp16"]


def test_csv_holds_every_key_of_every_row_in_first_seen_order_lists_as_json():
    rows = [{"run": "a", "loss": [1.5, 2.0]}, {"run": "b", "only_b": {"k": "v"}}, {"run": "c", "only_c": ["x"]}]
    assert report.to_csv(rows) == ('run,loss,only_b,only_c\n'
                                   'a,"[1.5, 2.0]",,\n'
                                   'b,,"{""k"": ""v""}",\n'
                                   'c,,,"[""x""]"\n')  # "\n" line ends; JSON, not Python's repr


def test_default_out_one_run_its_folder_one_searched_folder_else_logs_report(tmp_path, run_dir):
    other = tmp_path / "logs" / "offload"
    other.mkdir(parents=True)
    assert report.default_out([str(run_dir)], [run_dir]) == run_dir
    assert report.default_out([str(tmp_path / "logs")], [run_dir, run_dir]) == tmp_path / "logs" / "report"
    assert report.default_out([str(tmp_path / "logs" / "deepspeed_single_gpu"), str(other)],
                              [run_dir, run_dir]) == Path("logs") / "report"


def test_report_md_layout_title_and_metrics_table(tmp_path, run_dir):
    out = tmp_path / "a" / "b" / "out"  # parents made
    run = report.load_run(run_dir)
    report.write_report([run], out, plots=False)
    text = (out / "report.md").read_text()
    row = report.summarize(run)
    assert text.startswith(f"# Workshop report: {row['run']}\n\n## deepspeed_single_gpu\n\n| run |")
    # Outside the tables, exactly the headings, blank lines around them, and the note.
    prose = [line for line in text.split("\n") if not line.startswith("|")]
    assert prose[:11] == [f"# Workshop report: {row['run']}", "", "## deepspeed_single_gpu", "", "", "## Training",
                          "", "", "## Memory (GiB per GPU; host: per node)", "", ""]
    assert prose[11].startswith("Peak allocated/reserved:") and prose[12:] == ["", "## Metrics", "", "", ""]
    metrics = text.split("## Metrics\n", 1)[1]
    for key in ("run", "run_dir", "setting", "nvidia_smi_peak_by_host", "host_used_peak_by_host", "time_breakdown_s"):
        assert key in row and f"| {key} |" not in metrics, key  # in the CSV, not in the one-run metrics table
    assert "| final_train_loss |" in metrics
    report.write_report([run, run], out, plots=False)
    assert (out / "report.md").read_text().startswith("# Workshop report: 2 runs\n")


def test_finding_run_folders_skips_logs_models_checkpoints_and_hidden_folders_sorted(tmp_path):
    logs = tmp_path / "logs"
    for rel in ("offload/20", "baseline/3", "baseline/12"):
        shutil.copytree(FIXTURE, logs / rel)
    (logs / "report.sh-12.out").write_text("a job log beside the run folders\n")  # a file: never descended into
    for skipped in ("baseline/.incomplete/7", "baseline/12x/checkpoints/checkpoint-8", "scale/model"):
        (logs / skipped).mkdir(parents=True)
        (logs / skipped / "log_history.json").write_text("[]")
    model = logs / "scale" / "gpt2-tiny"  # a model's folder (workshop scale's configs): config.json alone
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    started = logs / "baseline" / "99"  # status.json and config.json without a log: a run that died early
    started.mkdir()
    shutil.copy(FIXTURE / "config.json", started)
    (started / "status.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert report.find_run_dirs([logs, logs / "baseline"]) == [logs / "baseline" / r for r in ("12", "3", "99")] + [
        logs / "offload" / "20"]  # each once, sorted as text
    lone_status = tmp_path / "lone"
    lone_status.mkdir()
    (lone_status / "status.json").write_text("{}")
    assert not report.is_run_dir(lone_status) and not report.is_run_dir(model)


def test_steps_and_host_rows_after_a_cut_line_are_kept(tmp_path):
    # A job killed mid-line and requeued appends after the cut line: the rows after it count. A cut line
    # (fewer fields than the header: its used_mib "21" is a cut "21000") and a blank line are skipped.
    steps = tmp_path / "steps.jsonl"
    steps.write_text('{"step": 4}\n{"step": 8, "lo\n{"step": 8}\n{"step": 12}\n')
    assert report.read_steps(steps) == [{"step": 4}, {"step": 8}, {"step": 12}]
    host = tmp_path / "host_memory-n1.csv"
    host.write_text("timestamp,used_mib,total_mib,available_mib\n"
                    "2026/11/23 14:02:05.121,20950,515773,491703\n"
                    "2026/11/23 14:02:05.621,21\n"
                    "\n"
                    "2026/11/23 14:02:06.117,[N/A],515773,491703\n"
                    "2026/11/23 14:02:07.117,21000 MiB,515773,[N/A]\n"
                    "timestamp,used_mib,total_mib\n"  # restarted by an older logger without available_mib
                    "2026/11/23 14:03:00.000,22000,515773\n"
                    "timestamp,used_mib\n"  # ... one without total_mib
                    "2026/11/23 14:04:00.000,23000\n"
                    "timestamp,total_mib\n"  # ... and one without used_mib: nothing to read
                    "2026/11/23 14:05:00.000,515773\n")
    t = report.parse_time
    assert report.read_host_csv(host) == [
        {"time": t("2026/11/23 14:02:05.121"), "used_mib": 20950.0, "total_mib": 515773.0, "available_mib": 491703.0},
        {"time": t("2026/11/23 14:02:07.117"), "used_mib": 21000.0, "total_mib": 515773.0, "available_mib": None},
        {"time": t("2026/11/23 14:03:00"), "used_mib": 22000.0, "total_mib": 515773.0, "available_mib": None},
        {"time": t("2026/11/23 14:04:00"), "used_mib": 23000.0, "total_mib": None, "available_mib": None}]


def test_times_in_nvidia_smis_format_iso_8601_or_seconds_since_the_epoch():
    assert report.parse_time(" 2026/11/23 14:02:05.121 ") == datetime(2026, 11, 23, 14, 2, 5, 121000)
    assert report.parse_time("2026/11/23 14:02:05") == datetime(2026, 11, 23, 14, 2, 5)
    assert report.parse_time("2026-11-23T14:02:05.121") == datetime(2026, 11, 23, 14, 2, 5, 121000)
    # seconds since the epoch are local times: compared by their distance (mid-November, no clock change)
    assert report.parse_time("1795432925.5") - report.parse_time("1795429325") == timedelta(hours=1, seconds=0.5)
    assert report.parse_time("[N/A]") is None and report.parse_time("") is None


def test_gpu_csv_samples_by_hand(tmp_path):
    """nvidia-smi's CSV as numbers: a unit after the number dropped, '[N/A]' and '[Not Supported]' none, a sample
    without memory.used skipped, and an older logger without the later columns read as far as it goes (GPU 0)."""
    gpu = tmp_path / "gpu_memory-n1.csv"
    gpu.write_text("timestamp, index, name, memory.used [MiB], memory.total [MiB], utilization.gpu [%], "
                   "power.draw [W]\n"
                   "2026/11/23 14:02:05.121, 1, NVIDIA H100 80GB HBM3, 12253 MiB, 81559 MiB, 97 %, 512.25 W\n"
                   "2026/11/23 14:02:06.117, 0, NVIDIA H100 80GB HBM3, [N/A], 81559, 0, 69.38\n"
                   "2026/11/23 14:02:07.117, 0, NVIDIA H100 80GB HBM3, 700, 81559, [N/A], [Not Supported]\n"
                   "timestamp, memory.used [MiB]\n"
                   "2026/11/23 14:03:00.000, 800\n"
                   "timestamp, memory.total [MiB]\n"  # a logger without memory.used: nothing to read
                   "2026/11/23 14:04:00.000, 81559\n")
    h100 = "NVIDIA H100 80GB HBM3"
    assert report.read_gpu_csv(gpu) == [
        {"time": datetime(2026, 11, 23, 14, 2, 5, 121000), "index": 1, "name": h100, "memory_used_mib": 12253.0,
         "memory_total_mib": 81559.0, "utilization_pct": 97.0, "power_w": 512.25},
        {"time": datetime(2026, 11, 23, 14, 2, 7, 117000), "index": 0, "name": h100, "memory_used_mib": 700.0,
         "memory_total_mib": 81559.0, "utilization_pct": None, "power_w": None},
        {"time": datetime(2026, 11, 23, 14, 3), "index": 0, "name": "", "memory_used_mib": 800.0,
         "memory_total_mib": None, "utilization_pct": None, "power_w": None}]

def test_bad_paths_and_cut_json_are_one_line_errors_that_name_the_file(tmp_path, capsys, run_dir):
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such folder: give run folders " \
                                      "(logs/<stage>/<run id>) or logs/\n"
    (tmp_path / "logs" / "offload").mkdir()
    (tmp_path / "logs" / "baseline").mkdir()
    assert report.main([str(tmp_path / "logs" / "offload"), str(tmp_path / "logs" / "baseline")]) == 2
    assert capsys.readouterr().err == (f"error: no run folders (with metrics.json or log_history.json) under "
                                       f"{tmp_path / 'logs' / 'offload'} {tmp_path / 'logs' / 'baseline'}: give logs/ "
                                       "or a logs/<stage>/<run id> folder\n")
    (run_dir / "metrics.json").write_text('{"final_train_loss": 1.')  # killed while writing (before atomic writes)
    assert report.main([str(run_dir), "--no_plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'metrics.json'}: not valid JSON (") and "killed while writing" in err


def test_cli_out_no_plots_and_the_written_line(tmp_path, capsys, run_dir):
    args = report.build_parser().parse_args([])
    assert (args.paths, args.out, args.no_plots) == (["logs"], None, False)
    assert report.build_parser().prog == "workshop report"
    out = tmp_path / "elsewhere"
    assert report.main([str(run_dir), "--out", str(out), "--no_plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.md"]  # no PNGs
    assert not (run_dir / "report.md").exists()
    assert capsys.readouterr().out.endswith(f"\nwritten: {out / 'report.md'}, {out / 'report.csv'}\n")


def test_a_run_without_metrics_json_takes_its_settings_from_config_json(run_dir):
    # A run that failed before its end has config.json and status.json only: the row's settings are read
    # from config.json's sections, then (without labels) from the model, data and folder names.
    (run_dir / "metrics.json").unlink()
    (run_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    config = read_json(run_dir / "config.json")
    config["environment"].update(world_size=4, num_nodes=2)
    config["training"].update(per_device_train_batch_size=3, gradient_accumulation_steps=5, num_train_epochs=7.0)
    config["data"].update(max_seq_length=640, pad_to_max_length=True, pad_to_multiple_of=64, loss_on="sequence")
    config["data_stats"] = {"train_samples": 321}
    config["model"].update(attn_implementation="eager", fast_kernels=False)
    config["training"].update(gradient_checkpointing=True, torch_compile=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    expected = dict(run="deepspeed_single_gpu/4711", status="failed", stage="deepspeed_single_gpu", run_id="4711",
                    model="gpt2-medium", dataset="builtin", device="NVIDIA H100 80GB HBM3", precision="bf16",
                    deepspeed="zero2.json", zero_stage=2, offload_optimizer=None, offload_param=None, world_size=4,
                    num_nodes=2, per_device_train_batch_size=3, gradient_accumulation_steps=5,
                    global_batch_size=3 * 5 * 4, max_seq_length=640, epochs=7.0, train_samples=321,
                    pad_to_max_length=True, pad_to_multiple_of=64, loss_on="sequence", attn_implementation="eager",
                    fast_kernels=False, gradient_checkpointing=True, torch_compile=True)
    assert report.settings(report.load_run(run_dir)) == expected
    config["model"]["model_name_or_path"], config["data"]["dataset_name"] = "m-from-model", "d-from-data"
    del config["labels"], config["workshop"]
    (run_dir / "config.json").write_text(json.dumps(config))
    expected.update(model="m-from-model", dataset="d-from-data", deepspeed=None)  # stage and id: the folder names
    assert report.settings(report.load_run(run_dir)) == expected
    config["workshop"] = {"stage": "offload"}
    (run_dir / "config.json").write_text(json.dumps(config))
    assert report.settings(report.load_run(run_dir))["stage"] == "offload"


def test_metrics_json_labels_win_over_config_json(run_dir):
    config = read_json(run_dir / "config.json")
    config["labels"]["deepspeed"] = "other.json"
    config["deepspeed_config"]["zero_optimization"]["stage"] = 3
    config["training"].update(per_device_train_batch_size=3, gradient_accumulation_steps=5)
    del config["environment"]["world_size"]
    (run_dir / "config.json").write_text(json.dumps(config))
    metrics = read_json(run_dir / "metrics.json")
    row = report.settings(report.load_run(run_dir))
    assert (row["deepspeed"], row["zero_stage"]) == (metrics["deepspeed"], metrics["zero_stage"]) == ("zero2.json", 2)
    assert (row["per_device_train_batch_size"], row["gradient_accumulation_steps"]) == (4, 1)  # metrics.json's
    del metrics["world_size"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert report.settings(report.load_run(run_dir))["world_size"] == 1  # recorded nowhere: one GPU
    del metrics["deepspeed"], metrics["zero_stage"]  # an older metrics.json: config.json's labels and JSON
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    row = report.settings(report.load_run(run_dir))
    assert (row["deepspeed"], row["zero_stage"]) == ("other.json", 3)


def test_where_the_time_went_one_row_per_run_one_column_per_phase(tmp_path, capsys):
    """Runs with time_breakdown_s get a row of their own section, in seconds to 0.1; a run recorded without one
    (here the fixture) gets none, and the rung tables stay as they are."""
    logs = tmp_path / "logs" / "deepspeed_single_gpu"
    shutil.copytree(FIXTURE, logs / "4711")
    shutil.copytree(FIXTURE, logs / "4712")
    metrics = read_json(logs / "4712" / "metrics.json")
    metrics.update(wall_time_s=37.24, time_breakdown_s={"launch_and_imports": 10.06, "training_steps": 6.14,
                                                        "evaluation": 21.04})
    (logs / "4712" / "metrics.json").write_text(json.dumps(metrics))
    assert report.main([str(tmp_path / "logs"), "--no_plots"]) == 0
    printed = capsys.readouterr().out
    section = printed.split("## Where the time went (s)\n\n")[1].split("\n\n")[0]
    assert section.splitlines() == [
        "| run | wall time | launch_and_imports | training_steps | evaluation |", "|---|---|---|---|---|",
        "| deepspeed_single_gpu/4712 | 37.2 | 10.1 | 6.1 | 21 |"]
    assert printed.index("## deepspeed_single_gpu") < printed.index("## Where the time went")
    # After the table, a blank line, the one-line note, a blank line, then the Memory section.
    after = printed.split("## Where the time went (s)\n\n")[1].splitlines()[3:7]
    assert after[0] == after[2] == "" and after[1][:1] not in ("", "|", "#")
    assert after[3] == "## Memory (GiB per GPU; host: per node)"
