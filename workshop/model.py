"""Model and tokenizer: from the hub, from a local folder, or built from a configuration.

    load_tokenizer(ModelArguments(model_name_or_path="gpt2"))
    build_model(ModelArguments(model_name_or_path="gpt2-medium", from_config=True), tokenizer)

Random weights from a configuration need no download, and speed and memory do not depend on the
weights: that is how the tiny CPU runs, the tests and the GPU benchmarks work offline.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from workshop import builtin_data, hub
from workshop.data_loader import IGNORE_INDEX
from workshop.errors import WorkshopError
from workshop.shapes import KNOWN_ARCHITECTURES, TINY_MODELS, table_config, workshop_sdpa

log = logging.getLogger(__name__)



def _not_found(flag: str, name: str, error: Exception, model_args) -> WorkshopError:
    import huggingface_hub

    reason = str(error).strip().splitlines()[0][:160]
    fetch = f"run `{hub.model_command(model_args)}` on a login node with internet"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return WorkshopError(f"{flag} {name} is not in the local cache and the hub is offline: {fetch} first")
    if "couldn't connect" in reason:  # a compute node without internet, HF_HUB_OFFLINE not exported
        return WorkshopError(f"{flag} {name} is not in the local cache and the hub is out of reach: {fetch}, "
                             "then export HF_HUB_OFFLINE=1 for the job")
    return WorkshopError(f"{flag} {name} could not be loaded ({reason}): check the name or the local path")


def load_tokenizer(model_args) -> "PreTrainedTokenizerBase":  # noqa: F821
    name = model_args.tokenizer_name_or_path
    if name is None:
        name = "builtin" if model_args.model_name_or_path in TINY_MODELS else model_args.model_name_or_path
    if name == "builtin":
        tokenizer = builtin_data.build_tokenizer()
    else:
        flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise _not_found(flag, name, e, model_args) from None
    if tokenizer.pad_token is None:
        # GPT-2 and friends ship without one. Padding is masked from loss and attention, so reusing
        # EOS is safe: the labels mark padding by position, never by token id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(model_args, tokenizer) -> PretrainedConfig:
    name = model_args.model_name_or_path
    if name in KNOWN_ARCHITECTURES and (model_args.from_config or name in TINY_MODELS):
        config = table_config(KNOWN_ARCHITECTURES[name], len(tokenizer), **_special_tokens(tokenizer))
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise _not_found("--model_name_or_path", name, e, model_args) from None
    for key, value in _special_tokens(tokenizer).items():
        setattr(config, key, value)
    return config


def _special_tokens(tokenizer) -> dict:
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def prefer_shape_agnostic_attention() -> None:
    """Keep PyTorch's fused attention off its cuDNN backend.

    With dynamic padding nearly every batch has a new sequence length, and cuDNN's attention builds
    a new execution plan for each one (a third of a second apiece on an H100); the flash and
    memory-efficient kernels need no such step.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def max_positions(config: PretrainedConfig) -> int | None:
    """Longest sequence the model can embed; None where position is relative (BLOOM's ALiBi)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def build_model(model_args, tokenizer, config: PretrainedConfig, device: torch.device | None = None) -> torch.nn.Module:
    """The model in fp32: mixed precision keeps fp32 master weights and casts per operation.

    Random weights from a configuration are made on ``device``, where they will train: drawn on
    the CPU, a 7B model's weights took most of a two-minute ``workshop scale`` attempt that trained
    for 1.2 s. Under ZeRO-3 DeepSpeed's ``zero.Init`` places (and partitions) them instead.
    """
    bloom_sdpa = workshop_sdpa(config.model_type, model_args.attn_implementation)
    attention = "eager" if bloom_sdpa else model_args.attn_implementation
    kwargs = {"attn_implementation": attention} if attention else {}
    if model_args.from_config or model_args.model_name_or_path in TINY_MODELS:
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
        where = partitioned_as_drawn() if zero3 else contextlib.nullcontext() if device is None else torch.device(device)
        with where:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                         dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as e:
            raise _not_found("--model_name_or_path", model_args.model_name_or_path, e, model_args) from None
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned placeholder of size 0,
    # which would make every model look smaller than its tokenizer and shrink its vocabulary to the tokenizer's.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model_args.fast_kernels:
        use_fast_kernels(model)
    if bloom_sdpa:
        use_sdpa_for_bloom_attention(model)
    return model


@contextlib.contextmanager
def partitioned_as_drawn():
    """Build a model under ZeRO-3 from the random numbers the build without it draws, in the same order.

    ``zero.Init`` partitions each module's weights as its constructor returns, so a weight that the
    model's ``_init_weights`` sets later has to be gathered first. transformers' own ZeRO-3 build turns
    the constructors' default initialisation off and initialises every module at the end: the same
    distributions, but other random numbers, since the build without ZeRO-3 draws the two interleaved
    (GPT-2 initialises its body, then constructs and initialises its output layer), and so ZeRO-3
    trained from other weights than every other stage at the same seed. Here the constructors draw
    as they always do, each module whole until its constructor returns, and ``_init_weights`` runs
    where it always runs, with the module's weights and its children's gathered (GPT-2's attention
    sets its child ``c_proj``): one module's weights whole at a time, the same numbers drawn on the
    same device. Every rank draws them; rank 0's are kept. (In bf16 or fp16 DeepSpeed makes the
    weights in that precision and they are drawn there, where the other stages draw in fp32 and round.)
    """
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.integrations import deepspeed_config
    from transformers.modeling_utils import set_zero3_state  # zero.Init is on: transformers must not add its own

    initialize = PreTrainedModel._initialize_weights

    def gathered(self, module, *args, **kwargs):
        if getattr(module, "_is_hf_initialized", False):  # done already, nothing to draw
            return
        weights = [*module.parameters(recurse=False), *(p for child in module.children()
                                                          for p in child.parameters(recurse=False))]
        with deepspeed.zero.GatheredParameters(weights, modifier_rank=0):
            initialize(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = gathered
    try:
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
            yield
    finally:
        PreTrainedModel._initialize_weights = initialize


class AlignedLinear(torch.nn.Linear):
    """``nn.Linear`` whose product runs on out_features rounded up to a multiple of 64.

    The extra rows of the weight are zeros made for the product and sliced off its output, so the
    outputs and the gradients are those of the plain layer; only the kernel changes. For GPT-2's
    50,257 outputs (not a multiple of 8) an H200 profile showed the step's three largest products
    on old sm75-family kernels, 4-7 ms each.
    """

    ALIGN = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.out_features % self.ALIGN
        weight = torch.nn.functional.pad(self.weight, (0, 0, 0, pad))
        bias = None if self.bias is None else torch.nn.functional.pad(self.bias, (0, pad))
        return torch.nn.functional.linear(x, weight, bias)[..., :self.out_features]


def use_fast_kernels(model: torch.nn.Module) -> None:
    """Swap modules for ones that compute the same function with faster kernels (``--fast_kernels``).

    And the forward for one that computes logits only where the loss has a target
    (``compute_logits_at_targets_only``). The weights, their names and the saved model stay as they are.
    """
    from transformers.activations import ACT2FN, NewGELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu

    for module in list(model.modules()):
        for name, child in module.named_children():
            # tanh-approximated GELU written out as elementwise operations (GPT-2's eight; BLOOM's as many
            # again in its hand-written backward); PyTorch's is one kernel each way
            if type(child) in (NewGELUActivation, BloomGelu):
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
    output = model.get_output_embeddings()
    if type(output) is torch.nn.Linear and output.out_features % AlignedLinear.ALIGN:
        output.__class__ = AlignedLinear
    compute_logits_at_targets_only(model)


def compute_logits_at_targets_only(model: torch.nn.Module) -> None:
    """Give ``model`` a forward that runs the output layer only at the positions the loss has a target for.

    The library's forward computes the logits of every position (BLOOM: 250,880 of them, cast to
    fp32 for the loss), padding and, with ``--loss_on answer``, the prompt included, and the loss
    then ignores those rows. Here the loss is the library's own (``model.loss_function``) on the
    positions with a target only: the same sum over the same targets, divided by the same count.
    Without labels (generation) the library's forward runs as it is, ``logits_to_keep`` included: generation
    asks for the last position's logits only when the forward names that argument, and without it the
    first step made the logits of every prompt position (50 prompts of BLOOM: 4 GiB in fp32). With labels
    the output carries the loss only. Only this instance changes; its class, weights and saved files do not.
    """
    from transformers.modeling_outputs import CausalLMOutput

    library_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        if labels is None:
            return library_forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                   **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)[0]
        # as the library's loss shifts them: position t predicts token t + 1
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        targets = shift_labels != IGNORE_INDEX
        logits = self.get_output_embeddings()(hidden[targets])
        loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels[targets],
                                  vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        return CausalLMOutput(loss=loss)

    model.forward = types.MethodType(forward, model)


def attention_used(model_args, model: torch.nn.Module) -> str:
    """The attention ``build_model(model_args, ...)`` gave ``model``, as --attn_implementation names it."""
    if workshop_sdpa(model.config.model_type, model_args.attn_implementation):
        return "sdpa"
    return model.config._attn_implementation or "eager"


def use_sdpa_for_bloom_attention(model: torch.nn.Module) -> None:
    """Give each BLOOM attention of ``model`` a forward through ``F.scaled_dot_product_attention``.

    The library has no fused path for BLOOM (transformers 5.17 and 5.23 refuse
    ``attn_implementation="sdpa"`` for it): its forward writes out the scores (``baddbmm`` with ALiBi),
    their fp32 softmax and the probabilities as tensors of batch x heads x query x key, each layer. This
    computes the same function, ALiBi and the additive mask given to the kernel as its ``attn_mask`` and
    ``inv_norm_factor`` as its scale; that mask is built once per forward and shared by the layers. The
    cache is updated as the library does it. The library's forward still runs where this one would differ:
    attention weights asked for (``output_attentions``, which this kernel does not return), the
    ``pretraining_tp`` > 1 ``slow_but_exact`` projection, and a mask that is not additive floats (the
    library's eager masks are). Only these instances change; their class, weights and saved files do not.
    Attention dropout draws other random numbers than the library's (the same probability).
    """
    from transformers.models.bloom.modeling_bloom import BloomAttention, dropout_add

    def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        if (output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact)
                or (attention_mask is not None and not attention_mask.is_floating_point())):
            return BloomAttention.forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                          use_cache=use_cache, output_attentions=output_attentions, **kwargs)
        batch_size, q_length, _ = hidden_states.shape
        # 3 x [batch, heads, length, head_dim]
        query, key, value = self._reshape(self.query_key_value(hidden_states))
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        bias = _alibi_and_mask(alibi, attention_mask, batch_size, self.num_heads, query.dtype)
        context = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.inv_norm_factor)
        context = context.transpose(1, 2).reshape(batch_size, q_length, self.hidden_size)
        output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
        return output, None  # BloomBlock and BloomModel pass the weights on only with output_attentions

    for module in model.modules():
        if isinstance(module, BloomAttention):
            module.forward = types.MethodType(forward, module)


def _alibi_and_mask(alibi: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int, num_heads: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """ALiBi ([batch x heads, 1, key]) plus the additive mask ([batch, 1, query, key]) as one ``attn_mask``.

    In the kernel's dtype, which must be the query's: under autocast that is 16-bit while the mask is
    fp32. The mask's fp32 minimum is clamped to the 16-bit one first: cast as it is it becomes -inf, and
    a query row with no key left (a padding position under left padding) is then not the library's
    (PyTorch 2.13's CPU kernel returns zeros for it, where the library's fp32 softmax of equal minima
    averages the values); kept finite, it is. Every layer gets the same ``alibi`` and ``attention_mask``,
    so the sum is made once and kept on ``alibi`` (freed with it) for the other layers, which then also
    keep one copy for the backward instead of one each.
    """
    shared = getattr(alibi, "_workshop_sdpa_bias", None)
    if shared is not None and shared[0] is attention_mask and shared[1] == dtype:
        return shared[2]
    bias = alibi.view(batch_size, num_heads, 1, -1)
    if attention_mask is not None:  # none: the library adds none either
        bias = bias + attention_mask
    if torch.finfo(bias.dtype).min < torch.finfo(dtype).min:
        bias = bias.clamp(min=torch.finfo(dtype).min)
    bias = bias.to(dtype)
    alibi._workshop_sdpa_bias = (attention_mask, dtype, bias)
    return bias
