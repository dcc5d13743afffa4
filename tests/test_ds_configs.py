"""The DeepSpeed JSON files in ds_configs/: keys DeepSpeed accepts, values it parses, "auto" wherever
the Trainer owns the number, names that say what each file does, and a README row for every setting."""

import copy
import re
from pathlib import Path

import pytest

from workshop import ds_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
TRAINER_OWNED = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "fp16.enabled", "bf16.enabled"]
OPTIMIZER_OWNED = ["optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
                   "optimizer.params.weight_decay"]


def leaves(section: dict, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def test_the_issue_s_configs_exist():
    names = {path.stem for path in CONFIGS}
    stages = {f"zero{stage}" for stage in range(4)}
    offload = {f"zero{stage}_offload{pin}" for stage in (1, 2, 3) for pin in ("", "_nopin")}
    assert stages | offload | {"zero3_offload_all", "zero3_nvme"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_is_one_deepspeed_accepts(path):
    ds_config.check_keys(ds_config.load_config(str(path)), str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deepspeed_parses_every_value_once_the_autos_are_filled(path, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = ds_config.resolve_config(str(path), str(tmp_path), "bf16")
    filled = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": True,
              "optimizer.params.lr": 5e-5, "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
              "optimizer.params.weight_decay": 0.0,
              "zero_optimization.offload_param.buffer_size": 257_000_000}  # workshop train: the largest layer
    for dotted, value in leaves(copy.deepcopy(config)):
        if value == "auto":  # what the Trainer would put there
            *parents, key = dotted.split(".")
            section = get(config, ".".join(parents)) if parents else config
            section[key] = filled[dotted]
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == ds_config.zero_stage(config)
    assert parsed.bfloat16_config.enabled


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_trainer_owns_batch_clipping_precision_and_optimizer_values(path):
    config = ds_config.load_config(str(path))
    owned = TRAINER_OWNED + (OPTIMIZER_OWNED if "optimizer" in config else [])
    assert {key: get(config, key) for key in owned} == {key: "auto" for key in owned}
    assert "scheduler" not in config  # the Trainer's --lr_scheduler_type is the one schedule


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_file_name_says_the_stage_and_where_memory_goes(path):
    config = ds_config.load_config(str(path))
    name = path.stem
    assert ds_config.zero_stage(config) == int(re.match(r"zero(\d)", name).group(1))
    optimizer_to = "nvme" if "nvme" in name else "cpu" if "offload" in name else None
    param_to = "nvme" if "nvme" in name else "cpu" if name.endswith("_all") else None
    assert ds_config.offload_devices(config) == {"offload_optimizer": optimizer_to, "offload_param": param_to}
    pinned = {offload.get("pin_memory") for key in ("offload_optimizer", "offload_param")
              if (offload := config["zero_optimization"].get(key))}
    assert pinned <= ({False} if name.endswith("_nopin") else {True})


def test_the_readme_has_a_row_for_every_key_the_trainer_does_not_fill():
    readme = (CONFIG_DIR / "README.md").read_text()
    rows = {match for line in readme.splitlines() if line.startswith("|")
            for match in re.findall(r"`([\w.]+)`", line.split("|")[1])}
    set_here = {dotted for path in CONFIGS for dotted, value in leaves(ds_config.load_config(str(path)))
                if value != "auto" or dotted not in TRAINER_OWNED + OPTIMIZER_OWNED}  # workshop train fills the rest
    assert set_here - rows == set()


def test_the_stage_registry_says_what_each_file_and_job_script_does():
    from workshop import stages

    assert sorted(s.ds_json for s in stages.REGISTRY.values() if s.ds_json) == [p.name for p in CONFIGS]
    for stage in stages.REGISTRY.values():
        config = ds_config.load_config(str(stage.ds_path)) if stage.ds_path else None
        found = (ds_config.zero_stage(config), *ds_config.offload_devices(config).values()) if config else (None,) * 3
        assert (stage.zero_stage, stage.offload_optimizer, stage.offload_param) == found, stage.name
        assert stage.rung in stages.RUNGS
        script = stages.REPO / stage.rung / f"{stage.name}.slurm"
        assert script.is_file() == stage.job_script, script
        if stage.job_script:
            assert f"DS_CONFIG={'ds_configs/' + stage.ds_json if stage.ds_json else ''}" in script.read_text()
