"""Packed batches, and a forward that computes logits only where a token is a target.

Dynamic padding still wastes a batch's rows on padding: 16 SQuAD-like samples of 152 tokens on
average pad to their longest, about twice as many positions as tokens. Packing lays the batch's
samples end to end in fewer rows of that longest length (first fit, longest first), and the model
sees each sample as if it were alone:

- ``position_ids`` start at 0 for each sample, and a token attends only to the earlier tokens of
  its own sample (transformers builds that mask from the positions for GPT-2; ``bloom_hidden_states``
  builds it, and BLOOM's ALiBi bias, for BLOOM);
- ``shift_labels`` holds each position's target, the next token of the same sample (-100 at a
  sample's last token and on padding), so no sample learns to predict its neighbour's first token.

The loss is the library's, summed over the same targets and divided by the same count, so packing
changes which rows hold a sample, not the loss or its gradient. Samples change row with every
batch; the global batch and the samples in it stay as they are.

``install_target_forward`` also spares the output layer the positions without a target: the
library's forward computes the logits of every position, padding and prompt included (BLOOM:
250,880 per position, in fp32 for the loss), and the loss then ignores those rows.
"""

from __future__ import annotations

import types

import torch

IGNORE_INDEX = -100
# Models whose packed rows this module lays out correctly: GPT-2 takes position_ids and masks packed
# samples apart itself (transformers' masking_utils); BLOOM's blocks get their mask and ALiBi here.
PACKED_MODEL_TYPES = ("gpt2", "bloom")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first fit, longest first, each row at most ``capacity`` tokens."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def packed_batch(samples: list[dict], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The samples packed into rows of ``length`` tokens; the padding at a row's end counts from 0 too."""
    rows = pack_rows([len(s["input_ids"]) for s in samples], length)
    shape = (len(rows), length)
    batch = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "shift_labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),  # real tokens (counted), not the mask
             "position_ids": torch.zeros(shape, dtype=torch.long)}
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            ids, labels = samples[i]["input_ids"], samples[i]["labels"]
            n, end = len(ids), start + len(ids)
            batch["input_ids"][r, start:end] = torch.tensor(ids)
            # labels as the library's loss would shift them inside the row: a sample's first label is no target
            batch["labels"][r, start + 1:end] = torch.tensor(labels[1:])
            batch["shift_labels"][r, start:end - 1] = torch.tensor(labels[1:])
            batch["attention_mask"][r, start:end] = 1
            batch["position_ids"][r, start:end] = torch.arange(n)
            start = end
        batch["position_ids"][r, start:] = torch.arange(length - start)
    return batch


def bloom_hidden_states(transformer: torch.nn.Module, input_ids: torch.Tensor,
                        position_ids: torch.Tensor) -> torch.Tensor:
    """BloomModel's forward on packed rows: each sample masked apart, its ALiBi from its own positions.

    The bias is the library's (``build_alibi_tensor``: head slope x key position) with each
    sample's positions instead of the row's; the mask is the causal mask of the eager attention
    (0 where allowed, the dtype's minimum elsewhere) within each sample only.
    """
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    hidden = transformer.word_embeddings_layernorm(transformer.word_embeddings(input_ids))
    rows, length = input_ids.shape
    heads = transformer.num_heads
    # at position 1 the library's bias is each head's slope itself
    slopes = build_alibi_tensor(torch.ones(1, 2, device=input_ids.device), heads, torch.float32)[:, 0, 1]
    alibi = (slopes[None, :, None] * position_ids[:, None, :]).reshape(rows * heads, 1, length).to(hidden.dtype)
    sample = (position_ids == 0).cumsum(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    allowed = (sample[:, :, None] == sample[:, None, :]) & causal
    mask = torch.zeros(rows, 1, length, length, dtype=hidden.dtype, device=input_ids.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(hidden.dtype).min)
    for block in transformer.h:
        hidden = block(hidden, alibi=alibi, attention_mask=mask)[0]
    return transformer.ln_f(hidden)


def install_target_forward(model: torch.nn.Module) -> None:
    """Give ``model`` a forward that takes packed rows and computes logits only at targets.

    With labels, the loss is the library's own (``model.loss_function``) on the positions that have a
    target; without labels (generation) the library's forward runs as it is, every logit included.
    Batches from ``packed_batch`` (``position_ids`` given) run as packed rows; padded batches as the
    library runs them. The output carries the loss only: the logits of a packed batch belong to no
    row of the input. Only this instance changes; its class, weights and saved files do not.
    """
    from transformers.modeling_outputs import CausalLMOutput

    library_forward = model.forward
    bloom = model.config.model_type == "bloom"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, shift_labels=None,
                **kwargs):
        if labels is None and shift_labels is None:
            return library_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
        # no cache: with one, transformers would not look for packed samples in the positions
        if position_ids is None:
            hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        elif bloom:
            hidden = bloom_hidden_states(self.base_model, input_ids, position_ids)
        else:  # no attention mask: transformers masks the samples apart by their positions
            hidden = self.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        targets = shift_labels != IGNORE_INDEX
        logits = self.get_output_embeddings()(hidden[targets])
        loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels[targets],
                                  vocab_size=self.config.vocab_size,
                                  num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutput(loss=loss)

    model.forward = types.MethodType(forward, model)
