"""Reading a DeepSpeed JSON: load it, fill the workshop's own "auto" values, check its keys and the
values the Trainer owns, and say what it does (ZeRO stage, offload devices).

Each check raises ``WorkshopError`` with one line that names the file or flag and the fix.
``workshop train`` runs them when the training arguments are parsed, since the Trainer reads the JSON
there (``config.WorkshopTrainingArguments``); ``preflight.check_resources`` follows once the model's
size is known.

The NVMe offload config says ``"nvme_path": "auto"``: the folder is only known when the job is
submitted (each cluster mounts its node-local NVMe elsewhere), so ``resolve_config`` fills it in
from ``--nvme_path``, the same way the Trainer fills every other ``"auto"``. ZeRO-1's
``"grad_accum_dtype": "auto"`` follows ``--precision`` (``grad_accum_dtype``), and the parameter
buffers' ``"buffer_size": "auto"`` waits for the model's shape (``size_param_buffers``).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from pathlib import Path

from workshop.errors import WorkshopError

def load_config(path: str) -> dict:
    """The JSON at ``path`` as a dict, with errors that give the line to fix."""
    source = f"--deepspeed {path}"

    def refuse_duplicates(pairs):
        # json keeps the last of two equal keys silently; DeepSpeed's own loader refuses them.
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise WorkshopError(f"{source}: key '{key}' appears twice in one section; keep one")
        return dict(pairs)

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise WorkshopError(f"{source}: no such file; pick one of ds_configs/*.json "
                            "(ds_configs/README.md says which)") from None
    except OSError as error:
        raise WorkshopError(f"{source}: cannot read it ({error.strerror}); pass a JSON file") from None
    try:
        config = json.loads(text, object_pairs_hook=refuse_duplicates)
    except json.JSONDecodeError as error:
        raise WorkshopError(f"{source}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg} "
                            "(JSON has no comments or trailing commas)") from None
    if not isinstance(config, dict):
        raise WorkshopError(f"{source}: expected a JSON object {{...}} at the top, found {type(config).__name__}")
    return config


def resolve_config(path: str, nvme_path: str | None, precision: str) -> dict:
    """The JSON at ``path`` with every ``"nvme_path": "auto"`` replaced by ``nvme_path`` and every
    ``"grad_accum_dtype": "auto"`` by ``grad_accum_dtype(precision)``."""
    source = f"--deepspeed {path}"
    config = load_config(path)

    def fill(section: dict) -> None:
        for key, value in section.items():
            if isinstance(value, dict):
                fill(value)
            elif key == "nvme_path" and value == "auto":
                if nvme_path is None:
                    raise WorkshopError(f"{source} offloads to NVMe: pass --nvme_path DIR, a folder on the "
                                        "compute node's local NVMe disk")
                section[key] = str(nvme_path)
            elif key == "grad_accum_dtype" and value == "auto":
                section[key] = grad_accum_dtype(precision)

    fill(config)
    return config


def grad_accum_dtype(precision: str) -> str:
    """What ``"grad_accum_dtype": "auto"`` (``ds_configs/zero1.json``) becomes for a run in ``precision``.

    In bf16, fp32: ZeRO-1 then runs DeepSpeed's ``BF16_Optimizer``, which keeps the gradients in one
    flat fp32 buffer, whole, and clips and steps them as one tensor, where the ZeRO optimizer (ZeRO-2's
    too) works through them tensor by tensor; both partition the optimizer states over the GPUs. In fp16
    and fp32, the precision itself: DeepSpeed has no such optimizer there, and an fp32 accumulation would
    only add a copy of every gradient. ``workshop train`` fills it (``resolve_config``).
    """
    return "fp32" if precision == "bf16" else precision


def size_param_buffers(config: dict, largest_layer_params: int) -> None:
    """Fill ``offload_param.buffer_size: "auto"`` with the largest layer's parameter count.

    With the parameters on NVMe, DeepSpeed reads each one from disk into a pinned buffer of this many
    elements, whole: a buffer must hold the largest tensor. That is the embedding, whose size grows with
    the model (bloom-3b's is 642M elements), so no fixed number serves the ladder without pinning
    gigabytes for small models. Filled once the model's shape is known, before the Trainer makes its
    copy of the JSON (``config.WorkshopTrainingArguments.settle_batch``).
    """
    offload = (config.get("zero_optimization") or {}).get("offload_param") or {}
    if offload.get("buffer_size") == "auto":
        offload["buffer_size"] = int(largest_layer_params)


# ---------------------------------------------------------------------------------------------------
# Keys: DeepSpeed ignores a misspelled key in most sections, and in the others (pydantic models) it
# drops any key whose value is "auto" before validating. So a typo costs a whole run before anyone
# notices. The accepted keys are read off the installed DeepSpeed itself: for each section we hand
# its config parser a dict that records which keys it asks for, or, for sections it validates with
# a pydantic model, read the model's fields and aliases (e.g. stage3_prefetch_bucket_size).

_PROBE = "__workshop_probe__"
_MAX_DEPTH = 4  # data_efficiency.data_sampling.curriculum_learning.<key> is DeepSpeed's deepest


class _AskedKeys(dict):
    """A config section that remembers every key DeepSpeed's parser asks it for."""

    def __init__(self, items: dict):
        super().__init__(items)
        self.asked: set = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):
        # DeepSpeed tests most sections with `key in section.keys()`
        return _KeysView(self)

    def __copy__(self):
        # DeepSpeedConfig parses a shallow copy of what it is given: keep recording on this one
        return self


class _KeysView:
    def __init__(self, section: _AskedKeys):
        self._section = section

    def __contains__(self, key):
        return key in self._section

    def __iter__(self):
        return iter(dict.keys(self._section))

    def __len__(self):
        return len(self._section)


class _Removed(str):
    """DeepSpeed's own message for a key it no longer supports."""


def _model_keys(model) -> dict:
    """{field name or alias: nested keys or None} for a DeepSpeed pydantic config model."""
    import typing

    from pydantic import BaseModel

    keys = {}
    for name, field in model.model_fields.items():
        nested = None
        for candidate in (field.annotation, *typing.get_args(field.annotation)):  # Optional[Model] too
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nested = _model_keys(candidate)
        keys[name] = nested
        if field.alias:
            keys[field.alias] = nested
    return keys


def _keys_from_validation_error(error) -> dict | None:
    """The keys of the pydantic model that refused the probe key, or None if it was another error."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for detail in error.errors():
        location = detail["loc"]
        if detail["type"] != "extra_forbidden" or location[-1] != _PROBE:
            continue
        for model in subclasses(DeepSpeedConfigModel):
            if model.__name__ == error.title:
                keys = _model_keys(model)
                for key in location[:-1]:  # the probe sat in a nested model, e.g. monitor -> tensorboard
                    keys = keys[key]
                return keys
    return None


def _probe(path: tuple) -> dict | _Removed | None:
    """What DeepSpeed accepts under ``path``: {key: nested or None}, None for any value, or _Removed."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    section = _AskedKeys({_PROBE: 0})
    config = section
    for key in reversed(path):
        config = {key: config}
    config = {"train_micro_batch_size_per_gpu": 1, **config}  # DeepSpeedConfig insists on a batch size
    try:
        DeepSpeedConfig(config)
    except pydantic.ValidationError as error:
        keys = _keys_from_validation_error(error)
        if keys is not None:
            return keys
    except DeepSpeedConfigError as error:
        if len(path) == 1 and not section.asked:  # refused by name, before looking inside
            return _Removed(str(error))
    except Exception:
        pass  # the section is a scalar, or needs keys the probe lacks; what was asked is recorded anyway
    asked = section.asked - {_PROBE}
    if not asked:
        return None
    return {key: _probe(path + (key,)) if len(path) < _MAX_DEPTH else None for key in asked}


@functools.lru_cache(maxsize=1)
def accepted_keys() -> dict:
    """Every key the installed DeepSpeed reads: {key: nested keys, None (any value) or _Removed}."""
    from deepspeed.runtime.constants import OPTIMIZER, OPTIMIZER_PARAMS, SCHEDULER, SCHEDULER_PARAMS
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # every probe would log DeepSpeedConfig's world size
    try:
        top = _AskedKeys({"train_micro_batch_size_per_gpu": 1})
        DeepSpeedConfig(top)
        keys = {key: _probe((key,)) for key in top.asked}
    finally:
        ds_logger.setLevel(level)
    # DeepSpeed reads optimizer.params / scheduler.params only once "type" is set, and passes them as
    # keyword arguments to the optimizer or scheduler, which rejects unknown names itself.
    for section, params in ((OPTIMIZER, OPTIMIZER_PARAMS), (SCHEDULER, SCHEDULER_PARAMS)):
        keys[section] = {**(keys.get(section) or {}), params: None}
    return keys


def check_keys(config: dict, source: str) -> None:
    """Every key, in every section, is one the installed DeepSpeed accepts; else name the closest."""
    import deepspeed

    problems = []

    def walk(section: dict, accepted: dict, prefix: str) -> None:
        for key, value in section.items():
            where = prefix + key
            if key not in accepted:
                close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
                hint = f"did you mean '{prefix}{close[0]}'?" if close else "remove it"
                problems.append(f"unknown key '{where}' ({hint})")
            elif isinstance(accepted[key], _Removed):
                problems.append(f"'{where}' is no longer supported: {accepted[key].rstrip('.')}")
            elif isinstance(accepted[key], dict) and isinstance(value, dict):
                walk(value, accepted[key], where + ".")

    walk(config, accepted_keys(), "")
    if problems:
        raise WorkshopError(f"{source}: " + "; ".join(problems)
                            + f" (DeepSpeed {deepspeed.__version__} would ignore or reject these)")


# ---------------------------------------------------------------------------------------------------
# Values the Trainer owns: an explicit value in the JSON that differs from the flag
# makes DeepSpeed or the Trainer stop only after the model is loaded. The pairs are the ones
# transformers' HfTrainerDeepSpeedConfig fills from TrainingArguments.


def _get(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def check_trainer_conflicts(config: dict, training_args, source: str = "--deepspeed") -> None:
    """Explicit (non-"auto") values in the JSON must equal what the Trainer's flags say."""
    args = training_args
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    owned = [  # (key in the JSON, the Trainer's value, the flag(s) that set it)
        ("gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps"),
        ("gradient_clipping", args.max_grad_norm, "--max_grad_norm"),
        ("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "--precision/--fp16"),
        ("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "--precision/--bf16"),
        ("bfloat16.enabled", bool(args.bf16 or args.bf16_full_eval), "--precision/--bf16"),  # DeepSpeed's older name
        ("optimizer.params.lr", args.learning_rate, "--learning_rate"),
        ("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "--adam_beta1/--adam_beta2"),
        ("optimizer.params.eps", args.adam_epsilon, "--adam_epsilon"),
        ("optimizer.params.weight_decay", args.weight_decay, "--weight_decay"),
        ("scheduler.params.warmup_max_lr", args.learning_rate, "--learning_rate"),
    ]
    if not args.auto_find_batch_size:  # the Trainer then changes the micro-batch itself
        owned += [
            ("train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size"),
            ("train_batch_size", micro * accumulation * args.world_size,
             f"--per_device_train_batch_size x --gradient_accumulation_steps x {args.world_size} processes"),
        ]
    conflicts = []
    for key, trainer_value, flag in owned:
        value = _get(config, key)
        if value is None or value == "auto":
            continue
        if value != trainer_value:  # JSON's [0.9, 0.999] equals the Trainer's [adam_beta1, adam_beta2]
            conflicts.append(f"{key}={json.dumps(value)} but {flag} gives {json.dumps(trainer_value)}")
    if conflicts:
        raise WorkshopError(f"{source}: " + "; ".join(conflicts)
                            + ". Set these to \"auto\" in the JSON so the Trainer fills them from its flags")


# ---------------------------------------------------------------------------------------------------
# What the JSON does


def zero_stage(config: dict) -> int:
    """The ZeRO stage, 0 when the JSON has no zero_optimization section (DeepSpeed's default)."""
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def offload_devices(config: dict) -> dict:
    """{"offload_optimizer": None|"cpu"|"nvme", "offload_param": ...}, as metrics.json reports them."""
    zero = config.get("zero_optimization") or {}

    def device(section: str) -> str | None:
        name = (zero.get(section) or {}).get("device", "none")
        return None if name == "none" else name

    return {"offload_optimizer": device("offload_optimizer"), "offload_param": device("offload_param")}


def deepspeed_choices(config: dict | None) -> tuple[int | None, str | None, str | None]:
    """(zero stage, optimizer offload device, parameter offload device); all None without a JSON (no DeepSpeed)."""
    if not config:
        return None, None, None
    return zero_stage(config), *offload_devices(config).values()
