import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.activations import ACT2FN, NewGELUActivation
from transformers.models.bloom.modeling_bloom import BloomGelu

from workshop import shapes
from workshop import model as models
from workshop.config import ModelArguments
from workshop.data_loader import IGNORE_INDEX, Collator


def test_known_shapes_build_offline_with_the_published_sizes(tokenizer):
    config = models.model_config(ModelArguments(model_name_or_path="gpt2-medium", from_config=True), tokenizer)
    assert shapes.shape_from_config(config).n_params == 354_823_168  # gpt2-medium's published 355M
    config = models.model_config(ModelArguments(model_name_or_path="bigscience/bloom-560m", from_config=True),
                                 tokenizer)
    assert shapes.shape_from_config(config).n_params == 559_214_592
    assert models.max_positions(config) is None  # ALiBi: no position limit


def test_tiny_model_saves_and_reloads_equal(tmp_path, tokenizer):
    args = ModelArguments(model_name_or_path="tiny-bloom")
    config = models.model_config(args, tokenizer)
    model = models.build_model(args, tokenizer, config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tokenizer.get_vocab()


def test_local_model_folder_loads_through_from_pretrained(tmp_path, tokenizer):
    args = ModelArguments(model_name_or_path="tiny-gpt2")
    model = models.build_model(args, tokenizer, models.model_config(args, tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local = ModelArguments(model_name_or_path=str(tmp_path))
    loaded_tokenizer = models.load_tokenizer(local)
    loaded = models.build_model(local, loaded_tokenizer, models.model_config(local, loaded_tokenizer))
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("name, activation, stock_type", [
    ("tiny-gpt2", lambda m: m.transformer.h[0].mlp.act, NewGELUActivation),
    ("tiny-bloom", lambda m: m.transformer.h[0].mlp.gelu_impl, BloomGelu),
])
def test_fast_kernels_compute_what_the_stock_modules_compute(tokenizer, name, activation, stock_type):
    stock_args = ModelArguments(model_name_or_path=name, fast_kernels=False)
    config = models.model_config(stock_args, tokenizer)
    assert config.vocab_size % 64  # the builtin tokenizer's vocabulary is not aligned either
    torch.manual_seed(0)
    stock = models.build_model(stock_args, tokenizer, config)
    torch.manual_seed(0)
    fast = models.build_model(ModelArguments(model_name_or_path=name), tokenizer, config)
    assert type(fast.lm_head) is models.AlignedLinear
    assert fast.lm_head.weight is fast.get_input_embeddings().weight
    assert type(activation(fast)) is type(ACT2FN["gelu_pytorch_tanh"])  # one kernel
    assert type(activation(stock)) is stock_type
    assert fast.state_dict().keys() == stock.state_dict().keys()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    logits_stock, logits_fast = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    assert logits_fast.shape == logits_stock.shape
    torch.testing.assert_close(logits_fast, logits_stock)
    out_stock, out_fast = stock(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_fast.loss, out_stock.loss)
    out_stock.loss.backward()
    out_fast.loss.backward()
    for (name, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def stock_and_fast(tokenizer, name):
    """The library's model and the fast-kernel one, from the same initial weights."""
    stock_args = ModelArguments(model_name_or_path=name, fast_kernels=False)
    config = models.model_config(stock_args, tokenizer)
    torch.manual_seed(0)
    stock = models.build_model(stock_args, tokenizer, config)
    torch.manual_seed(0)
    fast = models.build_model(ModelArguments(model_name_or_path=name), tokenizer, config)
    return config, stock, fast


def prompt_answer_batch(tokenizer, vocab_size, lengths, seed):
    """Random samples of these lengths, each a prompt without loss then its answer, padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(3, vocab_size, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return Collator(tokenizer.pad_token_id)(samples)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bloom"])
@pytest.mark.parametrize("num_items", [False, True])
def test_logits_at_targets_only_give_the_library_models_loss_and_gradients(tokenizer, name, num_items):
    config, stock, fast = stock_and_fast(tokenizer, name)
    batch = prompt_answer_batch(tokenizer, config.vocab_size, (13, 4, 9, 2, 11), seed=0)
    extra = {"num_items_in_batch": (batch["labels"][:, 1:] != IGNORE_INDEX).sum()} if num_items else {}
    out_stock, out_fast = stock(**batch, **extra), fast(**batch, **extra)
    assert out_fast.logits is None  # not computed: the loss is all a training step needs
    torch.testing.assert_close(out_fast.loss, out_stock.loss)
    out_stock.loss.backward()
    out_fast.loss.backward()
    for (n, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    # without labels (generation) the library's logits, and only the last position's at each step: the output
    # layer sees one position per prompt, never the prompt's length (3 here)
    seen = []
    hook = fast.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    assert fast.generate(batch["input_ids"][:2, :3], max_new_tokens=2, do_sample=False).shape == (2, 5)
    hook.remove()
    assert seen == [1, 1]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bloom"])
def test_logits_at_targets_only_divide_by_the_accumulated_target_count(tokenizer, name):
    """Under gradient accumulation the Trainer passes ``num_items_in_batch``, the targets of all the micro-batches
    of the step, and each micro-batch's loss is its sum divided by that. Here it is 2.5 times this batch's own
    count (the test above passes the batch's own count, which is what ignoring it gives anyway).

    Reference: the sum of per-target cross-entropies of the stock model's logits, by hand, divided by the count.
    Ignoring the count multiplies the loss by 2.5; the tolerances are assert_close's fp32 defaults (1.3e-6
    relative), the sums of a few dozen fp32 terms in another order differ by ~1e-7."""
    config, stock, fast = stock_and_fast(tokenizer, name)
    batch = prompt_answer_batch(tokenizer, config.vocab_size, (10, 3, 7), seed=1)
    targets = batch["labels"][:, 1:]
    own = int((targets != IGNORE_INDEX).sum())
    num_items = torch.tensor(own * 5 // 2)  # this micro-batch and others with more targets in the same step
    logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size).float(), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum") / num_items
    loss_stock = stock(**batch, num_items_in_batch=num_items).loss
    loss_fast = fast(**batch, num_items_in_batch=num_items).loss
    torch.testing.assert_close(loss_stock, by_hand)
    torch.testing.assert_close(loss_fast, by_hand)
    loss_stock.backward()
    loss_fast.backward()
    for (n, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)


def test_a_partitioned_embedding_keeps_the_models_vocabulary(tokenizer, monkeypatch):
    # Under ZeRO-3 (deepspeed.zero.Init) every weight is a size-0 placeholder until gathered.
    args = ModelArguments(model_name_or_path="gpt2", from_config=True)
    config = models.model_config(args, tokenizer)
    config.n_layer = 1
    build = AutoModelForCausalLM.from_config

    def partitioned(*a, **kw):
        model = build(*a, **kw)
        for p in model.parameters():
            p.data = torch.empty(0)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", partitioned)
    model = models.build_model(args, tokenizer, config)
    assert len(tokenizer) < 50257 and model.get_input_embeddings().num_embeddings == 50257


def test_random_weights_are_made_on_the_device_they_train_on(tokenizer):
    """The meta device stands in for a GPU: whatever device is given, the weights are created there."""
    args = ModelArguments(model_name_or_path="tiny-gpt2")
    model = models.build_model(args, tokenizer, models.model_config(args, tokenizer), torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.device.type for p in models.build_model(args, tokenizer, models.model_config(args, tokenizer))
            .parameters()} == {"cpu"}


ZERO3_INIT_SCRIPT = """
import torch
from transformers.integrations import HfDeepSpeedConfig
from workshop import builtin_data, model as models
from workshop.config import ModelArguments

tokenizer = builtin_data.build_tokenizer()
args = ModelArguments(model_name_or_path="gpt2", from_config=True)
config = models.model_config(args, tokenizer)
config.n_layer = 8
torch.manual_seed(0)
plain = dict(models.build_model(args, tokenizer, config).named_parameters())
ds = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
torch.manual_seed(0)
model = models.build_model(args, tokenizer, config)
print("partitioned", sum(p.numel() for p in model.parameters()))
for name, weight in model.named_parameters():
    with deepspeed.zero.GatheredParameters([weight]):
        print("differs", name, (weight - plain[name]).abs().max().item())
        if name.endswith("c_proj.weight"):
            print("std", weight.std().item())
"""


def test_random_weights_under_zero3_are_those_without_it():
    """gpt2's shape from its config, at one seed: under ZeRO-3 (partitioned, one process) the same weights as without.

    And GPT-2's own initialisation, which scales the residual projections (attention's and the MLP's
    ``c_proj``, set by their parent module) to 0.02 / sqrt(2 x layers). transformers' own ZeRO-3 build
    drew every weight differently (0.13 apart at most) and, before 5.23, left those at 0.02.
    """
    from conftest import run_with_deepspeed

    output = [line.split() for line in run_with_deepspeed(ZERO3_INIT_SCRIPT).splitlines()]
    assert [line for line in output if line[0] == "partitioned"] == [["partitioned", "0"]]
    differs = {line[1]: float(line[2]) for line in output if line[0] == "differs"}
    assert len(differs) == 4 + 8 * 12  # embeddings, final norm; 6 weights and 6 biases a layer (lm_head is wte)
    assert set(differs.values()) == {0.0}, {name: d for name, d in differs.items() if d}
    expected = 0.02 / (2 * 8) ** 0.5
    stds = [float(line[1]) for line in output if line[0] == "std"]
    assert len(stds) == 16 and all(abs(s / expected - 1) < 0.1 for s in stds), stds


def _bloom_pair(tokenizer, **model_flags):
    """tiny-bloom twice from one seed: the library's attention (--attn_implementation eager), and the default."""
    args = ModelArguments(model_name_or_path="tiny-bloom", attn_implementation="eager", **model_flags)
    config = models.model_config(args, tokenizer)
    torch.manual_seed(0)
    library = models.build_model(args, tokenizer, config)
    torch.manual_seed(0)
    sdpa = models.build_model(ModelArguments(model_name_or_path="tiny-bloom", **model_flags), tokenizer, config)
    assert all("forward" in vars(block.self_attention) for block in sdpa.transformer.h)  # instances, not the class
    assert not any("forward" in vars(block.self_attention) for block in library.transformer.h)
    assert sdpa.state_dict().keys() == library.state_dict().keys()
    return config, library, sdpa


def _ids(config, *lengths, left=False):
    """Random tokens, padded to the longest row (left for generation, as evaluation does, else right)."""
    g = torch.Generator().manual_seed(0)
    longest = max(lengths)
    ids = torch.randint(3, config.vocab_size, (len(lengths), longest), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, slice(longest - n, None) if left else slice(n)] = 1
    return ids.masked_fill(mask == 0, config.pad_token_id), mask


def test_bloom_gets_the_workshops_sdpa_unless_eager_is_asked_for(tokenizer):
    def built(name, attention):
        args = ModelArguments(model_name_or_path=name, attn_implementation=attention)
        model = models.build_model(args, tokenizer, models.model_config(args, tokenizer))
        patched = any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "BloomAttention")
        return patched, models.attention_used(args, model)

    assert built("tiny-bloom", None) == built("tiny-bloom", "sdpa") == (True, "sdpa")  # transformers refuses sdpa
    assert built("tiny-bloom", "eager") == (False, "eager")
    assert built("tiny-gpt2", None) == built("tiny-gpt2", "sdpa") == (False, "sdpa")  # the library's own
    assert built("tiny-gpt2", "eager") == (False, "eager")


# fast_kernels off: the library's forward, which with the configuration's use_cache gives every layer a cache
@pytest.mark.parametrize("fast_kernels", [True, False])
def test_sdpa_bloom_attention_gives_the_library_loss_and_gradients(tokenizer, fast_kernels):
    config, library, sdpa = _bloom_pair(tokenizer, fast_kernels=fast_kernels)
    assert config.attention_dropout == 0.0
    library.train(), sdpa.train()
    ids, mask = _ids(config, 11, 6, 9)  # padded at the right, as training pads
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # a prompt without loss
    loss_library = library(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_sdpa = sdpa(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_sdpa, loss_library, rtol=1e-5, atol=0)
    loss_library.backward()
    loss_sdpa.backward()
    for (name, a), (_, b) in zip(library.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sdpa_bloom_attention_generates_what_the_library_generates(tokenizer):
    config, library, sdpa = _bloom_pair(tokenizer)
    library.eval(), sdpa.eval()
    ids, mask = _ids(config, 5, 8, 3, left=True)  # a query row at a left pad sees no key at all
    with torch.no_grad():
        out_library, out_sdpa = (m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                            use_cache=True, output_scores=True, return_dict_in_generate=True,
                                            pad_token_id=config.pad_token_id)
                                 for m in (library, sdpa))
        assert torch.equal(out_sdpa.sequences, out_library.sequences)
        for a, b in zip(out_library.scores, out_sdpa.scores):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        # every position, padding included, and the cache the next step would read
        a = library(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        b = sdpa(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        for x, y in zip(a.hidden_states, b.hidden_states):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
        for layer_a, layer_b in zip(a.past_key_values.layers, b.past_key_values.layers):
            torch.testing.assert_close(layer_b.keys, layer_a.keys)
            torch.testing.assert_close(layer_b.values, layer_a.values)


def test_sdpa_bloom_attention_under_16_bit_autocast_keeps_rows_without_keys(tokenizer):
    """The fp32 mask's minimum becomes -inf in bf16; a left pad's query sees no key and would come out as zeros."""
    config, library, sdpa = _bloom_pair(tokenizer)
    library.eval(), sdpa.eval()
    ids, mask = _ids(config, 4, 9, left=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = library(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = sdpa(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert y.isfinite().all()
        torch.testing.assert_close(y, x, rtol=0, atol=5e-3)  # bf16 rounding; a row of zeros misses by ~3e-2


def test_sdpa_bloom_attention_falls_back_where_the_kernel_cannot_match(tokenizer):
    config, library, sdpa = _bloom_pair(tokenizer)
    library.eval(), sdpa.eval()
    ids, mask = _ids(config, 7, 4)
    with torch.no_grad():  # the weights themselves: only the library's forward has them
        a = library(input_ids=ids, attention_mask=mask, output_attentions=True)
        b = sdpa(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(b.attentions) == config.n_layer
    for x, y in zip(a.attentions, b.attentions):
        assert torch.equal(y, x)
