"""Model shapes: the workshop's architectures by name, and ``ModelShape``, the counts memory and FLOPs need.

    shapes.model_shape("gpt2-medium")             # offline: the published shape below
    shapes.model_shape("path/to/config.json")     # any causal LM's configuration
    shapes.table_config(shapes.SCALED_BLOOM["bloom-10b"])

``--from_config`` builds a known name from this table without the hub; ``workshop estimate`` and
``workshop scale`` count its parameters on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workshop import builtin_data
from workshop.errors import WorkshopError

# The published shapes of the workshop's models, so --from_config needs no hub access.
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
    "bigscience/bloom-560m": dict(model_type="bloom", n_layer=24, hidden_size=1024, n_head=16, vocab_size=250880),
    "bigscience/bloom-1b1": dict(model_type="bloom", n_layer=24, hidden_size=1536, n_head=16, vocab_size=250880),
    "bigscience/bloom-1b7": dict(model_type="bloom", n_layer=24, hidden_size=2048, n_head=16, vocab_size=250880),
    "bigscience/bloom-3b": dict(model_type="bloom", n_layer=30, hidden_size=2560, n_head=32, vocab_size=250880),
    "bigscience/bloom-7b1": dict(model_type="bloom", n_layer=30, hidden_size=4096, n_head=32, vocab_size=250880),
    # Two layers, 64 wide: a few seconds per epoch on a laptop CPU. The vocabulary follows the tokenizer.
    # No dropout, so runs that should match (ZeRO stages, resumes) match step for step.
    "tiny-gpt2": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=512, vocab_size=None,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "tiny-bloom": dict(model_type="bloom", n_layer=2, hidden_size=64, n_head=4, vocab_size=None,
                       hidden_dropout=0.0, attention_dropout=0.0),
}
TINY_MODELS = ("tiny-gpt2", "tiny-bloom")

# BLOOM's layout past bloom-7b1 (30 x 4096), for `workshop scale`: width and depth grown together,
# 128-wide heads; parameters ~ 12 x layers x hidden^2 + 250880 x hidden. bloom-4b8 and bloom-6b3 fill
# the gap between bloom-3b and bloom-7b1, where one GPU's walls lie.
SCALED_BLOOM: dict[str, dict] = {
    name: dict(model_type="bloom", n_layer=layers, hidden_size=hidden, n_head=hidden // 128, vocab_size=250880)
    for name, (layers, hidden) in {"bloom-4b8": (30, 3328), "bloom-6b3": (30, 3840), "bloom-10b": (36, 4608),
                                   "bloom-14b": (40, 5120), "bloom-21b": (44, 6144)}.items()}


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    n_params: int              # unique parameters (tied embeddings once), as DeepSpeed's model_to_params counts
    largest_layer_params: int  # the largest single module's own parameters (DeepSpeed's ZeRO-3 input)
    n_layers: int
    hidden_size: int
    n_heads: int
    vocab_size: int
    attn_implementation: str   # "sdpa" or "eager": whether an s x s attention matrix is stored


def workshop_sdpa(model_type: str, attn_implementation: str | None) -> bool:
    """Whether --attn_implementation (None: unset) means the workshop's fused attention for this model: BLOOM's.

    transformers refuses 'sdpa' for BLOOM; the workshop loads it eager and replaces the attention's forward
    (``model.use_sdpa_for_bloom_attention``), the default as it is for GPT-2, whose library default is sdpa.
    """
    return model_type == "bloom" and attn_implementation in (None, "sdpa")


def known(name: str) -> dict | None:
    """The table's entry for a known name, with or without BLOOM's 'bigscience/' prefix."""
    return KNOWN_ARCHITECTURES.get(name) or KNOWN_ARCHITECTURES.get(f"bigscience/{name}")


def table_config(entry: dict, vocab_size: int | None = None, **overrides):
    """The transformers config of a table entry; ``vocab_size`` where the entry leaves it to the tokenizer."""
    from transformers import AutoConfig

    kwargs = dict(entry)
    model_type = kwargs.pop("model_type")
    if kwargs.get("vocab_size") is None:
        kwargs["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **kwargs, **overrides)


def config_for(name: str, vocab_size: int | None = None):
    """A transformers config for a known name, a local folder or config.json, or a cached hub name."""
    from transformers import AutoConfig

    entry = known(name)
    if entry is not None:
        if entry.get("vocab_size") is None:
            # The tiny presets take the built-in tokenizer's vocabulary; GPT-2's special token ids
            # would then lie outside it (irrelevant to memory, but transformers warns).
            return table_config(entry, vocab_size or len(builtin_data.build_tokenizer()), bos_token_id=None,
                                eos_token_id=None)
        return table_config(entry)
    path = Path(name)
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)  # the hub cache only: never the network
    except (OSError, ValueError):
        raise WorkshopError(f"--model {name}: not a known name ({', '.join(sorted(KNOWN_ARCHITECTURES))}), local "
                            "folder, config.json or cached hub model: give one of those, or run `workshop prefetch` "
                            "first") from None


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """Counts parameters on the meta device: no memory, a second or so even for BLOOM-7b1."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        model_type=config.model_type, n_params=n_params, largest_layer_params=largest,
        n_layers=config.num_hidden_layers, hidden_size=config.hidden_size, n_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        attn_implementation=("sdpa" if workshop_sdpa(config.model_type, None)
                             else model.config._attn_implementation or "eager"))  # what workshop train runs


def model_shape(name: str, vocab_size: int | None = None) -> ModelShape:
    """Shape of a model given by known name (gpt2*, bloom-*), local path, config.json or cached hub name."""
    config = config_for(name, vocab_size)
    if vocab_size:
        config.vocab_size = vocab_size
    return shape_from_config(config, name)
