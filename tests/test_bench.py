"""workshop bench on the CPU: its plumbing (the GPU timings themselves are measured on a GPU, not here)."""

import json

from workshop import bench


def test_bench_runs_each_mode_into_its_own_run_folder_and_tabulates_them(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--models", "tiny-gpt2", "--stages", "baseline", "--modes", "default",
                       "default_length_grouped", "--samples", "32", "--eval_samples", "8", "--no_reference",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())
    assert [(r["mode"], r["status"]) for r in rows] == [("default", "completed"),
                                                       ("default_length_grouped", "completed")]
    for mode in ("default", "default_length_grouped"):
        metrics = json.loads((out / f"tiny-gpt2-baseline-{mode}" / "metrics.json").read_text())
        assert metrics["train_samples"] == 32 and metrics["stage"] == "bench"
        assert rows[[r["mode"] for r in rows].index(mode)]["time_per_epoch_s"] == metrics["time_per_epoch_s"]
    assert "| tiny-gpt2 | baseline | default_length_grouped |" in (out / "bench.md").read_text()
    # a second invocation into the same folder would overwrite measurements: refused
    assert bench.main(["--models", "tiny-gpt2", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
