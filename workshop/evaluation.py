"""SQuAD answer quality: greedy answers to validation questions, scored by exact match and F1.

The scores follow the official SQuAD v1.1 evaluation (the definition behind ``evaluate``'s ``squad``
metric): answers are lower-cased, stripped of punctuation, articles (a, an, the) and extra white
space; exact match is 100 if the prediction equals any reference, F1 is the best token-overlap F1
over the references. It is computed here, so it works offline, with one implementation everywhere.
"""

from __future__ import annotations

import collections
import re
import string

import torch

from workshop.data_loader import prompt_text

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """{'exact_match', 'f1'} in percent, each the mean over questions of the best score over references."""
    if not predictions:
        return {"exact_match": None, "f1": None}
    em = sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references))
    f = sum(max(f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": 100 * em / len(predictions), "f1": 100 * f / len(predictions)}


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 32, batch_size: int = 64,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy answers, batched with left padding; the answer ends at EOS or the first newline.

    A generation step costs about the same for 16 prompts as for 64 (a step is a few small products), so
    the default 50 questions go in one batch: their keys and values take less memory than the training's
    activations did, which are freed by then.

    ``synced_gpus`` must be True under ZeRO-3 on several GPUs: every rank holds a slice of the
    weights, so all ranks run every forward pass until the slowest finishes.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    answers = []
    try:
        for i in range(0, len(records), batch_size):
            prompts = [prompt_text(r) for r in records[i:i + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, batch["input_ids"].shape[1]:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    finally:
        tokenizer.padding_side = side
    return answers
