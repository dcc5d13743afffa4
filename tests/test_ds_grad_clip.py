"""--foreach_grad_clip: ZeRO-1's clipping in bf16 with multi-tensor operations, the same arithmetic as DeepSpeed's."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_with_deepspeed
from workshop import ds_grad_clip


def tensors():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in ((3,), (100, 7), (7,), (1000,))]


def test_the_norm_and_the_clipping_are_deepspeeds():
    from deepspeed.runtime import utils

    assert ds_grad_clip.foreach_global_norm(tensors()).item() == pytest.approx(
        utils.get_global_norm_of_tensors(tensors()).item(), rel=1e-6)
    for poison in (float("inf"), float("nan")):  # DeepSpeed marks a norm it cannot use as -1
        assert ds_grad_clip.foreach_global_norm([*tensors(), torch.tensor([poison])]).item() == -1.0
    for max_norm in (1.0, 1e3):  # clipped, then left as they are
        ours, theirs = tensors(), tensors()
        ds_grad_clip.foreach_clip_by_global_norm(ours, max_norm)
        utils.clip_tensors_by_global_norm(theirs, max_norm)
        assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(ours, theirs))
        assert max_norm > 100 or not torch.equal(ours[0], tensors()[0])


# DeepSpeed's BF16_Optimizer on the CPU: three clipped steps from the same start with each pair of
# functions, and which norm function ran.
BF16_ZERO1_SCRIPT = """
import json
import torch
from deepspeed.runtime import bf16_optimizer
from workshop import ds_grad_clip

def train(foreach):
    ds_grad_clip.use(foreach)
    installed, ran = bf16_optimizer.get_global_norm_of_tensors, set()
    bf16_optimizer.get_global_norm_of_tensors = lambda *a, **k: ran.add(installed.__name__) or installed(*a, **k)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    config = {"train_batch_size": 4, "gradient_clipping": 0.05, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2), config=config)
    assert type(engine.optimizer) is bf16_optimizer.BF16_Optimizer
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    norms = []
    for _ in range(3):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    weights = [w for p in engine.module.parameters() for w in p.detach().float().flatten().tolist()]
    return {"ran": sorted(ran), "norms": norms, "weights": weights}

print(json.dumps({"ours": train(True), "theirs": train(False)}))
"""


def test_zero1_in_bf16_takes_the_same_steps_with_either():
    found = json.loads(run_with_deepspeed(BF16_ZERO1_SCRIPT).strip().splitlines()[-1])
    ours, theirs = found["ours"], found["theirs"]
    assert (ours["ran"], theirs["ran"]) == (["foreach_global_norm"], ["get_global_norm_of_tensors"])
    assert min(theirs["norms"]) > 0.05  # every step clipped
    assert ours["norms"] == pytest.approx(theirs["norms"], rel=1e-6)
    assert ours["weights"] == pytest.approx(theirs["weights"], rel=1e-6, abs=1e-7)


# A DeepSpeed run of `workshop train` (the tiny preset, one step), then the norm function BF16_Optimizer's module has.
TRAIN_SCRIPT = """
import sys, tempfile
from deepspeed.runtime import bf16_optimizer
from workshop import train
assert train.main(["--preset", "tiny", "--deepspeed", "ds_configs/zero1.json", "--run_dir", tempfile.mkdtemp() + "/run",
                   "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--no_save_model",
                   "--answer_eval_samples", "0", *sys.argv[1:]]) == 0
print("installed", bf16_optimizer.get_global_norm_of_tensors.__name__)
"""


@pytest.mark.parametrize("flags, installed", [([], "foreach_global_norm"),
                                              (["--foreach_grad_clip", "false"], "get_global_norm_of_tensors")])
def test_workshop_train_gives_deepspeed_the_functions_the_flag_asks_for(flags, installed):
    result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, *flags], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"installed {installed}" in result.stdout.splitlines()
