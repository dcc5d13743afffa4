"""The hub's data sets behind --dataset_name, and the ``workshop prefetch`` command line that caches a run's needs.

A model or data set missing from the cache stops a run with the command that fetches exactly it
(``model.load_tokenizer``, ``data_loader.load_hub_dataset``); ``workshop prefetch`` is that command.

    hub.model_command(model_args)        # workshop prefetch --model_name_or_path gpt2-xl --from_config
    hub.dataset_command("wikitext")      # workshop prefetch --model_name_or_path none --dataset_name wikitext
"""

from __future__ import annotations

SQUAD_HUB_ID = "rajpurkar/squad"
WIKITEXT_HUB_ID = ("Salesforce/wikitext", "wikitext-2-raw-v1")
# Hub data sets behind --dataset_name: (repository, configuration). The built-in ones need nothing.
DATASET_SOURCES = {"squad": (SQUAD_HUB_ID, None), "wikitext": WIKITEXT_HUB_ID}


def dataset_name(path: str) -> str:
    """The --dataset_name of a hub repository (the repository itself where it is none of the workshop's)."""
    return next((name for name, (repo, _) in DATASET_SOURCES.items() if repo == path), path)


def command(model: str = "none", tokenizer: str | None = None, from_config: bool = False,
            dataset: str | None = None, dataset_config: str | None = None) -> str:
    """The prefetch command line that fetches exactly this (error messages elsewhere quote it)."""
    parts = ["workshop prefetch", "--model_name_or_path", model]
    if tokenizer and tokenizer != model:
        parts += ["--tokenizer_name_or_path", tokenizer]
    if from_config:
        parts.append("--from_config")
    if dataset:
        parts += ["--dataset_name", dataset]
        if dataset_config and dataset_config != DATASET_SOURCES.get(dataset, (None, None))[1]:
            parts += ["--dataset_config_name", dataset_config]
    return " ".join(parts)


def model_command(model_args) -> str:
    """The prefetch command for a job's model flags (the data set left at prefetch's default)."""
    return command(model_args.model_name_or_path, model_args.tokenizer_name_or_path, model_args.from_config)


def dataset_command(dataset: str, dataset_config: str | None = None) -> str:
    """The prefetch command for a job's data set alone (its model is already cached by then)."""
    return command("none", dataset=dataset, dataset_config=dataset_config)
