"""Training data: SQuAD prompts, WikiText blocks, local files, or the built-in offline set.

QA samples become ``Question: <q> Context: <c> Answer: <a><eos>``. By default only the answer
(and the closing EOS) is a target: the prompt tokens are labelled -100, so the loss measures
answering, not copying the context. ``--loss_on sequence`` puts the loss on every token, as the
original workshop did. Padding is always -100 and never attended to. A sample longer than
``--max_seq_length`` is dropped and counted, never truncated through its answer.

Text (WikiText or .txt) is concatenated and cut into blocks of ``--max_seq_length`` tokens.

    python -c "from workshop.data_loader import *; ..."   # used by workshop/train.py
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from dataclasses import dataclass, field

import torch

from workshop import builtin_data, hub
from workshop.errors import WorkshopError
from workshop.hub import SQUAD_HUB_ID, WIKITEXT_HUB_ID

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass
class Prepared:
    """Tokenised data ready for the Trainer, plus what the report needs to know about it."""

    task: str  # "qa" or "text"
    train: list[dict]
    eval: list[dict]
    answer_eval: list[dict] = field(default_factory=list)  # raw QA records for exact match / F1
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- raw
def _squad_record(record: dict, where: str) -> dict:
    missing = [k for k in ("question", "context", "answers") if k not in record]
    if missing:
        raise WorkshopError(f"{where} lacks {', '.join(missing)}: SQuAD format needs question, context and "
                            "answers {text: [...], answer_start: [...]}")
    answers = record["answers"]
    if isinstance(answers, list):  # the official SQuAD JSON: [{"text": ..., "answer_start": ...}]
        answers = {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
    if not answers.get("text"):
        raise WorkshopError(f"{where} has no answer text: every question needs at least one answer")
    return {"id": str(record.get("id", where)), "question": record["question"], "context": record["context"],
            "answers": answers}


def read_squad_file(path: str) -> list[dict]:
    """SQuAD-format data from .jsonl (one record per line) or .json (official nested file or a list)."""
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise WorkshopError(f"{path} line {n} is not valid JSON ({e.msg}): fix that line") from None
            else:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise WorkshopError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file") from None
    except UnicodeDecodeError:
        raise WorkshopError(f"{path} is not UTF-8 text: convert it or give another file") from None
    if isinstance(rows, dict) and "data" in rows:  # official layout: data > paragraphs > qas
        rows = [dict(qa, context=p["context"]) for article in rows["data"] for p in article["paragraphs"]
                for qa in p["qas"]]
    if not isinstance(rows, list):
        raise WorkshopError(f"{path}: expected a list of SQuAD records or the official {{'data': [...]}} layout")
    return [_squad_record(r, f"record {i + 1} of {path}") for i, r in enumerate(rows)]


def read_text_file(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise WorkshopError(f"{path} is not UTF-8 text: convert it or give another file") from None


def load_hub_dataset(path: str, name: str | None = None):
    """``datasets.load_dataset`` on a hub id or a local folder/file, with the offline case explained."""
    import datasets

    try:
        return datasets.load_dataset(path, name)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        dataset = hub.dataset_name(path)
        fetch = (f"run `{hub.dataset_command(dataset, name)}` on a login node with internet, "
                 "or use --train_file with local data")
        if datasets.config.HF_HUB_OFFLINE:  # HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1
            raise WorkshopError(f"--dataset_name {dataset} is not in the local cache and the hub is offline: "
                                f"{fetch}") from None
        reason = str(e).strip().splitlines()[0][:160]
        raise WorkshopError(f"--dataset_name {dataset}: could not load {path} ({reason}): {fetch}") from None


def squad_from_hub(path: str = SQUAD_HUB_ID) -> tuple[list[dict], list[dict]]:
    ds = load_hub_dataset(path)
    return ([_squad_record(r, f"{path} train") for r in ds["train"]],
            [_squad_record(r, f"{path} validation") for r in ds["validation"]])


def wikitext_from_hub(path: str = WIKITEXT_HUB_ID[0], name: str = WIKITEXT_HUB_ID[1]) -> tuple[list[str], list[str]]:
    ds = load_hub_dataset(path, name)
    return list(ds["train"]["text"]), list(ds["validation"]["text"])  # datasets 4+ returns a lazy Column


def _split(rows: list, seed: int) -> tuple[list, list]:
    """Hold out 10% (at least one) for validation when only a training file is given."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, len(rows) // 10)
    return rows[n_eval:], rows[:n_eval]


def load_raw(data_args, seed: int) -> tuple[str, list, list]:
    """(task, train rows, eval rows): QA records or text lines, before tokenisation."""
    if data_args.train_file:
        reader = read_text_file if data_args.train_file.endswith(".txt") else read_squad_file
        task = "text" if data_args.train_file.endswith(".txt") else "qa"
        train = reader(data_args.train_file)
        if not train:
            raise WorkshopError(f"--train_file {data_args.train_file} holds no samples: give a file with data in it")
        if data_args.validation_file:
            if data_args.validation_file.endswith(".txt") != (task == "text"):
                raise WorkshopError("--validation_file must be the same kind (QA .json/.jsonl or .txt) as --train_file")
            evaluation = reader(data_args.validation_file)
            if not evaluation:
                raise WorkshopError(f"--validation_file {data_args.validation_file} holds no samples: give a file "
                                    "with data in it")
        else:
            train, evaluation = _split(train, seed)
        return task, train, evaluation
    name = data_args.dataset_name
    if name == "builtin":
        n_train, n_eval = data_args.max_train_samples, max(data_args.max_eval_samples, data_args.answer_eval_samples)
        # Different seeds: validation questions are about people the model has not seen.
        return "qa", builtin_data.squad_records(n_train, seed=seed), builtin_data.squad_records(n_eval, seed=seed + 1)
    if name == "builtin_text":
        return "text", builtin_data.text_lines(2000, seed=seed), builtin_data.text_lines(200, seed=seed + 1)
    if name == "squad":
        return ("qa",) + squad_from_hub()
    if name == "wikitext":
        return ("text",) + wikitext_from_hub(name=data_args.dataset_config_name or WIKITEXT_HUB_ID[1])
    raise WorkshopError(f"--dataset_name {name} is not known")  # config.validate stops this earlier


# ------------------------------------------------------------------------------------- tokenisation
def prompt_text(record: dict) -> str:
    return f"Question: {record['question']} Context: {record['context']} Answer:"


def tokenize_qa(records: list[dict], tokenizer, max_seq_length: int, loss_on: str) -> tuple[list[dict], int]:
    """(samples, number dropped for being longer than max_seq_length)."""
    if not records:  # a one-record file leaves nothing for training after the validation split
        return [], 0
    prompts = tokenizer([prompt_text(r) for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + r["answers"]["text"][0] for r in records], add_special_tokens=False)["input_ids"]
    samples, dropped = [], 0
    for prompt, answer in zip(prompts, answers):
        target = answer + [tokenizer.eos_token_id]
        if len(prompt) + len(target) > max_seq_length:
            dropped += 1
            continue
        input_ids = prompt + target
        labels = ([IGNORE_INDEX] * len(prompt) + target) if loss_on == "answer" else list(input_ids)
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples, dropped


def tokenize_text(lines: list[str], tokenizer, block_size: int) -> list[dict]:
    """Concatenate and cut into full blocks (the last partial block is dropped, as in run_clm)."""
    if not lines:
        return []
    ids = [t for line_ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in line_ids]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _length_stats(samples: list[dict]) -> dict:
    """Tokens per sample, and the most positions of one sample that predict a target (its labels but the first:
    position t predicts token t + 1), which sets how many logits the output layer makes (memory.Settings)."""
    lengths = [len(s["input_ids"]) for s in samples]
    targets = max(sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in samples)
    return {"length_mean": statistics.fmean(lengths), "length_max": max(lengths), "length_min": min(lengths),
            "targets_max": targets}


def prepare(data_args, tokenizer, seed: int) -> Prepared:
    task, train_raw, eval_raw = load_raw(data_args, seed)
    if task == "qa":
        rng = random.Random(seed)  # a fixed random subset, not the first articles of the file
        train_raw = rng.sample(train_raw, min(data_args.max_train_samples, len(train_raw)))
        eval_raw = eval_raw[:max(data_args.max_eval_samples, data_args.answer_eval_samples)]
        train, dropped_train = tokenize_qa(train_raw, tokenizer, data_args.max_seq_length, data_args.loss_on)
        evaluation, dropped_eval = tokenize_qa(eval_raw[:data_args.max_eval_samples], tokenizer,
                                               data_args.max_seq_length, data_args.loss_on)
        answer_eval = [r for r in eval_raw[:data_args.answer_eval_samples]
                       if len(tokenizer(prompt_text(r), add_special_tokens=False)["input_ids"])
                       < data_args.max_seq_length]
        stats = {"dropped_too_long": dropped_train + dropped_eval}
    else:
        train = tokenize_text(train_raw, tokenizer, data_args.max_seq_length)[:data_args.max_train_samples]
        evaluation = tokenize_text(eval_raw, tokenizer, data_args.max_seq_length)[:data_args.max_eval_samples]
        answer_eval, stats = [], {"dropped_too_long": 0}
    for flag, split in (("--max_train_samples / the training data", train), ("--max_eval_samples / the validation data", evaluation)):
        if not split:
            hint = ("raise --max_seq_length or use more data" if task == "text" or stats["dropped_too_long"]
                    else "give a data set with samples in it")
            raise WorkshopError(f"no samples left after tokenisation ({flag}): {hint}")
    stats.update(_length_stats(train))
    stats.update({"train_samples": len(train), "eval_samples": len(evaluation),
                  "train_tokens": sum(len(s["input_ids"]) for s in train)})
    if stats["dropped_too_long"]:
        log.warning("dropped %d samples longer than --max_seq_length %d (raise it to keep them)",
                    stats["dropped_too_long"], data_args.max_seq_length)
    return Prepared(task=task, train=train, eval=evaluation, answer_eval=answer_eval, stats=stats)


# ---------------------------------------------------------------------------------------- batching
class Collator:
    """Pads each batch to its longest sample (or to a fixed length); padding is -100 and unattended.

    ``pad_to_multiple_of`` rounds each batch's length up: 8 on a GPU keeps tensor-core shapes at the
    cost of at most 7 tokens a row.
    """

    def __init__(self, pad_token_id: int, pad_to_length: int | None = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_length = pad_to_length
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_run(cls, data_args, pad_token_id: int) -> Collator:
        """A run's collator: every sample to --max_seq_length with --pad_to_max_length, else each batch
        to its longest sample, rounded up to --pad_to_multiple_of (default 8 on a GPU, none on a CPU)."""
        multiple = data_args.pad_to_multiple_of or (8 if torch.cuda.is_available() else None)
        return cls(pad_token_id, pad_to_length=data_args.max_seq_length if data_args.pad_to_max_length else None,
                   pad_to_multiple_of=multiple)

    def padded_length(self, longest: int) -> int:
        """The length of a batch whose longest sample has ``longest`` tokens."""
        if self.pad_to_length:
            return self.pad_to_length
        multiple = self.pad_to_multiple_of or 1
        return -(-longest // multiple) * multiple

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = self.padded_length(max(len(s["input_ids"]) for s in samples))
        batch = {k: torch.full((len(samples), length), v, dtype=torch.long)
                 for k, v in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(s["input_ids"])
            batch["labels"][row, :n] = torch.tensor(s["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch
