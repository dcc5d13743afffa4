"""Every setting of a workshop run, as dataclasses with help strings.

Flags, a JSON/YAML file, or both (the file first, flags after it win)::

    workshop train --preset tiny                                  # CPU, seconds
    workshop train --model_name_or_path gpt2 --dataset_name wikitext
    workshop train my_run.yaml --learning_rate 1e-4

``workshop train --help`` lists every flag: the workshop's own below, then all of the Hugging Face
``TrainingArguments`` (with the workshop's defaults: the original material's 500 samples, global batch
16 per GPU, 3 epochs, lr 5e-5, weight decay 0.01, evaluation and a checkpoint each epoch; the batch of
16 goes through as one micro-batch, not the original's 4 x 4).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from workshop import ds_config, stages
from workshop.errors import WorkshopError

DATASETS = ("squad", "wikitext", "builtin", "builtin_text")
STAGES = ("local", *stages.RUNGS, "bench", "scale")  # --stage: the folder under logs/

# A preset is a list of flags put in front of the user's own, so any flag given explicitly wins.
PRESETS = {
    # A 2-layer GPT-2 on the built-in data: 2 epochs x 32 steps, well under a minute on a laptop CPU.
    "tiny": [
        "--model_name_or_path", "tiny-gpt2", "--tokenizer_name_or_path", "builtin",
        "--dataset_name", "builtin", "--max_train_samples", "256", "--max_eval_samples", "32",
        "--answer_eval_samples", "16", "--max_seq_length", "128",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--gradient_accumulation_steps", "1", "--num_train_epochs", "2",
        # A tiny random model needs a far larger step than fine-tuning a pretrained one.
        "--learning_rate", "3e-3", "--warmup_steps", "4", "--logging_steps", "4",
    ],
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="bigscience/bloom-560m",
        metadata={"help": "Hub name or local folder of a causal LM (bigscience/bloom-560m, gpt2, gpt2-medium, "
                          "gpt2-large, gpt2-xl, ...). 'tiny-gpt2' / 'tiny-bloom': a 2-layer model built from a "
                          "config, for CPU runs and tests."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use; default: the model's. 'builtin': a small BPE trained offline on the "
                          "built-in data (use it with --from_config when the hub is out of reach)."})
    from_config: bool = field(
        default=False,
        metadata={"help": "Build the model from its configuration with random weights instead of loading weights. "
                          "Known shapes (gpt2*, bigscience/bloom-*) need no download. Speed and memory do not "
                          "depend on the weights, so benchmarks use this."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: 'sdpa' (PyTorch's fused attention; for BLOOM, which transformers runs "
                          "eager only, the workshop's own forward through it, the same function), 'eager' (the "
                          "library's scores, softmax and probabilities written out per layer), ...; default: sdpa "
                          "for GPT-2 and BLOOM, the model's for others."})
    fast_kernels: bool = field(
        default=True,
        metadata={"help": "The same arithmetic through faster kernels: GPT-2's and BLOOM's GELU as one kernel instead of eight, "
                          "the output layer's matrix product on a vocabulary padded to a multiple of 64 (GPT-2's "
                          "50,257 sends cuBLAS to slow kernels; the padding never reaches the logits), and logits "
                          "only at the positions that have a target (the loss ignores the others). "
                          "--fast_kernels false: the library's modules as they are."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="squad",
        metadata={"help": f"One of {', '.join(DATASETS)}. 'builtin'/'builtin_text': generated offline (QA / plain "
                          "text). Ignored when --train_file is given."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub configuration; wikitext defaults to wikitext-2-raw-v1."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training data: SQuAD-format .json/.jsonl (question, context, answers) or plain "
                          ".txt. For clusters without internet."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation data, same formats as --train_file; default: a split of it."})
    max_seq_length: int = field(
        default=512,
        metadata={"help": "Longest sample in tokens. QA samples longer than this are dropped (and counted), never "
                          "cut through the answer; text is cut into blocks of this length."})
    max_train_samples: int = field(default=500, metadata={"help": "Training samples used (the original: 500)."})
    max_eval_samples: int = field(default=100, metadata={"help": "Validation samples for the eval loss."})
    answer_eval_samples: int = field(
        default=50,
        metadata={"help": "Validation questions answered by greedy generation after training for exact match and "
                          "F1 (QA data only; 0 skips it)."})
    loss_on: str = field(
        default="answer",
        metadata={"help": "'answer': loss on the answer tokens only (the prompt is context, not a target). "
                          "'sequence': loss on every non-padding token, as the original workshop did; its loss "
                          "is lower because the prompt is easy to predict, not because the model answers better."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every sample to --max_seq_length, as the original workshop did. Default: pad each "
                          "batch to its longest sample only (same loss, far fewer wasted tokens)."})
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Round each batch's length up to a multiple of this. Default: 8 on a GPU (tensor-core "
                          "shapes, at most 7 padding tokens a row), none on a CPU. A larger multiple makes fewer "
                          "distinct batch shapes, each of which costs CPU time the first time the kernels meet it, "
                          "for more padding."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation (datasets.map)."})


@dataclass
class WorkshopArguments:
    preset: str | None = field(
        default=None, metadata={"help": f"Settings bundle applied before your flags: {', '.join(PRESETS)}."})
    stage: str = field(
        default="local", metadata={"help": f"Which rung of the ladder this run is ({', '.join(STAGES)}); names the "
                                           "folder under logs/."})
    run_dir: str | None = field(
        default=None,
        metadata={"help": "Run folder; default logs/<stage>/<run id>, the run id being $SLURM_JOB_ID or a timestamp."})
    logs_root: str = field(default="logs", metadata={"help": "Where run folders are created."})
    save_model: bool = field(
        default=True, metadata={"help": "Save the trained model to <run folder>/model (--no_save_model: benchmarks)."})
    profile_steps: int = field(
        default=0,
        metadata={"help": "Profile this many optimizer steps after the first (warm-up) with torch.profiler: "
                          "profile.txt (where the time goes, by operation) and profile_trace.json (open in "
                          "chrome://tracing or ui.perfetto.dev) in the run folder. 3-5 is plenty; 0: off. It slows those "
                          "steps: time runs without it."})
    profile_first_step: bool = field(
        default=False,
        metadata={"help": "Start --profile_steps at the first optimizer step instead of the second: what each process "
                          "pays once (kernels loaded on first use, the BLAS library set up, optimizer state allocated)."})


@dataclass
class WorkshopTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the workshop's defaults and one precision switch."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Checkpoint folder; default <run folder>/checkpoints."})
    nvme_path: str | None = field(
        default=None,
        metadata={"help": "Folder on a node-local NVMe disk for ds_configs/zero3_nvme.json (ZeRO-Infinity); "
                          "checked for room and write access before training."})
    precision: str = field(
        default="auto",
        metadata={"help": "auto | bf16 | fp16 | fp32. auto: bf16 where the GPU supports it, else fp16; fp32 on CPU. "
                          "Compare stages at the same precision: fp32 vs 16-bit alone is a 2x difference."})
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Micro-batch per GPU. The original's 4 x accumulation 4 makes the same global batch of 16, "
                          "but launches four times the kernels (and DeepSpeed's per-micro-batch work) per step. "
                          "Reduce to 8, 4, ... if you run out of GPU memory, and raise --gradient_accumulation_steps "
                          "to keep the global batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Batch per GPU for evaluation."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step. Global batch = micro-batch x this x GPUs."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training samples."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    train_sampling_strategy: str = field(
        default="random",
        metadata={"help": "Batch order: random, group_by_length (batches of similar length: less padding, but "
                          "one epoch of gpt2-medium from scratch ended 11-13%% higher in eval loss), sequential."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: epoch, steps or no."})
    save_strategy: str | None = field(
        default=None,
        metadata={"help": "The Trainer's own checkpoint schedule: epoch, steps (every --save_steps) or no. Default: "
                          "a checkpoint every --save_minutes instead (with --load_best_model_at_end: at every "
                          "evaluation, which that needs). Always one on SIGUSR1/SIGTERM before stopping."})
    save_minutes: float = field(
        default=30,
        metadata={"help": "Without --save_strategy: a checkpoint every this many minutes of training, so a crash loses "
                          "at most that much; 0: none but the one on a stop signal. A checkpoint holds the optimizer "
                          "states (about 4 GB for gpt2-medium, 25 GB for gpt2-xl): a short run writes none."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (oldest deleted first; the best one kept with "
                                     "--load_best_model_at_end)."})
    logging_steps: float = field(default=10, metadata={"help": "Optimizer steps between log lines."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Replace a NaN/inf micro-batch loss in the logged average. The check waits for the GPU "
                          "after every micro-batch, so it is off: a NaN loss shows as NaN."})
    foreach_grad_clip: bool = field(
        default=True,
        metadata={"help": "DeepSpeed's per-tensor gradient work as multi-tensor operations, as the Trainer without "
                          "DeepSpeed does it: at ZeRO-1 in bf16 (BF16_Optimizer) the gradient norm, the clipping and "
                          "the adding of each bf16 gradient into its fp32 buffer; at ZeRO-2 the gradient norm, "
                          "without a fp64 copy of each gradient. The same arithmetic in a few launches instead of one "
                          "or two per tensor from Python; false: DeepSpeed's own functions."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP only: every parameter of a causal LM gets a gradient each step, so the search for "
                          "unused ones (the Trainer's default) is an extra pass over the autograd graph per step."})
    ddp_timeout: int = field(
        default=3600, metadata={"help": "Seconds a rank waits for the others (tokenising on rank 0 included)."})

    def __post_init__(self):
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, flag) < 1:
                raise WorkshopError(f"--{flag} {getattr(self, flag)} must be at least 1")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise WorkshopError(f"--num_train_epochs {self.num_train_epochs} trains nothing: give a number above 0 "
                                "(or --max_steps)")
        if self.resume_from_checkpoint and not os.path.isfile(os.path.join(self.resume_from_checkpoint,
                                                                           "trainer_state.json")):
            raise WorkshopError(f"--resume_from_checkpoint {self.resume_from_checkpoint} is not a checkpoint folder "
                                "(no trainer_state.json): give <run folder>/checkpoints/checkpoint-N, or --run_dir "
                                "of the stopped run to resume from its newest checkpoint")
        if self.save_minutes < 0:
            raise WorkshopError(f"--save_minutes {self.save_minutes} must be 0 (no checkpoint by time) or more")
        if self.save_strategy is None and not self.load_best_model_at_end:
            self.save_strategy = "no"  # the Trainer's schedule off: trainer.SaveOnTimeOrSignal saves by the clock
        else:  # the Trainer's schedule, as given, or at every evaluation for the best model
            self.save_strategy = self.save_strategy or self.eval_strategy
            self.save_minutes = 0
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise WorkshopError(f"--precision {self.precision} is not known: use auto, bf16, fp16 or fp32")
        if self.bf16 or self.fp16:
            # The stock flags still work; they must not contradict --precision.
            chosen = "bf16" if self.bf16 else "fp16"
            if self.precision not in ("auto", chosen):
                raise WorkshopError(f"--{chosen} contradicts --precision {self.precision}: give only --precision")
            self.precision = chosen
        if self.precision == "auto":
            self.precision = auto_precision()
        self.bf16 = self.precision == "bf16"
        self.fp16 = self.precision == "fp16"
        if self.precision != "fp32" and not _cuda_available():
            raise WorkshopError(f"--precision {self.precision} needs a GPU and none is visible: use --precision fp32 "
                                "(or auto) on CPU")
        # Without use_cpu, accelerate treats several CPU processes as one (no gloo group, no data
        # sharding); with it, CPU nodes run DDP and DeepSpeed over gloo like GPUs over NCCL.
        self.use_cpu = self.use_cpu or not _cuda_available()
        self.deepspeed_file = None
        if isinstance(self.deepspeed, str):
            # The Trainer reads the JSON in super().__post_init__: check it and fill the workshop's own
            # "auto" values first, so a typo or a conflict stops here in one line instead of deep inside DeepSpeed.
            self.deepspeed_file = self.deepspeed
            source = f"--deepspeed {self.deepspeed}"
            config = ds_config.resolve_config(self.deepspeed, self.nvme_path, self.precision)
            ds_config.check_keys(config, source)
            ds_config.check_trainer_conflicts(config, self, source)
            self.deepspeed = config
        elif self.nvme_path:
            raise WorkshopError("--nvme_path is only read by an NVMe offload config: add "
                                "--deepspeed ds_configs/zero3_nvme.json, or drop --nvme_path")
        super().__post_init__()

    def use_batch(self, micro_batch: int, accumulation: int) -> None:
        """Train and evaluate in micro-batches of ``micro_batch``, ``accumulation`` of them per optimizer step.

        The Trainer filled DeepSpeed's "auto" batch sizes from the flags in ``__post_init__``: its copy of
        the JSON is made again from the resolved one, as ``__post_init__`` made it.
        """
        self.per_device_train_batch_size = self.per_device_eval_batch_size = micro_batch
        self.gradient_accumulation_steps = accumulation
        if self.deepspeed:
            from accelerate.utils import DeepSpeedPlugin
            from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

            self.hf_deepspeed_config = HfTrainerDeepSpeedConfig(self.deepspeed)
            self.hf_deepspeed_config.trainer_config_process(self)
            self.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=self.hf_deepspeed_config)

    @property
    def world_size(self) -> int:
        # transformers fills DeepSpeed's "auto" train_batch_size in __post_init__, before the process
        # group exists, and would read a world size of 1 there: every multi-process ZeRO run then dies
        # with "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size".
        # Until the group exists, the launcher's WORLD_SIZE is the answer.
        if getattr(self, "distributed_state", None) is None:
            return int(os.environ.get("WORLD_SIZE", "1"))
        return super().world_size


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def auto_precision() -> str:
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _file_to_flags(path: str) -> list[str]:
    """A JSON/YAML settings file as the equivalent flags, so flags after it override it."""
    try:
        with open(path) as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise WorkshopError(f"settings file {path} does not exist: check the path") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first_line = str(e).splitlines()[0]
        raise WorkshopError(f"settings file {path} is not valid JSON/YAML ({first_line}): fix the file") from None
    if not isinstance(values, dict):
        raise WorkshopError(f"settings file {path} must hold a mapping of flag names to values")
    flags = []
    for key, value in values.items():
        flags.append(f"--{key}")
        if isinstance(value, list):
            flags.extend(str(v) for v in value)
        else:
            flags.append(str(value))
    return flags


def expand_argv(argv: list[str]) -> list[str]:
    """Settings file and preset turned into flags, in the order where the user's own flags win."""
    argv = list(argv)
    file_flags = []
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        file_flags = _file_to_flags(argv.pop(0))
    preset = None
    for i, arg in enumerate(file_flags + argv):
        if arg == "--preset" and i + 1 < len(file_flags + argv):
            preset = (file_flags + argv)[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset is not None and preset not in PRESETS:
        raise WorkshopError(f"--preset {preset} is not known: use one of {', '.join(PRESETS)}")
    return (PRESETS[preset] if preset else []) + file_flags + argv


def batch_given(argv: list[str]) -> bool:
    """Whether the flags (presets and files included) set the micro-batch or the accumulation."""
    flags = ("--per_device_train_batch_size", "--gradient_accumulation_steps")
    return any(arg.split("=", 1)[0] in flags for arg in expand_argv(argv))


def parser() -> HfArgumentParser:
    p = HfArgumentParser((ModelArguments, DataArguments, WorkshopArguments, WorkshopTrainingArguments),
                         prog="workshop train")

    def error(message: str):  # argparse would print its whole usage (every flag) and exit
        raise WorkshopError(f"{message}: see workshop train --help")

    p.error = error
    return p


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, WorkshopArguments, WorkshopTrainingArguments]:
    """Parse and validate everything that can be checked without loading a model or data."""
    p = parser()
    argv = expand_argv(argv)
    known = {a for action in p._actions for a in action.option_strings}
    for arg in argv:
        if arg.startswith("--") and arg.split("=", 1)[0] not in known:
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f": did you mean {close[0]}?" if close else ": see workshop train --help"
            raise WorkshopError(f"unknown flag {name}{hint}")
    try:
        model_args, data_args, ws_args, training_args = p.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # values TrainingArguments refuses (e.g. an unknown strategy), or stray words
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if message.startswith("Some specified arguments are not used"):
            stray = message.split(":", 1)[1].strip()
            raise WorkshopError(f"unexpected argument(s) {stray}: flags are --name value, and a settings file "
                                "(.json/.yaml) goes first") from None
        flag = next((f"{name} {value}: " for name, value in zip(argv, argv[1:])
                     if name.startswith("--") and message.startswith(f"{value} is not")), "")
        raise WorkshopError(f"{flag}{message}: see workshop train --help") from None
    validate(model_args, data_args, ws_args)
    return model_args, data_args, ws_args, training_args


def validate(model_args: ModelArguments, data_args: DataArguments, ws_args: WorkshopArguments) -> None:
    """Checks on the flags alone; the ones that need the model or data happen where those load."""
    if data_args.train_file is None and data_args.dataset_name not in DATASETS:
        raise WorkshopError(f"--dataset_name {data_args.dataset_name} is not known: use one of {', '.join(DATASETS)}, "
                            "or --train_file for local data")
    for flag in ("train_file", "validation_file"):
        path = getattr(data_args, flag)
        if path is not None:
            if not os.path.isfile(path):
                raise WorkshopError(f"--{flag} {path} does not exist: check the path")
            if not os.access(path, os.R_OK):
                raise WorkshopError(f"--{flag} {path} is not readable: check its permissions (chmod o+r)")
            if not path.endswith((".json", ".jsonl", ".txt")):
                raise WorkshopError(f"--{flag} {path}: use a .json/.jsonl (SQuAD format) or .txt (plain text) file")
    if data_args.validation_file and not data_args.train_file:
        raise WorkshopError("--validation_file needs --train_file as well")
    if data_args.loss_on not in ("answer", "sequence"):
        raise WorkshopError(f"--loss_on {data_args.loss_on} is not known: use answer or sequence")
    for flag in ("max_seq_length", "max_train_samples", "max_eval_samples"):
        if getattr(data_args, flag) < 1:
            raise WorkshopError(f"--{flag} must be at least 1")
    if data_args.pad_to_multiple_of is not None and data_args.pad_to_multiple_of < 1:
        raise WorkshopError(f"--pad_to_multiple_of {data_args.pad_to_multiple_of} must be at least 1")
    if data_args.answer_eval_samples < 0:
        raise WorkshopError("--answer_eval_samples must be 0 (skip) or more")
    if ws_args.stage not in STAGES:
        raise WorkshopError(f"--stage {ws_args.stage} is not known: use one of {', '.join(STAGES)}")
    if ws_args.profile_steps < 0:
        raise WorkshopError(f"--profile_steps {ws_args.profile_steps} must be 0 (off) or more")
    if ws_args.profile_first_step and not ws_args.profile_steps:
        raise WorkshopError("--profile_first_step profiles nothing without --profile_steps N: add --profile_steps 1")
    if ws_args.run_dir is not None and Path(ws_args.run_dir).is_file():
        raise WorkshopError(f"--run_dir {ws_args.run_dir} is a file: give a folder")
