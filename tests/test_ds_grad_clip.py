"""--foreach_grad_clip: DeepSpeed's per-tensor gradient work as multi-tensor operations, the same arithmetic."""

import json
import os
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
    # DeepSpeed before 0.19.8 passes use_graph (bf16.graph_harvesting): taken, and false changes nothing
    assert ds_grad_clip.foreach_global_norm(tensors(), use_graph=False).item() == ds_grad_clip.foreach_global_norm(
        tensors()).item()
    ours = tensors()
    ds_grad_clip.foreach_clip_by_global_norm(ours, 1.0, use_graph=False)
    assert not torch.equal(ours[0], tensors()[0])


# DeepSpeed on the CPU: three clipped steps from the same start with each set of functions, and which of
# them ran. ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer (which also adds each gradient into
# its fp32 buffer with ours), ZeRO-2 its ZeRO optimizer.
STEPS_SCRIPT = """
import json
import torch
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from workshop import ds_grad_clip

optimizer, tracked = ((bf16_optimizer.BF16_Optimizer, [(bf16_optimizer, "get_global_norm_of_tensors"),
                                                        (bf16_optimizer.BF16_Optimizer, "update_hp_grads")])
                      if stage == 1 else (DeepSpeedZeroOptimizer, [(DeepSpeedZeroOptimizer, "get_grad_norm_direct")]))

def train(foreach):
    ds_grad_clip.use(foreach)
    ran = set()
    for owner, name in tracked:
        installed = getattr(owner, name)
        setattr(owner, name, lambda *a, installed=installed, **k: ran.add(installed.__name__) or installed(*a, **k))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    config = {"train_batch_size": 4, "gradient_clipping": 0.05, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}}
    if stage == 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2), config=config)
    assert type(engine.optimizer) is optimizer
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    norms = []
    for _ in range(3):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    weights = [w for p in engine.module.parameters() for w in p.detach().float().flatten().tolist()]
    if stage == 2:  # a gradient that is not finite: DeepSpeed marks the norm -1
        norms.append(float(engine.optimizer.get_grad_norm_direct([torch.tensor([float("inf")])], [net[0].bias])))
    return {"ran": sorted(ran), "norms": norms, "weights": weights}

print(json.dumps({"ours": train(True), "theirs": train(False)}))
"""


@pytest.mark.parametrize("stage, ours, theirs", [
    (1, ["foreach_global_norm", "foreach_update_hp_grads"], ["get_global_norm_of_tensors", "update_hp_grads"]),
    (2, ["foreach_grad_norm_direct"], ["get_grad_norm_direct"])])
def test_zero1_and_zero2_in_bf16_take_the_same_steps_with_either(stage, ours, theirs):
    found = json.loads(run_with_deepspeed(f"stage = {stage}\n" + STEPS_SCRIPT).strip().splitlines()[-1])
    assert (found["ours"]["ran"], found["theirs"]["ran"]) == (ours, theirs)
    assert min(found["theirs"]["norms"][:3]) > 0.05  # every step clipped
    assert found["theirs"]["norms"][3:] == ([-1.0] if stage == 2 else [])
    assert found["ours"]["norms"] == pytest.approx(found["theirs"]["norms"], rel=1e-6)
    assert found["ours"]["weights"] == pytest.approx(found["theirs"]["weights"], rel=1e-6, abs=1e-7)


# A DeepSpeed run of `workshop train` (the tiny preset, one step), then the functions BF16_Optimizer and the ZeRO
# optimizer have.
TRAIN_SCRIPT = """
import sys, tempfile
from deepspeed.runtime import bf16_optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from workshop import train
assert train.main(["--preset", "tiny", "--deepspeed", "ds_configs/zero1.json", "--run_dir", tempfile.mkdtemp() + "/run",
                   "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--no_save_model",
                   "--answer_eval_samples", "0", *sys.argv[1:]]) == 0
print("installed", bf16_optimizer.get_global_norm_of_tensors.__name__,
      bf16_optimizer.BF16_Optimizer.update_hp_grads.__name__, DeepSpeedZeroOptimizer.get_grad_norm_direct.__name__)
"""


@pytest.mark.parametrize("flags, installed", [
    ([], "foreach_global_norm foreach_update_hp_grads foreach_grad_norm_direct"),
    (["--foreach_grad_clip", "false"], "get_global_norm_of_tensors update_hp_grads get_grad_norm_direct")])
def test_workshop_train_gives_deepspeed_the_functions_the_flag_asks_for(flags, installed):
    result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, *flags], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"installed {installed}" in result.stdout.splitlines()


# Two processes (gloo), each with its own gradients, as ZeRO-1/2 ranks hold their partitions: the norm of every
# gradient of both. A -1 from one rank's gradient would not be finite; a padding tensor is left out.
TWO_RANKS_SCRIPT = """
import json, types
import deepspeed
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from workshop import ds_grad_clip

deepspeed.init_distributed(dist_backend="gloo")
rank = deepspeed.comm.get_rank()

def gradients(rank):
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(shape, generator=generator) * (1 + 3 * rank) for shape in ((5,), (40, 3), (300,))]

grads = gradients(rank)
padding = torch.full((7,), 1e3)  # DeepSpeed's alignment padding of a partition: not part of any parameter
padding._zero_padding = True
params = [torch.empty_like(g) for g in grads]
optimizer = types.SimpleNamespace(model_parallel_rank=0, model_parallel_group=None, dp_process_group=None,
                                  device=torch.device("cpu"), _model_parallel_all_reduce=lambda tensor, op: None)
ours = ds_grad_clip.foreach_grad_norm_direct(optimizer, [*grads, padding], params)
theirs = DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, [*grads, padding], params)
# by hand, in float64, from both ranks' gradients (regenerated here from their seeds)
every = torch.cat([g.double().flatten() for r in (0, 1) for g in gradients(r)])
if rank == 0:
    print(json.dumps({"ours": ours.item(), "deepspeed": theirs.item(), "by_hand": every.pow(2).sum().sqrt().item(),
                      "this_rank": torch.cat([g.double().flatten() for g in grads]).norm().item()}))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # else gloo's teardown at exit can abort a rank ("terminate called")
"""


def test_zero_gradient_norm_is_the_norm_of_every_ranks_gradients(tmp_path):
    """The quantity a wrong cross-rank reduction moves, tested directly: in the equivalence tests it moved the
    losses by only 2.3e-4, as clipping changes a step only where the norm crosses max_grad_norm.

    Reference: the norm of both ranks' gradients by hand in float64, and DeepSpeed's own function. Tolerance
    1e-6 relative: each rank sums a few hundred fp32 squares (relative error ~1e-7). The rank-1 gradients
    are 4x larger, so a norm of this rank's gradients only, a sum of the ranks' norms instead of their
    squares, or the padding counted each miss by more than 10 %."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    norms = json.loads(result.stdout.strip().splitlines()[-1])
    assert norms["this_rank"] < 0.5 * norms["by_hand"]  # the other rank's share is large enough to be missed
    assert norms["ours"] == pytest.approx(norms["by_hand"], rel=1e-6)
    assert norms["deepspeed"] == pytest.approx(norms["by_hand"], rel=1e-6)
