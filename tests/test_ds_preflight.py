"""Each pre-flight check stops on its bad input with a one-line message that names the fix."""

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workshop import ds_config, memory, preflight
from workshop.errors import WorkshopError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


@pytest.fixture(scope="module")
def trainer_defaults(tmp_path_factory):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), use_cpu=True, report_to=[])
    return {**vars(args), "world_size": args.world_size}


@pytest.fixture
def flags(trainer_defaults):
    """The Trainer's arguments with some flags changed, e.g. flags(per_device_train_batch_size=8)."""
    return lambda **changed: SimpleNamespace(**{**trainer_defaults, **changed})


def write(tmp_path, text: str) -> str:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return str(path)


def fails(match: str):
    """The WorkshopError, on one line, containing `match`."""
    return pytest.raises(WorkshopError, match=match)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- loading ---------------------------------------------------------------------------------------

def test_a_missing_file_names_the_flag_and_the_folder_to_pick_from(tmp_path):
    with fails(r"--deepspeed .*nope.json: no such file; pick one of ds_configs/\*.json"):
        ds_config.load_config(str(tmp_path / "nope.json"))


def test_malformed_json_gives_the_line(tmp_path):
    path = write(tmp_path, '{\n  "zero_optimization": {\n    "stage": 2, // ZeRO-2\n  }\n}\n')
    with fails(r"invalid JSON at line 3 column 17") as error:
        ds_config.load_config(path)
    assert "no comments" in one_line(error)


def test_a_key_written_twice_is_refused(tmp_path):
    with fails(r"key 'stage' appears twice"):
        ds_config.load_config(write(tmp_path, '{"zero_optimization": {"stage": 2, "stage": 3}}'))


def test_the_top_must_be_an_object(tmp_path):
    with fails(r"expected a JSON object"):
        ds_config.load_config(write(tmp_path, '[{"zero_optimization": {}}]'))


def test_the_nvme_path_comes_from_the_flag(tmp_path):
    config = ds_config.resolve_config(str(CONFIG_DIR / "zero3_nvme.json"), str(tmp_path), "bf16")
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == str(tmp_path)


def test_an_nvme_config_without_the_flag_asks_for_it():
    with fails(r"zero3_nvme.json offloads to NVMe: pass --nvme_path DIR"):
        ds_config.resolve_config(str(CONFIG_DIR / "zero3_nvme.json"), None, "bf16")


def test_zero1_accumulates_gradients_in_fp32_only_under_bf16(tmp_path):
    # bf16: DeepSpeed's BF16_Optimizer, one flat fp32 gradient buffer; fp16 and fp32: the ZeRO optimizer as it is
    resolved = {precision: ds_config.resolve_config(str(CONFIG_DIR / "zero1.json"), None, precision)
                for precision in ("bf16", "fp16", "fp32")}
    assert {precision: config["data_types"]["grad_accum_dtype"] for precision, config in resolved.items()} == \
        {"bf16": "fp32", "fp16": "fp16", "fp32": "fp32"}
    explicit = write(tmp_path, '{"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}}')
    assert ds_config.resolve_config(explicit, None, "bf16")["data_types"] == {"grad_accum_dtype": "bf16"}


# --- keys ------------------------------------------------------------------------------------------

def test_a_typo_names_the_key_it_meant():
    config = {"zero_optimization": {"stage": 2, "overlap_com": True}}
    with fails(r"x.json: unknown key 'zero_optimization.overlap_com' "
               r"\(did you mean 'zero_optimization.overlap_comm'\?\)") as error:
        ds_config.check_keys(config, "x.json")
    one_line(error)


def test_typos_are_found_at_every_depth_and_in_auto_values():
    config = {"trian_batch_size": "auto",
              "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": "auto",
                                    "offload_optimizer": {"device": "cpu", "pin_memroy": True}}}
    with fails("x") as error:
        ds_config.check_keys(config, "x")
    message = one_line(error)
    for meant in ("'train_batch_size'", "'zero_optimization.stage3_prefetch_bucket_size'",
                  "'zero_optimization.offload_optimizer.pin_memory'"):
        assert f"did you mean {meant}" in message


def test_aliases_sections_and_free_form_params_are_accepted():
    ds_config.check_keys({
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 10, "prefetch_bucket_size": 10},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "activation_checkpointing": {"partition_activations": True},
        "tensorboard": {"enabled": True, "output_path": "tb"},
        "aio": {"block_size": 1048576}, "steps_per_print": 100}, "x")


def test_a_key_deepspeed_removed_says_so():
    with fails(r"'amp' is no longer supported: NVIDIA Apex AMP"):
        ds_config.check_keys({"amp": {"enabled": True}}, "x")


# --- values the Trainer owns -----------------------------------------------------------------------

def test_auto_and_matching_values_pass(flags):
    ds_config.check_trainer_conflicts({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0,
                                          "optimizer": {"params": {"betas": [0.9, 0.999]}}}, flags())


@pytest.mark.parametrize("config, changed, says", [
    ({"train_micro_batch_size_per_gpu": 8}, {"per_device_train_batch_size": 4},
     "train_micro_batch_size_per_gpu=8 but --per_device_train_batch_size gives 4"),
    ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 1},
     "gradient_accumulation_steps=4 but --gradient_accumulation_steps gives 1"),
    ({"train_batch_size": 16}, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2},
     "train_batch_size=16 but --per_device_train_batch_size x --gradient_accumulation_steps x 2 processes gives 8"),
    ({"bf16": {"enabled": True}}, {"bf16": False}, "bf16.enabled=true but --precision/--bf16 gives false"),
    ({"fp16": {"enabled": False}}, {"fp16": True}, "fp16.enabled=false but --precision/--fp16 gives true"),
    ({"gradient_clipping": 1.0}, {"max_grad_norm": 0.5}, "gradient_clipping=1.0 but --max_grad_norm gives 0.5"),
    ({"optimizer": {"params": {"lr": 5e-5}}}, {"learning_rate": 1e-4},
     "optimizer.params.lr=5e-05 but --learning_rate gives 0.0001"),
    ({"optimizer": {"params": {"betas": [0.9, 0.95]}}}, {},
     r"optimizer.params.betas=\[0.9, 0.95\] but --adam_beta1/--adam_beta2 gives \[0.9, 0.999\]"),
])
def test_an_explicit_value_that_disagrees_with_a_flag_is_refused(flags, config, changed, says):
    with fails(says) as error:
        ds_config.check_trainer_conflicts(config, flags(**changed), "--deepspeed x.json")
    assert one_line(error).endswith('Set these to "auto" in the JSON so the Trainer fills them from its flags')


def test_auto_find_batch_size_lets_the_trainer_change_the_micro_batch(flags):
    ds_config.check_trainer_conflicts({"train_micro_batch_size_per_gpu": 64},
                                         flags(auto_find_batch_size=True))


# --- where the memory goes -------------------------------------------------------------------------

def test_stage_and_offload_devices_for_the_report():
    config = ds_config.load_config(str(CONFIG_DIR / "zero3_offload_all.json"))
    assert ds_config.zero_stage(config) == 3
    assert ds_config.offload_devices(config) == {"offload_optimizer": "cpu", "offload_param": "cpu"}
    assert ds_config.zero_stage({}) == 0
    assert ds_config.offload_devices({}) == {"offload_optimizer": None, "offload_param": None}


def test_offloaded_bytes_count_optimizer_states_and_parameters(tmp_path):
    n = 1_000_000
    cpu = ds_config.load_config(str(CONFIG_DIR / "zero3_offload_all.json"))
    assert memory.offloaded_bytes(cpu, n, half_precision=True) == {"cpu": 18 * n}
    assert memory.offloaded_bytes(cpu, n, half_precision=False, num_nodes=2) == {"cpu": 10 * n}
    nvme = ds_config.resolve_config(str(CONFIG_DIR / "zero3_nvme.json"), str(tmp_path), "bf16")
    assert memory.offloaded_bytes(nvme, n, half_precision=True) == {str(tmp_path): 18 * n}
    assert memory.offloaded_bytes(ds_config.load_config(str(CONFIG_DIR / "zero2.json")), n, True) == {}


def test_nvme_offload_without_a_folder_is_refused():
    with fails(r"zero_optimization.offload_param offloads to NVMe but names no folder"):
        memory.offloaded_bytes({"zero_optimization": {"offload_param": {"device": "nvme"}}}, 10, True)


def test_host_memory_must_hold_the_offloaded_states():
    preflight.check_host_memory(1024, "--deepspeed x.json")
    with fails(r"--deepspeed x.json offloads about 1048576.0 GiB to host memory but this node has .* GiB "
               r"available; ask for more \(#SBATCH --mem\)"):
        preflight.check_host_memory(2**50, "--deepspeed x.json")


def test_the_nvme_folder_must_exist(tmp_path):
    with fails(r"--nvme_path .*/missing does not exist; create it \(mkdir -p"):
        preflight.check_nvme_path(str(tmp_path / "missing"), 0)


def test_the_nvme_path_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with fails(r"--nvme_path .*/file is not a folder"):
        preflight.check_nvme_path(str(tmp_path / "file"), 0)


def test_the_nvme_folder_must_be_writable(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root may write anywhere: simulate a read-only disk
    with fails(r"--nvme_path .* is not writable \(Permission denied\); pass a folder you own"):
        preflight.check_nvme_path(str(tmp_path), 0)


def test_the_nvme_folder_must_have_room(tmp_path):
    preflight.check_nvme_path(str(tmp_path), 1024)
    with fails(r"--nvme_path .* GiB free but ZeRO-Infinity will write about 1048576.0 GiB there"):
        preflight.check_nvme_path(str(tmp_path), 2**50)


def test_missing_libaio_gives_the_install_command(monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with fails(r"x.json offloads to NVMe, which needs DeepSpeed's async_io op and so libaio: "
               r"apt-get install libaio-dev \(dnf install libaio-devel"):
        preflight.check_async_io("x.json")


# --- CUDA arch list --------------------------------------------------------------------------------

@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])


def deepspeed_parses_the_arch_list() -> list[str]:
    """What DeepSpeed's op builder makes of TORCH_CUDA_ARCH_LIST (the code that crashed on H100)."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    return FusedAdamBuilder().compute_capability_args()


def test_an_arch_list_deepspeed_cannot_parse_is_replaced(two_gpus, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(ValueError, match="invalid literal for int"):
        deepspeed_parses_the_arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # DeepSpeed rewrites it while parsing
    assert preflight.fix_cuda_arch_list() == "8.0;9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert "-gencode=arch=compute_90,code=sm_90" in deepspeed_parses_the_arch_list()


def test_an_unset_arch_list_is_set_from_the_visible_gpus(two_gpus, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert preflight.fix_cuda_arch_list() == "8.0;9.0"


def test_a_parsable_arch_list_is_left_alone(two_gpus, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert preflight.fix_cuda_arch_list() is None
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0 9.0+PTX"


def test_without_cuda_the_arch_list_is_not_touched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert preflight.fix_cuda_arch_list() is None


# --- wired into workshop train ----------------------------------------------------------------------

@pytest.fixture
def parse():
    """config.parse, with the Trainer's global DeepSpeed config (made by settle_batch) dropped afterwards: it
    would make later in-process model builds partition their weights as under ZeRO-3."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from workshop import config

    yield lambda *flags: config.parse(["--preset", "tiny", *flags])
    unset_hf_deepspeed_config()


def test_parsing_checks_the_file_and_fills_the_nvme_folder(parse, tmp_path):
    *_, args = parse("--deepspeed", str(CONFIG_DIR / "zero3_nvme.json"), "--nvme_path", str(tmp_path))
    assert args.deepspeed_file == str(CONFIG_DIR / "zero3_nvme.json")
    assert args.deepspeed["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


def test_the_parameter_buffers_are_sized_where_deepspeed_reads_them(parse, tmp_path):
    from transformers.integrations.deepspeed import deepspeed_config

    *_, args = parse("--deepspeed", str(CONFIG_DIR / "zero3_nvme.json"), "--nvme_path", str(tmp_path))
    assert args.deepspeed["zero_optimization"]["offload_param"]["buffer_size"] == "auto"
    ds_config.size_param_buffers(args.deepspeed, 642_252_800)
    args.settle_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps)
    # the recorded JSON, and the config zero.Init and DeepSpeed's engine read
    for config in (args.deepspeed, deepspeed_config()):
        assert config["zero_optimization"]["offload_param"]["buffer_size"] == 642_252_800


def test_a_conflict_stops_parsing_in_one_line(parse, tmp_path):
    path = write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    with fails(r"--deepspeed .*ds.json: train_micro_batch_size_per_gpu=2 but --per_device_train_batch_size gives 8"):
        parse("--deepspeed", path, "--per_device_train_batch_size", "8")


def test_nvme_path_without_an_nvme_config_is_refused(parse, tmp_path):
    with fails(r"--nvme_path is only read by an NVMe offload config"):
        parse("--nvme_path", str(tmp_path))


def test_resources_are_checked_once_the_model_size_is_known(flags, tmp_path, monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    config = ds_config.resolve_config(str(CONFIG_DIR / "zero3_nvme.json"), str(tmp_path / "missing"), "bf16")
    with fails(r"--nvme_path .*/missing does not exist"):
        preflight.check_resources(config, 1000, flags(), num_nodes=1, source="--deepspeed zero3_nvme.json")
    config = ds_config.resolve_config(str(CONFIG_DIR / "zero3_nvme.json"), str(tmp_path), "bf16")
    preflight.check_resources(config, 1000, flags(), num_nodes=1, source="--deepspeed zero3_nvme.json")
