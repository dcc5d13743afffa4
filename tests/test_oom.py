"""Out of GPU memory: one line with the peak, the estimate and what to try; the run folder says oom."""

import torch

from conftest import read_json
from workshop import train
from workshop.checkpoints import WorkshopTrainer


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
