"""workshop scale on the CPU: the search, the prediction, failures kept as rows (the ladder itself runs on a GPU)."""

import json
import shutil

import pytest

from workshop import memory, scale
from workshop.shapes import model_shape


def runs(outcomes):
    """An attempt function that trains the sizes marked True, and the list of sizes it was asked for."""
    asked = []

    def attempt(i):
        asked.append(i)
        return outcomes[i]

    return attempt, asked


@pytest.mark.parametrize("outcomes, start, largest, asked", [
    ([True, True, True, False, False], 1, 2, [1, 2, 3]),      # climbs from the prediction, stops at the first failure
    ([True, True, False, False], 3, 1, [3, 2, 1]),             # predicted too high: steps down until one trains
    ([True, True, True], 2, 2, [2]),                           # the largest size trains: nothing above to try
    ([False, False], None, None, [0]),                         # nothing predicted to fit, the smallest fails too
    ([True, False, True], 0, 0, [0, 1]),                       # never tries a size above a failure
])
def test_search_finds_the_largest_size_that_trains(outcomes, start, largest, asked):
    attempt, tried = runs(outcomes)
    assert scale.search(len(outcomes), start, attempt) == largest
    assert tried == asked


def test_predicted_ceiling_is_the_last_fit_before_the_first_misfit():
    assert scale.predicted_ceiling([True, True, False, True]) == 1
    assert scale.predicted_ceiling([False, True]) is None
    assert scale.predicted_ceiling([True, True]) == 1


def test_scaled_shapes_grow_along_the_ladder(tmp_path):
    configs = scale.write_configs(tmp_path, scale.LADDER)
    params = [model_shape(str(configs[name])).n_params for name in scale.LADDER]
    assert params == sorted(params)
    assert 13e9 < params[scale.LADDER.index("bloom-14b")] < 15e9  # 12 L h^2 + V h for 40 x 5120


# Peak host memory (the training process's resident memory) of `workshop scale` attempts on one H200 node
# (2026-12-01, torch 2.11, DeepSpeed 0.19.8, micro-batch 1 x 512, bf16; BENCHMARKS.md, "The scale ladder"): (stage, model) -> GiB.
H200_HOST_MEASURED = {
    ("zero2_offload", "bloom-4b8"): 119.9, ("zero2_offload_nopin", "bloom-4b8"): 84.4,
    ("zero2_offload_nopin", "bloom-6b3"): 108.9, ("zero2_offload_nopin", "bigscience/bloom-7b1"): 122.4,
    ("zero3_offload", "bloom-4b8"): 91.9, ("zero3_offload", "bloom-6b3"): 113.1,
    ("zero3_offload_nopin", "bigscience/bloom-7b1"): 122.4, ("zero3_offload_all", "bloom-4b8"): 122.2,
}


def test_host_prediction_counts_deepspeeds_offload_buffers_and_the_pinned_rounding(tmp_path):
    configs = scale.write_configs(tmp_path, sorted({model for _, model in H200_HOST_MEASURED}))
    for (stage, model), measured in H200_HOST_MEASURED.items():
        predicted = scale.predict(model_shape(str(configs[model])), stage, 512, "bf16", False).host_bytes
        assert abs(predicted / scale.GIB / measured - 1) < 0.03, (stage, model, predicted / scale.GIB, measured)
    # The allocator's rounding: a pinned buffer just past a power of two takes nearly twice its size.
    assert memory.host_allocation_bytes(2**30 + 1, pinned=True) == 2**31
    assert memory.host_allocation_bytes(2**30 + 1, pinned=False) == 2**30 + 1


def test_nvme_prediction_is_what_zero_infinity_wrote(tmp_path):
    """bloom-3b's swap files on the H200 node (BENCHMARKS.md, the scale ladder) took 51.7 GiB. By hand: the
    optimizer's fp32 master, two moments and gradients, 4 bytes each, and the 16-bit parameters, 2; a node
    holds its share."""
    configs = scale.write_configs(tmp_path, ["bigscience/bloom-3b"])
    predicted = scale.predict(model_shape(str(configs["bigscience/bloom-3b"])), "zero3_nvme", 512, "bf16", False)
    assert abs(predicted.nvme_bytes / scale.GIB / 51.7 - 1) < 0.03
    for optimizer, param, per_param in (("nvme", "nvme", 18), ("nvme", None, 16), ("cpu", "nvme", 2), ("cpu", "cpu", 0)):
        for nodes in (1, 2):
            settings = memory.Settings(512, 1, 3, optimizer, param, world_size=2 * nodes, num_nodes=nodes)
            assert memory.nvme_bytes(1000, settings) == per_param * 1000 // nodes, (optimizer, param, nodes)


def test_offload_moves_the_predicted_ceiling_until_host_memory_is_the_wall(tmp_path):
    configs = scale.write_configs(tmp_path, scale.LADDER)
    shapes = [model_shape(str(configs[name])) for name in scale.LADDER]

    def ceiling(stage, host_gib, nvme_gib=None):
        resources = scale.Resources(80 * scale.GIB, host_gib * scale.GIB, nvme_gib and nvme_gib * scale.GIB)
        return scale.predicted_ceiling([scale.fits(scale.predict(s, stage, 512, "bf16", False), resources)
                                        for s in shapes])

    assert ceiling("baseline", 512) < min(ceiling("zero2_offload", 512), ceiling("zero3_offload_all", 512))
    assert ceiling("zero3_offload_all", 128) < ceiling("zero3_offload_all", 512)  # the states live on the host
    assert ceiling("zero3_nvme", 128, 64) < ceiling("zero3_nvme", 128, 1024)      # ... or on the disk


def test_scale_keeps_a_refused_size_as_a_row_and_steps_down(tmp_path, capsys):
    """tiny-gpt2 has 512 positions, tiny-bloom (ALiBi) none: at 1024 tokens the larger one is refused."""
    out = tmp_path / "scale"
    assert scale.main(["--stages", "baseline", "--models", "tiny-bloom", "tiny-gpt2", "--seq_len", "1024",
                       "--steps", "2", "--gpu_memory_gib", "80", "--out", str(out)]) == 0
    result = json.loads((out / "scale.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["tiny-gpt2"]["status"] == "refused"
    assert "--max_seq_length 1024 is longer than the model's 512 positions" in rows["tiny-gpt2"]["error"]
    assert rows["tiny-bloom"]["status"] == "completed" and rows["tiny-bloom"]["tokens_per_second"] > 0
    assert rows["tiny-bloom"]["peak_host_rss_gib"] > 0
    assert result["summary"] == [{
        "stage": "baseline", "largest_trained": "tiny-bloom", "largest_trained_params": rows["tiny-bloom"]["params"],
        "predicted_ceiling": "tiny-gpt2", "sizes_apart": -1, "gpu_gib": 80.0,
        "host_available_gib": result["summary"][0]["host_available_gib"], "nvme_free_gib": None}]
    metrics = json.loads((out / "baseline" / "tiny-bloom" / "metrics.json").read_text())
    assert metrics["total_steps"] == 2 and metrics["max_seq_length"] == 1024
    assert "| baseline | tiny-bloom |" in (out / "scale.md").read_text()


def test_scale_refuses_bad_input_before_running_anything(tmp_path, capsys):
    assert scale.main(["--stages", "zero3_nvme", "--gpu_memory_gib", "80", "--out", str(tmp_path / "a")]) == 2
    assert "--nvme_path" in capsys.readouterr().err
    assert scale.main(["--models", "gpt2-huge", "--gpu_memory_gib", "80", "--out", str(tmp_path / "b")]) == 2
    assert "--models gpt2-huge" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_predictions_grow_with_size_along_the_ladder(tmp_path):
    """What summarize relies on: the predicted ceiling is the largest attempted size predicted to fit."""
    configs = scale.write_configs(tmp_path, scale.LADDER)
    shapes = [model_shape(str(configs[name])) for name in scale.LADDER]
    for stage in scale.STAGES:
        predicted = [scale.predict(s, stage, 512, "bf16", False) for s in shapes]
        for key in ("gpu_total_bytes", "host_bytes", "nvme_bytes"):
            values = [getattr(e, key) for e in predicted]
            assert values == sorted(values), (stage, key)


def test_the_table_puts_each_measured_peak_beside_its_prediction():
    """The estimator is checked against PyTorch's peak: the ratio is measured over predicted, 7.5 / 6.0."""
    row = {"stage": "zero3_nvme", "model": "bloom-3b", "params": 3.0e9, "predicted_fits": True, "status": "completed",
           "tokens_per_second": 8.0, "peak_gpu_allocated_gib": 7.5, "predicted_peak_allocated_gib": 6.0,
           "nvidia_smi_peak_gib": 19.0, "predicted_gpu_gib": 9.0, "peak_host_rss_gib": 31.8, "predicted_host_gib": 5.1,
           "nvme_used_gib": 51.7, "predicted_nvme_gib": 50.3}
    refused = {**row, "status": "refused", "error": "no room", "peak_gpu_allocated_gib": None, "tokens_per_second": None}
    lines = scale.table([row, refused]).splitlines()
    assert lines[2] == ("| zero3_nvme | bloom-3b | 3.00B | yes | completed | 8 | 7.5 | 6.0 | 125.0% | 19.0 | 9.0 | 31.8 | "
                        "5.1 | 51.7 | 50.3 |")
    assert "| - | 6.0 | - |" in lines[3]


def fake_attempts(monkeypatch, trains):
    """attempt_row without training: a size trains when trains(stage, model) says so."""
    def attempt_row(out, stage, name, *args):
        ok = trains(stage, name.split("/")[-1])
        return {"status": "completed" if ok else "oom", "error": None if ok else "out of GPU memory", "wall_s": 1.0}

    monkeypatch.setattr(scale, "attempt_row", attempt_row)


def test_results_are_written_after_every_attempt_and_stage(tmp_path, monkeypatch):
    """A job stopped at its time limit in the second stage keeps the first stage's rows and summary."""
    out = tmp_path / "scale"

    def trains(stage, model):
        if stage == "zero2":
            raise KeyboardInterrupt  # the job's time limit
        return model != "bloom-1b1"

    fake_attempts(monkeypatch, trains)
    with pytest.raises(KeyboardInterrupt):
        scale.main(["--stages", "baseline", "zero2", "--models", "gpt2-medium", "bigscience/bloom-560m",
                    "bigscience/bloom-1b1", "--gpu_memory_gib", "12", "--out", str(out)])
    result = json.loads((out / "scale.json").read_text())
    assert [(r["model"], r["status"]) for r in result["rows"]] == [("bloom-560m", "completed"), ("bloom-1b1", "oom")]
    assert [(s["stage"], s["largest_trained"], s["predicted_ceiling"], s["sizes_apart"]) for s in result["summary"]] \
        == [("baseline", "bloom-560m", "bloom-560m", 0)]
    assert result["ladder"] == ["gpt2-medium", "bloom-560m", "bloom-1b1"]
    assert "| baseline | bloom-560m |" in (out / "scale.md").read_text()


def test_combine_makes_one_ladder_from_runs_split_by_stage(tmp_path, monkeypatch, capsys):
    models = ["--models", "gpt2-medium", "bigscience/bloom-560m", "bigscience/bloom-1b1", "--gpu_memory_gib", "12"]
    fake_attempts(monkeypatch, lambda stage, model: model == "gpt2-medium" or stage == "zero3_offload")
    assert scale.main(["--stages", "baseline", "zero2", *models, "--out", str(tmp_path / "a")]) == 0
    fake_attempts(monkeypatch, lambda stage, model: model != "bloom-1b1")
    assert scale.main(["--stages", "zero2", "zero3_offload", *models, "--out", str(tmp_path / "b")]) == 0
    # b's zero2 rows lose their summary, as when a job is stopped before the stage's end
    b = json.loads((tmp_path / "b" / "scale.json").read_text())
    b["summary"] = [s for s in b["summary"] if s["stage"] != "zero2"]
    (tmp_path / "b" / "scale.json").write_text(json.dumps(b))
    capsys.readouterr()

    assert scale.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "all")]) == 0
    result = json.loads((tmp_path / "all" / "scale.json").read_text())
    summary = {s["stage"]: s for s in result["summary"]}
    assert list(summary) == ["baseline", "zero2", "zero3_offload"]  # the order of STAGES
    assert summary["baseline"]["largest_trained"] == "gpt2-medium" and summary["baseline"]["from"] == str(tmp_path / "a")
    assert summary["zero2"]["from"] == str(tmp_path / "b")  # the later run's rows win, their summary made again
    assert summary["zero2"]["largest_trained"] == "bloom-560m"
    assert {r["stage"] for r in result["rows"] if r["model"] == "bloom-560m"} == {"baseline", "zero2", "zero3_offload"}
    assert len([r for r in result["rows"] if r["stage"] == "zero2"]) == len([r for r in b["rows"] if r["stage"] == "zero2"])
    assert "Combined from" in capsys.readouterr().out

    assert scale.main(["--combine", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert f"--combine {tmp_path / 'none'}: no scale.json" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_combine_can_predict_again_against_the_resources_each_run_recorded(tmp_path, monkeypatch, capsys):
    models = ["--models", "gpt2-medium", "bigscience/bloom-560m", "bigscience/bloom-1b1", "--gpu_memory_gib", "12"]
    fake_attempts(monkeypatch, lambda stage, model: model != "bloom-1b1")
    assert scale.main(["--stages", "baseline", "zero2", *models, "--out", str(tmp_path / "a")]) == 0
    fresh = json.loads((tmp_path / "a" / "scale.json").read_text())
    # As if an older estimator had predicted these rows: nothing fits, nothing on the host. The zero2
    # stage lost its summary (its job stopped), so it takes the run's other recorded resources.
    old = {**fresh, "rows": [{**r, "predicted_fits": False, "predicted_host_gib": 0.0} for r in fresh["rows"]],
           "summary": [s for s in fresh["summary"] if s["stage"] != "zero2"]}
    (tmp_path / "a" / "scale.json").write_text(json.dumps(old))

    assert scale.main(["--combine", str(tmp_path / "a"), "--out", str(tmp_path / "kept")]) == 0
    kept = json.loads((tmp_path / "kept" / "scale.json").read_text())
    assert not any(r["predicted_fits"] for r in kept["rows"])  # without --repredict the runs' own predictions
    assert scale.main(["--combine", str(tmp_path / "a"), "--repredict", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "scale.json").read_text())
    assert again["rows"] == fresh["rows"]
    assert [{k: s[k] for k in ("stage", "predicted_ceiling", "sizes_apart")} for s in again["summary"]] == [
        {k: s[k] for k in ("stage", "predicted_ceiling", "sizes_apart")} for s in fresh["summary"]]
    assert "Predictions made again by the current estimator" in capsys.readouterr().out

    # The ceiling is predicted over the whole ladder, not only over the sizes attempted: here bloom-1b1,
    # which the run never tried (bloom-560m failed).
    fake_attempts(monkeypatch, lambda stage, model: model == "gpt2-medium")
    assert scale.main(["--stages", "baseline", *models, "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "scale.json").read_text())
    assert "bloom-1b1" not in {r["model"] for r in b["rows"]}
    b["summary"] = [{**s, "gpu_gib": 1000.0} for s in b["summary"]]
    (tmp_path / "b" / "scale.json").write_text(json.dumps(b))
    assert scale.main(["--combine", str(tmp_path / "b"), "--repredict", "--out", str(tmp_path / "big")]) == 0
    big = json.loads((tmp_path / "big" / "scale.json").read_text())["summary"][0]
    assert (big["predicted_ceiling"], big["sizes_apart"]) == ("bloom-1b1", -2)

    assert scale.main(["--repredict", "--out", str(tmp_path / "c")]) == 2
    assert "--repredict predicts earlier runs again: give their folders with --combine" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "a" / "models" / "bloom-560m")
    assert scale.main(["--combine", str(tmp_path / "a"), "--repredict", "--out", str(tmp_path / "c")]) == 2
    assert "bloom-560m/config.json is missing; leave out --repredict" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
