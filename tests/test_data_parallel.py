"""Several processes split the data without overlap, and the global batch follows the process count."""

import json
import os
import subprocess
import sys

from conftest import REPO

# Runs on every rank under torchrun: the samples this rank's training dataloader yields in epoch 0.
RANK_SCRIPT = r"""
import json, os, sys
from workshop import config, data_loader, distributed, model as models
from workshop.trainer import WorkshopTrainer
distributed.init_env(deepspeed=False)
model_args, data_args, ws_args, args = config.parse(sys.argv[2:])
_ = args.device
tokenizer = models.load_tokenizer(model_args)
prepared = data_loader.prepare(data_args, tokenizer, seed=args.seed)
trainer = WorkshopTrainer(model=models.build_model(model_args, tokenizer, models.model_config(model_args, tokenizer)),
                          args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                          data_collator=data_loader.Collator(tokenizer.pad_token_id))
seen = [tuple(row[row != tokenizer.pad_token_id].tolist()) for batch in trainer.get_train_dataloader()
        for row in batch["input_ids"]]
with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"seen": seen, "world": args.world_size,
               "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
               "train": [tuple(s["input_ids"]) for s in prepared.train]}, f)
"""


def test_two_ranks_see_disjoint_halves_of_the_data(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "--preset", "tiny", "--max_train_samples", "64", "--gradient_accumulation_steps", "2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["global_batch"] == 8 * 2 * 2  # micro-batch x accumulation x processes
    first, second = ({tuple(s) for s in r["seen"]} for r in ranks)
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 32
    assert not first & second, "a sample went to both ranks"
    assert first | second == {tuple(s) for s in ranks[0]["train"]}, "every sample goes to one rank"
