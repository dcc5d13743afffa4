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

import dataclasses
import difflib
import json
import math
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


@dataclass(frozen=True)
class Range:
    """Where a numeric flag's value may lie; a value outside it stops the run while the flags are read."""

    low: float
    high: float | None = None
    above: bool = False               # low itself is refused
    below: bool = False               # high itself is refused
    whole_from: float | None = None   # from here on a whole number (below it: a fraction of the training steps)
    off: int | None = None            # the one value outside the range that is allowed: the setting off
    note: str = ""                    # what the edge means, or an example

    def check(self, flag: str, value: float) -> None:
        if value == self.off:
            return
        bounds = [f"{'above' if self.above else 'at least'} {self.low}"]
        if self.high is not None:
            bounds.append(f"{'below' if self.below else 'at most'} {self.high}")
        note = f" ({self.note})" if self.note else ""
        if (value <= self.low if self.above else value < self.low) or (
                self.high is not None and (value >= self.high if self.below else value > self.high)):
            raise WorkshopError(f"--{flag} {value} must be {' and '.join(bounds)}{note}")
        if self.whole_from is not None and value >= self.whole_from and value != int(value):
            raise WorkshopError(f"--{flag} {value} must be a whole number from {self.whole_from} on{note}")


RATIO_OR_STEPS = "below 1: a fraction of the training steps"
# Every numeric flag a participant sets, ours and the Trainer's, with its range. Checked while the flags
# are read, before any file or folder exists; the Trainer would otherwise take most of these silently
# (a negative weight decay, clipping or logging interval) or fail with a traceback once the run folder is
# written (a negative learning rate, a seed numpy refuses, --eval_accumulation_steps 0).
RANGES = {
    "max_seq_length": Range(1), "max_train_samples": Range(1), "max_eval_samples": Range(1),
    "answer_eval_samples": Range(0, note="0 skips the answers"), "pad_to_multiple_of": Range(1),
    "profile_steps": Range(0, note="0: off"),
    "per_device_train_batch_size": Range(1), "per_device_eval_batch_size": Range(1),
    "gradient_accumulation_steps": Range(1), "eval_accumulation_steps": Range(1),
    "max_steps": Range(1, off=-1, note="or -1: train for --num_train_epochs"),
    "learning_rate": Range(0, above=True, note="e.g. 5e-5"),
    "warmup_steps": Range(0, whole_from=1, note=RATIO_OR_STEPS),
    "weight_decay": Range(0, note="0: none"), "max_grad_norm": Range(0, note="0: no clipping"),
    "adam_beta1": Range(0, 1, below=True), "adam_beta2": Range(0, 1, below=True),
    "adam_epsilon": Range(0, above=True, note="e.g. 1e-8"),
    "label_smoothing_factor": Range(0, 1, below=True, note="0: none"),
    "neftune_noise_alpha": Range(0, above=True),
    "logging_steps": Range(0, above=True, whole_from=1, note=RATIO_OR_STEPS),
    "eval_steps": Range(0, above=True, whole_from=1, note=RATIO_OR_STEPS),
    "save_steps": Range(0, above=True, whole_from=1, note=RATIO_OR_STEPS),
    "eval_delay": Range(0), "save_total_limit": Range(1),
    "seed": Range(0, 2**32 - 1), "data_seed": Range(0, 2**32 - 1),  # what numpy's generator accepts
    "dataloader_num_workers": Range(0, note="0: load in the training process"),
    "dataloader_prefetch_factor": Range(1), "ddp_timeout": Range(1, note="seconds"), "ddp_bucket_cap_mb": Range(1),
    "torch_empty_cache_steps": Range(1),
}
SAMPLING = ("random", "sequential", "group_by_length", "batch_rebalance")  # the Trainer's train_sampling_strategy
# Flags the parser knows (the Trainer's, or a workshop flag that was retired) that `workshop train` does not
# read: refused by name with the reason, rather than taken and silently ignored.
NOT_READ = {
    "--output_dir": "checkpoints go to <run folder>/checkpoints, so that one folder holds the run: choose it with "
                    "--run_dir or --logs_root",
    "--dataloader_pin_memory": "pinned host memory follows the device: on with a GPU, off on a CPU",
    "--preprocessing_num_workers": "the data is tokenised in one batched call of the fast tokenizer, whose Rust "
                                   "code spreads it over the cores itself",
}


def check_ranges(args) -> None:
    """Every number among ``args``'s fields (one of the argument dataclasses) finite and within RANGES, and no
    text empty: an empty name or path would mean "not given" to some checks (the default model's tokenizer,
    the default run folder) and the current folder to others (--logs_root "" writes local/<run id> there)."""
    for name in (f.name for f in dataclasses.fields(args)):
        value = getattr(args, name)
        if isinstance(value, str) and not value.strip():
            raise WorkshopError(f"--{name} is empty: give a value, or leave the flag out for its default")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # None (not given), text, switches
        if not math.isfinite(value):
            raise WorkshopError(f"--{name} {value} must be a finite number: see workshop train --help")
        if name in RANGES:
            RANGES[name].check(name, value)


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
        default=None, metadata={"help": "Not read: checkpoints go to <run folder>/checkpoints (--run_dir)."})
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
        check_ranges(self)
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise WorkshopError(f"--num_train_epochs {self.num_train_epochs} trains nothing: give a number above 0 "
                                "(or --max_steps)")
        if self.resume_from_checkpoint and not os.path.isfile(os.path.join(self.resume_from_checkpoint,
                                                                           "trainer_state.json")):
            raise WorkshopError(f"--resume_from_checkpoint {self.resume_from_checkpoint} is not a checkpoint folder "
                                "(no trainer_state.json): give <run folder>/checkpoints/checkpoint-N, or --run_dir "
                                "of the stopped run to resume from its newest checkpoint")
        if self.train_sampling_strategy not in SAMPLING:
            raise WorkshopError(f"--train_sampling_strategy {self.train_sampling_strategy} is not known: use "
                                f"{', '.join(SAMPLING)}")
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
        # The Trainer's DeepSpeed set-up, the last step of its __post_init__, fills the JSON's "auto" batch
        # sizes: it waits until `workshop train` has fitted the micro-batch to the GPU (settle_batch).
        config, self.deepspeed = self.deepspeed, None
        self._check_json_objects()
        super().__post_init__()
        self.deepspeed = config
        self._check_report_to()
        self._check_optimizer()
        self._check_scheduler()
        self._check_checkpointing()
        self._check_compile()

    def _check_json_objects(self) -> None:
        """The Trainer's dict flags given as text: a JSON object where one is meant (the Trainer's own parse
        fails without naming the flag, or passes the text on to fail once the run folder exists)."""
        for name in self._VALID_DICT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or name == "deepspeed":
                continue
            try:
                parsed = json.loads(value) if value.startswith("{") or name.endswith("_kwargs") else {}
            except json.JSONDecodeError as e:
                parsed = e
            if not isinstance(parsed, dict):
                raise WorkshopError(f"--{name} {value} is not a JSON object: give one, e.g. '{{\"name\": 1}}'")

    def _check_report_to(self) -> None:
        """Each --report_to integration known and installed (the Trainer would fail once the run folder exists)."""
        from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                                 get_available_reporting_integrations)

        for name in self.report_to:  # "all" and "none" are resolved to the installed ones by now
            if name in get_available_reporting_integrations():
                continue
            if name in INTEGRATION_TO_CALLBACK:
                raise WorkshopError(f"--report_to {name} needs the {name} package, which is not installed: "
                                    f"pip install {name}, or drop --report_to")
            raise WorkshopError(f"--report_to {name} is not known: use none, all, or one of "
                                f"{', '.join(INTEGRATION_TO_CALLBACK)}")

    def _check_optimizer(self) -> None:
        """--optim (with --optim_args) one the Trainer can build here: it builds it only once the run folder exists,
        and a package it needs (bitsandbytes, torchao, galore_torch, ...) may not be installed."""
        from transformers import Trainer

        if self.optim_args and any(item.count("=") != 1 for item in self.optim_args.replace(" ", "").split(",")):
            raise WorkshopError(f"--optim_args {self.optim_args}: give key=value pairs separated by commas, "
                                "e.g. momentum=0.9,nesterov=True")
        try:
            Trainer.get_optimizer_cls_and_kwargs(self, _ModelToCome())
        except _ModelToCome.Needed:  # every check on the flags and packages passed; the rest needs the model
            pass
        except (ImportError, ValueError, TypeError, NotImplementedError) as e:
            raise WorkshopError(f"--optim {self.optim.value} cannot be used here ({_first_line(e)}): install what it "
                                "needs, or leave --optim out (PyTorch's AdamW)") from None

    def _check_scheduler(self) -> None:
        """--lr_scheduler_type with its --lr_scheduler_kwargs built once on a stand-in optimizer: the Trainer
        builds it only after the run folder exists, and some schedules need arguments (warmup_stable_decay's
        num_decay_steps, cosine_with_min_lr's min_lr or min_lr_rate)."""
        import torch
        from transformers import get_scheduler

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.learning_rate)
        try:  # a long run, so that no steps-dependent argument is refused for the stand-in's sake
            get_scheduler(self.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10**6,
                          scheduler_specific_kwargs=self.lr_scheduler_kwargs)
        except (TypeError, ValueError) as e:
            given = f" --lr_scheduler_kwargs '{json.dumps(self.lr_scheduler_kwargs)}'" if self.lr_scheduler_kwargs \
                else ""
            raise WorkshopError(f"--lr_scheduler_type {self.lr_scheduler_type.value}{given}: {_first_line(e)}: give "
                                "the schedule's arguments as JSON in --lr_scheduler_kwargs") from None

    def _check_checkpointing(self) -> None:
        """--gradient_checkpointing_kwargs: read only with --gradient_checkpointing, and only the keywords of
        torch.utils.checkpoint.checkpoint (an unknown one fails at the first forward pass)."""
        import inspect

        import torch.utils.checkpoint

        kwargs = self.gradient_checkpointing_kwargs
        if kwargs and not self.gradient_checkpointing:
            raise WorkshopError("--gradient_checkpointing_kwargs does nothing without --gradient_checkpointing: add it, "
                                "or drop the kwargs")
        accepted = [name for name, param in inspect.signature(torch.utils.checkpoint.checkpoint).parameters.items()
                    if param.kind is param.KEYWORD_ONLY]
        unknown = sorted(set(kwargs or {}) - set(accepted))
        if unknown:
            raise WorkshopError(f"--gradient_checkpointing_kwargs: {', '.join(unknown)} is not an argument of "
                                f"torch.utils.checkpoint: use {', '.join(accepted)}")

    def _check_compile(self) -> None:
        """--torch_compile_mode and --torch_compile_backend ones torch and accelerate know (checked by them only
        at the first step, after the run folder is written)."""
        from accelerate.utils import DynamoBackend

        if self.torch_compile_mode is not None:
            from torch._inductor import list_mode_options  # a second's import: only for a run that asks for it

            if self.torch_compile_mode not in list_mode_options():
                raise WorkshopError(f"--torch_compile_mode {self.torch_compile_mode} is not known: use "
                                    f"{', '.join(list_mode_options())}")
        backends = [b.value.lower() for b in DynamoBackend]
        if self.torch_compile_backend is not None and self.torch_compile_backend.lower() not in backends:
            raise WorkshopError(f"--torch_compile_backend {self.torch_compile_backend} is not known: use "
                                f"{', '.join(backends)}")

    def settle_batch(self, micro_batch: int, accumulation: int) -> None:
        """Train in micro-batches of ``micro_batch``, ``accumulation`` of them per optimizer step, and build the
        Trainer's DeepSpeed set-up from the resolved JSON, once: its copy of the JSON with the "auto" batch
        sizes filled, which ``zero.Init``, accelerate and DeepSpeed read, and accelerate's plugin.

        Called by `workshop train` once the batch is decided and the JSON complete, after the processes
        have joined, so the Trainer reads the real world size. A micro-batch other than the one given is
        used for evaluation too.
        """
        if micro_batch != self.per_device_train_batch_size:
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
        # The JSON's batch sizes are checked against the flags while they are parsed
        # (ds_config.check_trainer_conflicts), before the process group exists: until it does, the
        # launcher's WORLD_SIZE is the answer (the Trainer's own property fails there).
        if getattr(self, "distributed_state", None) is None:
            return int(os.environ.get("WORLD_SIZE", "1"))
        return super().world_size


class _ModelToCome:
    """Stands in for the model while the flags are read: an optimizer that needs the model (GaLore, APOLLO)
    reaches for its modules only after checking its package and flags."""

    class Needed(Exception):
        pass

    def _needed(self, *args, **kwargs):
        raise _ModelToCome.Needed

    named_modules = named_parameters = parameters = _needed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__).rstrip(".")


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
        if arg.split("=", 1)[0] in NOT_READ:
            name = arg.split("=", 1)[0]
            raise WorkshopError(f"{name} is not read by workshop train ({NOT_READ[name]}): drop it")
        if arg.startswith("--") and arg.split("=", 1)[0] not in known:
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f": did you mean {close[0]}?" if close else ": see workshop train --help"
            raise WorkshopError(f"unknown flag {name}{hint}")
    try:
        model_args, data_args, ws_args, training_args = p.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # values TrainingArguments refuses (e.g. an unknown strategy), or stray words
        # all of it on one line: some say what they found on the lines after the first
        message = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
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
    for args in (model_args, data_args, ws_args):
        check_ranges(args)
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
    _check_attention(model_args.attn_implementation)
    if ws_args.stage not in STAGES:
        raise WorkshopError(f"--stage {ws_args.stage} is not known: use one of {', '.join(STAGES)}")
    if ws_args.profile_first_step and not ws_args.profile_steps:
        raise WorkshopError("--profile_first_step profiles nothing without --profile_steps N: add --profile_steps 1")
    if ws_args.run_dir is not None and Path(ws_args.run_dir).is_file():
        raise WorkshopError(f"--run_dir {ws_args.run_dir} is a file: give a folder")


def _check_attention(name: str | None) -> None:
    """--attn_implementation one that transformers knows (a hub kernel, org/name, included): it checks only
    when the model is built, after the run folder is written."""
    if name is None:
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["sdpa", "eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if k != "sdpa")]
    if name not in known and not is_kernel(name):
        raise WorkshopError(f"--attn_implementation {name} is not known: use {', '.join(known)}, or a hub kernel "
                            "(org/name)")
    _check_attention_installed(name)


def _check_attention_installed(name: str) -> None:
    """The package a kernel needs installed and its device present: transformers finds out only when it builds
    the model, after the run folder is written. Its own reasons, as it would give them then."""
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
    from transformers.modeling_utils import PreTrainedModel
    from transformers.utils import is_kernels_available

    if is_kernels_available():
        return  # a hub kernel, and the library's fallback for a flash attention package not installed
    if is_kernel(name):
        raise WorkshopError(f"--attn_implementation {name} is a hub kernel, which needs the kernels package: "
                            "pip install kernels, or use sdpa")
    version = next((v for v in FLASH_ATTENTION_COMPATIBILITY_MATRIX if name.endswith(f"flash_attention_{v}")), None)
    if version is None:
        return
    try:  # its checks of packages and devices, which read nothing of the model
        PreTrainedModel._flash_attn_import_error(None, **FLASH_ATTENTION_COMPATIBILITY_MATRIX[version])
    except ImportError as e:
        reason = _first_line(e).split("the following error: ", 1)[-1]
        raise WorkshopError(f"--attn_implementation {name} cannot run here ({reason}): install it on a GPU node, "
                            "or use sdpa") from None
