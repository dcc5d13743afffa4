import pytest
import torch

from workshop import model as models
from workshop import packing
from workshop.config import ModelArguments
from workshop.data_loader import IGNORE_INDEX, Collator


def test_pack_rows_places_every_sample_once_within_the_capacity():
    lengths = [9, 3, 7, 2, 5, 1, 8, 4]
    rows = packing.pack_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 39 tokens need 4 rows of 10; one row per sample would be 8


def test_a_packed_row_keeps_each_samples_positions_and_targets_to_itself():
    samples = [{"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13]},
               {"input_ids": [21, 22], "labels": [21, 22]}]
    batch = Collator(pad_token_id=0, pack=True)(samples)
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, 22, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # padding counts from 0: a sample of its own
    assert batch["shift_labels"].tolist() == [[12, 13, IGNORE_INDEX], [22, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # two samples of 2 and 1 share a row of 3: the first's last token has no target, not the second's first
    batch = Collator(pad_token_id=0, pack=True)([{"input_ids": [31, 32], "labels": [31, 32]},
                                                 {"input_ids": [41], "labels": [41]}, samples[0]])
    assert batch["input_ids"].tolist() == [[11, 12, 13], [31, 32, 41]]
    assert batch["position_ids"][1].tolist() == [0, 1, 0]
    assert batch["shift_labels"][1].tolist() == [32, IGNORE_INDEX, IGNORE_INDEX]
    # the library's own shift of the packed labels gives the same targets
    assert batch["labels"][1, 1:].tolist() == batch["shift_labels"][1, :-1].tolist()


def _samples(vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in (13, 4, 9, 2, 11, 6, 7):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 2
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bloom"])
@pytest.mark.parametrize("num_items", [False, True])
def test_packed_rows_give_the_library_models_loss_and_gradients(tokenizer, name, num_items):
    stock_args = ModelArguments(model_name_or_path=name, fast_kernels=False)
    config = models.model_config(stock_args, tokenizer)
    torch.manual_seed(0)
    stock = models.build_model(stock_args, tokenizer, config)
    samples = _samples(config.vocab_size)
    padded = Collator(tokenizer.pad_token_id)(samples)
    packed = Collator(tokenizer.pad_token_id, pack=True)(samples)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    targets = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["shift_labels"] != IGNORE_INDEX).sum()) == targets
    extra = {"num_items_in_batch": torch.tensor(targets)} if num_items else {}

    def loss_and_grads(model, batch):
        model.zero_grad()
        loss = model(**batch, **extra).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads(stock, padded)
    torch.manual_seed(0)
    fast = models.build_model(ModelArguments(model_name_or_path=name), tokenizer, config)
    for batch in (padded, packed):
        loss, grads = loss_and_grads(fast, batch)
        torch.testing.assert_close(loss, want_loss)
        for n, g in grads.items():
            torch.testing.assert_close(g, want_grads[n], msg=n)


def test_the_target_forward_leaves_generation_to_the_library(tokenizer):
    args = ModelArguments(model_name_or_path="tiny-bloom")
    model = models.build_model(args, tokenizer, models.model_config(args, tokenizer))
    ids = torch.tensor([[5, 6, 7]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
