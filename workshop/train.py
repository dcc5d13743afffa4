"""``workshop train``: fine-tune a causal LM with the Hugging Face Trainer, with or without DeepSpeed.

    workshop train --preset tiny                                            # laptop CPU, < 1 minute
    workshop train --model_name_or_path gpt2 --dataset_name squad           # one GPU
    workshop train --deepspeed ds_configs/zero2.json                        # ZeRO-2 on one GPU
    torchrun --nproc_per_node 4 -m workshop train --deepspeed ds_configs/zero3.json
    sbatch baseline/baseline.slurm --model_name_or_path gpt2-large          # what the stage scripts do

A run is plan -> build -> fit -> record: ``plan`` decides every setting and runs every check before
anything is written (a bad flag, file or machine stops there, in one line), ``build`` makes the model
and the Trainer and writes config.json, ``fit`` trains (and stops cleanly on a signal), ``record``
writes the results. The run folder (logs/<stage>/<run id>/) receives config.json, steps.jsonl,
log_history.json, metrics.json, status.json and model/ (docs/run-folder.md has the full layout).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import transformers

from workshop import config as cfg
from workshop import data_loader, distributed, ds_config, ds_grad_clip, evaluation, files, memory, metrics, preflight
from workshop import model as models
from workshop.errors import STOPPED, OutOfMemory, WorkshopError
from workshop.metrics import format_table
from workshop.shapes import ModelShape, shape_from_config
from workshop.trainer import (JobClock, MeasureCallback, ProfileCallback, SaveOnTimeOrSignal,
                              WorkshopTrainer, all_ranks_sum, complete_checkpoints)
from workshop.units import GIB

log = logging.getLogger("workshop")


@dataclass
class Plan:
    """A run as decided before anything is written: its settings, folder, model shape and data."""

    model_args: cfg.ModelArguments
    data_args: cfg.DataArguments
    ws_args: cfg.WorkshopArguments
    training_args: cfg.WorkshopTrainingArguments
    launch: str  # how the processes were started (distributed.init_env)
    run_dir: Path
    tokenizer: object
    model_config: object
    shape: ModelShape
    prepared: data_loader.Prepared
    batch: memory.LongestBatch  # the batch memory is predicted for, from the data
    clock: JobClock  # where the job's time goes, phase by phase


@dataclass
class Built:
    """The Trainer of a run, the callbacks ``fit`` and ``record`` read, and config.json's contents."""

    trainer: WorkshopTrainer
    measure: MeasureCallback
    stop: SaveOnTimeOrSignal
    run_info: dict


def run(argv: list[str], clock: JobClock) -> dict | None:
    """``workshop train`` with these flags: the run's metrics, or None when a signal stopped it (status.json)."""
    p = plan(argv, clock)
    if distributed.is_main():
        p.run_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(p.run_dir / "status.json", {"status": "running", "error": None})
    try:
        built = build(p)
        return record(p, built) if fit(p, built) else None
    except torch.cuda.OutOfMemoryError:
        message = memory.oom_message(p.shape, p.model_args, p.training_args, p.batch)
        if distributed.is_main():
            files.write_json(p.run_dir / "status.json", {"status": "oom", "error": message})
        raise OutOfMemory(message) from None
    except BaseException as error:
        # The run folder says what happened; earlier results elsewhere are untouched.
        if distributed.is_main():
            files.write_json(p.run_dir / "status.json", {"status": "failed", "error": _first_line(error)})
        raise


# ---------------------------------------------------------------------------------------------------------------
# plan: every setting decided once, every check before anything is written


def plan(argv: list[str], clock: JobClock) -> Plan:
    """The flags parsed once, the processes joined, the run folder chosen, the model's shape and the data
    known, the micro-batch fitted to the GPU: each check that can fail on bad input has passed."""
    uses_deepspeed = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in cfg.expand_argv(argv))
    launch = distributed.init_env(deepspeed=uses_deepspeed)
    preflight.check_gpu_count()
    model_args, data_args, ws_args, training_args = cfg.parse(argv)
    _ = training_args.device  # initialises torch.distributed when several processes run
    if uses_deepspeed:
        distributed.init_deepspeed_comm()
    run_dir = resolve_run_dir(ws_args)
    preflight.check_run_dir(run_dir)

    tokenizer = models.load_tokenizer(model_args)
    model_config = models.model_config(model_args, tokenizer)
    preflight.check_lengths(data_args, model_config)
    shape = shape_from_config(model_config)
    preflight.check_room(run_dir, shape.n_params, training_args, ws_args.save_model)
    if training_args.deepspeed:
        # Host memory, NVMe room, async_io, the CUDA arch list: before DeepSpeed builds anything.
        preflight.check_resources(training_args.deepspeed, shape.n_params, training_args, distributed.num_nodes(),
                                  f"--deepspeed {training_args.deepspeed_file}")
    clock.switch("data")
    with training_args.main_process_first(desc="loading and tokenising the data"):
        prepared = data_loader.prepare(data_args, tokenizer, seed=training_args.seed)
    clock.switch("preflight")
    batch = longest_batch(data_args, prepared)
    micro_batch, accumulation = fit_batch_to_gpu(argv, model_args, training_args, shape, batch, gpu_bytes())
    if training_args.deepspeed:
        ds_config.size_param_buffers(training_args.deepspeed, shape.largest_layer_params)
    training_args.settle_batch(micro_batch, accumulation)
    return Plan(model_args, data_args, ws_args, training_args, launch, run_dir, tokenizer, model_config, shape,
                prepared, batch, clock)


def resolve_run_dir(ws_args) -> Path:
    """logs/<stage>/<run id>; decided on rank 0 so every rank writes into the same folder."""
    if ws_args.run_dir:
        run_dir = Path(ws_args.run_dir)
    else:
        run_id = os.environ.get("SLURM_JOB_ID") or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(ws_args.logs_root) / ws_args.stage / run_id
        suffix = 1
        while run_dir.exists():  # two local runs within one second, or a reused job id
            suffix += 1
            run_dir = Path(ws_args.logs_root) / ws_args.stage / f"{run_id}-{suffix}"
    return Path(distributed.broadcast(str(run_dir)))


def longest_batch(data_args, prepared) -> memory.LongestBatch:
    """The batch the memory prediction assumes: the longest sample's tokens, as the run's collator will pad them,
    and the most targets any sample has."""
    seq_len = data_loader.Collator.for_run(data_args, pad_token_id=0).padded_length(prepared.stats["length_max"])
    return memory.LongestBatch(seq_len, prepared.stats["targets_max"])


def gpu_bytes() -> int | None:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() \
        else None


def fit_batch_to_gpu(argv, model_args, training_args, shape: ModelShape, batch: memory.LongestBatch,
                     card: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation): the default micro-batch where it fits a GPU of card bytes, else a smaller
    one with more accumulation, the same global batch.

    Only when neither --per_device_train_batch_size nor --gradient_accumulation_steps was given and the
    DeepSpeed JSON leaves the batch "auto" (a batch you chose is used as it is), and only on a GPU (card
    None: nothing to fit).
    """
    micro, accum = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    ds = training_args.deepspeed or {}
    batch_in_json = any(ds.get(key, "auto") != "auto" for key in (
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if card is None or cfg.batch_given(argv) or batch_in_json:
        return micro, accum
    fitted = memory.micro_batch_that_fits(shape, model_args, training_args, batch, card)
    if fitted == micro:
        return micro, accum
    need = memory.predicted_memory(shape, model_args, training_args, batch, micro).gpu_total_bytes
    distributed.print0(f"micro-batch {micro} needs about {need / GIB:.1f} GiB by `workshop estimate` "
                       f"({batch.seq_len} tokens in the longest batch), the GPU has {card / GIB:.1f}: using "
                       "--per_device_train_batch_size "
                       f"{fitted} --gradient_accumulation_steps {accum * (micro // fitted)}, the same global batch "
                       "(give either flag to choose yourself)")
    return fitted, accum * (micro // fitted)


# ---------------------------------------------------------------------------------------------------------------
# build: the model, the Trainer and its callbacks; config.json


def build(p: Plan) -> Built:
    """The model on its device, the Trainer with the workshop's callbacks, and config.json written."""
    p.clock.switch("model_build")
    args = p.training_args
    args.output_dir = str(p.run_dir / "checkpoints")
    args.dataloader_pin_memory = torch.cuda.is_available()  # pinning needs a GPU; on CPU it only warns
    if "tensorboard" in args.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(p.run_dir / "tensorboard"))
    # Same seed, same initial weights, whichever stage runs (the launchers consume RNG differently).
    transformers.set_seed(args.seed)
    models.prefer_shape_agnostic_attention()
    if args.deepspeed:
        ds_grad_clip.use(args.foreach_grad_clip)
    model = models.build_model(p.model_args, p.tokenizer, p.model_config, args.device)
    collator = data_loader.Collator.for_run(p.data_args, p.tokenizer.pad_token_id)
    run_info = describe(p, model, collator)
    if distributed.is_main():
        files.write_json(p.run_dir / "config.json", run_info)
        distributed.print0(f"run folder: {p.run_dir}\nconfiguration:\n{format_table(_flat_config(run_info))}")

    trainer = WorkshopTrainer(model=model, args=args, data_collator=collator, train_dataset=p.prepared.train,
                              eval_dataset=p.prepared.eval, processing_class=p.tokenizer, clock=p.clock)
    measure = MeasureCallback(trainer, p.run_dir / "steps.jsonl", run_info["model_info"]["flops_per_token"],
                              run_info["environment"]["device"] if torch.cuda.is_available() else None,
                              args.precision, distributed.world_size(), distributed.is_main())
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):  # the measure callback prints one line per log
        trainer.remove_callback(noisy)
    trainer.add_callback(measure)
    stop = SaveOnTimeOrSignal(60 * args.save_minutes, p.clock)
    trainer.add_callback(stop)
    if p.ws_args.profile_steps:
        trainer.add_callback(ProfileCallback(p.run_dir, p.ws_args.profile_steps, distributed.is_main(),
                                             p.ws_args.profile_first_step))
    return Built(trainer, measure, stop, run_info)


def describe(p: Plan, model, collator) -> dict:
    """config.json: the run's labels and every setting as resolved, the machine, the model and the data."""
    args, ds_json = p.training_args, p.training_args.deepspeed
    zero_stage, offload_optimizer, offload_param = ds_config.deepspeed_choices(ds_json)
    shape = dataclasses.asdict(p.shape)
    shape.pop("name")
    mean_length = p.prepared.stats["length_mean"]
    return {
        "labels": {
            "run_id": p.run_dir.name, "stage": p.ws_args.stage, "model": p.model_args.model_name_or_path,
            "dataset": p.data_args.train_file or p.data_args.dataset_name,
            "deepspeed": Path(args.deepspeed_file).name if args.deepspeed_file else None,
            "zero_stage": zero_stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param,
        },
        "deepspeed_config": ds_json,
        # as resolved: the attention the model runs, the padding multiple of this device
        "model": {**vars(p.model_args), "attn_implementation": models.attention_used(p.model_args, model)},
        "data": {**vars(p.data_args), "pad_to_multiple_of": collator.pad_to_multiple_of},
        "workshop": {**vars(p.ws_args), "launch": p.launch},
        "training": args.to_dict(), "environment": environment(),
        "model_info": {**shape, "seq_len": mean_length,
                       "flops_per_token": metrics.flops_per_token(shape["n_params"], shape["n_layers"],
                                                                 shape["hidden_size"], mean_length)},
        "data_stats": p.prepared.stats,
    }


def _flat_config(run_info: dict) -> dict:
    """The settings a participant cares about at a glance; config.json holds everything."""
    t = run_info["training"]
    return {**run_info["labels"], "precision": t["precision"], "micro_batch": t["per_device_train_batch_size"],
            "grad_accum": t["gradient_accumulation_steps"], "epochs": t["num_train_epochs"],
            "learning_rate": t["learning_rate"], "max_seq_length": run_info["data"]["max_seq_length"],
            "loss_on": run_info["data"]["loss_on"], "parameters": run_info["model_info"]["n_params"],
            "train_samples": run_info["data_stats"]["train_samples"],
            "mean_length": run_info["data_stats"]["length_mean"], "max_length": run_info["data_stats"]["length_max"],
            "dropped_too_long": run_info["data_stats"]["dropped_too_long"],
            "device": run_info["environment"]["device"], "world_size": run_info["environment"]["world_size"]}


def _versions() -> dict:
    """The packages' versions, read from their installed metadata: importing DeepSpeed for its version alone
    would cost every run without it DeepSpeed's start-up."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": version("accelerate"), "deepspeed": version("deepspeed")}


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        **_versions(),
        "hostname": socket.gethostname(),
        "world_size": distributed.world_size(),
        "num_nodes": distributed.num_nodes(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_count_per_node": torch.cuda.device_count() if cuda else 0,
        "gpu_total_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "host_total_memory_gib": psutil.virtual_memory().total / GIB,
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# fit: train, resuming from the run folder's newest checkpoint; stop cleanly on a signal


def fit(p: Plan, built: Built) -> bool:
    """Train to the end (True), or to the checkpoint a stop signal asked for (False, status.json says so)."""
    trainer, stop, args = built.trainer, built.stop, p.training_args
    # A requeued job finds its own checkpoints in its run folder and goes on from the newest.
    resume = args.resume_from_checkpoint
    if resume is None and complete_checkpoints(args.output_dir):
        resume = str(complete_checkpoints(args.output_dir)[-1])
    if resume:
        distributed.print0(f"resuming from {resume}")
    p.clock.switch("trainer_setup")  # until the first step: DeepSpeed's engine, the optimizer, the resumed state
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.restore_handlers()
    if stop.stopped_at is None:
        return True
    if distributed.is_main():
        files.write_json(p.run_dir / "log_history.json", trainer.state.log_history)
        files.write_json(p.run_dir / "status.json", {"status": "stopped", "error": None, "signal": stop.received,
                                                     "step": stop.stopped_at})
    distributed.print0(f"stopped on {stop.received} at step {stop.stopped_at}: checkpoint saved in "
                       f"{args.output_dir}; the same command with --run_dir {p.run_dir} resumes")
    return False


# ---------------------------------------------------------------------------------------------------------------
# record: the saved model, the answers' scores, metrics.json


def record(p: Plan, built: Built) -> dict:
    """The trained model saved, the validation questions answered, and the run's metrics written."""
    trainer, clock = built.trainer, p.clock
    clock.switch("final_save")
    if p.ws_args.save_model:
        trainer.save_model(str(p.run_dir / "model"))  # consolidated 16-bit weights under ZeRO-3 (see ds_configs)
    clock.switch("answer_scoring")
    answers = {"exact_match": None, "f1": None}
    if p.prepared.answer_eval:
        zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        predictions = evaluation.generate_answers(trainer.model, p.tokenizer, p.prepared.answer_eval,
                                                  synced_gpus=zero3 and distributed.world_size() > 1)
        answers = evaluation.squad_scores(predictions, [r["answers"]["text"] for r in p.prepared.answer_eval])
    clock.switch("writing_results")
    results = workshop_metrics(trainer, built.measure, p.prepared, built.run_info, answers)
    if distributed.is_main():
        files.write_json(p.run_dir / "log_history.json", trainer.state.log_history)
    # Measured on rank 0 up to here; writing metrics.json and the table below is what is left out.
    breakdown = clock.breakdown()
    timing = {"wall_time_s": sum(breakdown.values()), "time_breakdown_s": breakdown}
    if distributed.is_main():
        files.write_json(p.run_dir / "metrics.json", {**results, **timing})
        files.write_json(p.run_dir / "status.json", {"status": "completed", "error": None})
        distributed.print0(f"\nworkshop metrics ({p.run_dir}):\n{format_table(results)}\n\n"
                           f"where the job's time went (time_breakdown_s):\n{metrics.format_breakdown(breakdown)}")
    return {**results, **timing}


def workshop_metrics(trainer, measure: MeasureCallback, prepared, run_info: dict, answers: dict) -> dict:
    """The workshop's table for this run, from the Trainer's log history and the run's own measurements.

    Time and speeds cover this job's training time only (no evaluation, no checkpointing, no earlier part
    of a resumed run): time per epoch is that time scaled to a full epoch of optimizer steps, train
    samples/s an epoch's samples over it.
    """
    args = trainer.args
    logged = metrics.digest(trainer.state.log_history)
    world = distributed.world_size()
    training_time = sum(measure.epoch_times)
    steps_done = trainer.state.global_step - measure.first_step
    tokens = all_ranks_sum(trainer.tokens_seen)
    tokens_per_s = tokens / training_time if training_time else None
    peak = metrics.peak_flops(run_info["environment"]["device"], args.precision)
    time_per_epoch = training_time / steps_done * logged["steps_per_epoch"] if steps_done else None
    return {
        **run_info["labels"],
        "world_size": world,
        "num_nodes": distributed.num_nodes(),
        "precision": args.precision,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "max_seq_length": run_info["data"]["max_seq_length"],
        "train_samples": prepared.stats["train_samples"],
        "eval_samples": prepared.stats["eval_samples"],
        "epochs": args.num_train_epochs,
        "steps_per_epoch": logged["steps_per_epoch"],
        "total_steps": trainer.state.global_step,
        **{key: logged[key] for key in ("final_train_loss", "eval_loss_per_epoch", "final_eval_loss",
                                        "perplexity", "train_runtime_s")},
        "epoch_times_s": measure.epoch_times,
        "first_step_s": measure.first_step_s,
        "time_per_epoch_s": time_per_epoch,
        "train_samples_per_second": metrics.samples_per_second(prepared.stats["train_samples"], time_per_epoch),
        "eval_samples_per_second": logged["eval_samples_per_second"],
        "tokens_per_second": tokens_per_s,
        "mfu": metrics.mfu(tokens_per_s, run_info["model_info"]["flops_per_token"], peak, world),
        **measure.peaks(),
        **answers,
        "dropped_too_long": prepared.stats["dropped_too_long"],
        "length_mean": prepared.stats["length_mean"],
        "length_max": prepared.stats["length_max"],
    }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    """``workshop train``: its exit status says what status.json says (the table in errors.py).

    Returns it to a caller in the same process (the tests); the process entry point (cli.entry) then
    ends the process with it. Any other error propagates: the entry point makes it exit status 1.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.disable_progress_bar()  # progress bars garble SLURM .out files
    try:
        clock = JobClock()  # "launch_and_imports" ends here
        metrics = run(sys.argv[1:] if argv is None else argv, clock)
        distributed.shutdown()
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.leave_on_error()
        return e.exit_code
    return 0 if metrics is not None else STOPPED
