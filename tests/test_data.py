import json

import pytest

from workshop import builtin_data, data_loader
from workshop.config import DataArguments
from workshop.data_loader import IGNORE_INDEX, Collator, prompt_text, tokenize_qa, tokenize_text
from workshop.errors import WorkshopError

RECORD = {"id": "q1", "question": "Where is the tower?", "context": "The tower is in Paris.",
          "answers": {"text": ["Paris"], "answer_start": [16]}}


def test_prompt_format():
    assert prompt_text(RECORD) == "Question: Where is the tower? Context: The tower is in Paris. Answer:"


def test_answer_only_labels_mask_the_prompt(tokenizer):
    (sample,), dropped = tokenize_qa([RECORD], tokenizer, 128, loss_on="answer")
    prompt = tokenizer(prompt_text(RECORD), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert dropped == 0
    assert sample["input_ids"] == prompt + answer
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_sequence_labels_cover_every_token(tokenizer):
    (sample,), _ = tokenize_qa([RECORD], tokenizer, 128, loss_on="sequence")
    assert sample["labels"] == sample["input_ids"]


def test_too_long_samples_are_dropped_and_counted_never_cut(tokenizer):
    samples, dropped = tokenize_qa([RECORD], tokenizer, 5, loss_on="answer")
    assert samples == [] and dropped == 1


def test_collator_masks_padding_in_labels_and_attention():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_pads_to_fixed_length_or_multiple():
    sample = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    assert Collator(0, pad_to_length=10)([sample])["input_ids"].shape == (1, 10)
    assert Collator(0, pad_to_multiple_of=8)([sample])["input_ids"].shape == (1, 8)


def test_a_runs_collator_follows_its_padding_flags(monkeypatch):
    from workshop.config import DataArguments

    def length(longest, **flags):
        return Collator.for_run(DataArguments(**flags), pad_token_id=0).padded_length(longest)

    assert length(426) == 426                                  # on a CPU, no multiple unless asked
    assert length(426, pad_to_multiple_of=64) == 448
    assert length(426, pad_to_max_length=True, max_seq_length=500) == 500
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert length(426) == 432                                  # on a GPU, tensor-core shapes by default
    assert length(433) == 440                                  # (432 is a multiple of 9 too)
    assert Collator.for_run(DataArguments(), pad_token_id=7).pad_token_id == 7
    assert length(426, pad_to_multiple_of=1) == 426


def test_text_is_concatenated_into_full_blocks(tokenizer):
    lines = builtin_data.text_lines(20)
    ids = [t for line in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in line]
    blocks = tokenize_text(lines, tokenizer, block_size=64)
    assert len(blocks) == len(ids) // 64
    assert [t for b in blocks for t in b["input_ids"]] == ids[:len(blocks) * 64]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    # every position but the last predicts the next token of its block: 63 logits per sample
    assert data_loader._length_stats(blocks)["targets_max"] == 63


def test_builtin_data_is_deterministic_and_answers_are_spans():
    assert builtin_data.squad_records(50, seed=3) == builtin_data.squad_records(50, seed=3)
    assert builtin_data.squad_records(5, seed=3) != builtin_data.squad_records(5, seed=4)
    for r in builtin_data.squad_records(200, context_sentences=builtin_data.SQUAD_LIKE_SENTENCES):
        start, text = r["answers"]["answer_start"][0], r["answers"]["text"][0]
        assert r["context"][start:start + len(text)] == text
    assert builtin_data.text_lines(10) == builtin_data.text_lines(10)


def test_builtin_tokenizer_is_deterministic():
    assert builtin_data.build_tokenizer().get_vocab() == builtin_data.build_tokenizer().get_vocab()


def test_local_squad_files_in_every_layout(tmp_path):
    flat = tmp_path / "flat.jsonl"
    flat.write_text("\n".join(json.dumps(r) for r in [RECORD, dict(RECORD, id="q2")]))
    official = tmp_path / "official.json"
    official.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": RECORD["context"], "qas": [
        {"id": "q1", "question": RECORD["question"], "answers": [{"text": "Paris", "answer_start": 16}]}]}]}]}))
    assert data_loader.read_squad_file(str(flat))[0] == RECORD
    assert data_loader.read_squad_file(str(official)) == [RECORD]


def test_local_files_through_prepare(tmp_path, tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(dict(r, id=str(i))) for i, r in
                               enumerate(builtin_data.squad_records(30))))
    prepared = data_loader.prepare(DataArguments(train_file=str(train), max_seq_length=256), tokenizer, seed=0)
    assert prepared.task == "qa" and len(prepared.train) == 27 and len(prepared.eval) == 3
    text = tmp_path / "train.txt"
    text.write_text("\n".join(builtin_data.text_lines(50)))
    prepared = data_loader.prepare(DataArguments(train_file=str(text), max_seq_length=32), tokenizer, seed=0)
    assert prepared.task == "text" and all(len(s["input_ids"]) == 32 for s in prepared.train)
    assert prepared.stats["dropped_too_long"] == 0  # text is cut into blocks: nothing is too long


def test_hub_loading_code_on_a_local_dataset_folder(tmp_path):
    """The same datasets.load_dataset call that reads rajpurkar/squad, pointed at a local folder."""
    for split, seed in (("train", 0), ("validation", 1)):
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in builtin_data.squad_records(10, seed=seed)))
    train, validation = data_loader.squad_from_hub(str(tmp_path))
    assert [r["question"] for r in train] == [r["question"] for r in builtin_data.squad_records(10, seed=0)]
    assert train[0]["answers"] == builtin_data.squad_records(1, seed=0)[0]["answers"]
    assert len(validation) == 10


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"question": "q", "context": "c"}\n', "lacks answers"),
    ("bad.jsonl", json.dumps(RECORD) + '\n{"question": "q"}\n',
     r"^record 2 of .*bad\.jsonl lacks context, answers: SQuAD format needs question, context and answers "
     r"\{text: \[\.\.\.\], answer_start: \[\.\.\.\]\}$"),
    ("bad.jsonl", '{"question": "q", "context": "c", "answers": {"text": [], "answer_start": []}}\n',
     r"^record 1 of .*bad\.jsonl has no answer text: every question needs at least one answer$"),
    ("bad.jsonl", '{"question": \n', "line 1 is not valid JSON"),
    ("bad.json", '[{"question": "q",]', r"bad\.json is not valid JSON \(.* at line 1\): fix the file$"),
    ("bad.json", '{"version": "1.1"}', r"expected a list of SQuAD records or the official \{'data': \[...\]\} layout"),
    ("bad.jsonl", b'{"question": "caf\xe9"}\n', r"bad\.jsonl is not UTF-8 text: convert it or give another file$"),
    ("bad.txt", b"caf\xe9\n", r"bad\.txt is not UTF-8 text: convert it or give another file$"),
])
def test_malformed_local_files_name_the_problem(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())  # b"\xe9": Latin-1's é
    reader = data_loader.read_text_file if name.endswith(".txt") else data_loader.read_squad_file
    with pytest.raises(WorkshopError, match=message):
        reader(str(bad))


@pytest.mark.parametrize("files, max_seq_length, message", [
    # one record: the validation split takes it and leaves training nothing, though nothing was too long
    ({"train.jsonl": json.dumps(RECORD)}, 128,
     "no samples left after tokenisation (--max_train_samples / the training data): give a data set with samples in it"),
    # validation text shorter than one block of --max_seq_length 32
    ({"train.txt": "\n".join(builtin_data.text_lines(20)), "val.txt": "a few words"}, 32,
     "no samples left after tokenisation (--max_eval_samples / the validation data): raise --max_seq_length or use "
     "more data"),
])
def test_no_samples_left_names_the_split_and_the_fix(tmp_path, tokenizer, files, max_seq_length, message):
    paths = []
    for name, text in files.items():
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(text)
    args = DataArguments(train_file=paths[0], validation_file=(paths[1:] or [None])[0],
                         max_seq_length=max_seq_length)
    with pytest.raises(WorkshopError) as error:
        data_loader.prepare(args, tokenizer, seed=0)
    assert str(error.value) == message


def test_wikitext_loading_code_on_a_local_dataset_folder(tmp_path, tokenizer):
    """The datasets.load_dataset call that reads WikiText-2, pointed at a local folder of text files."""
    for split, seed in (("train", 0), ("validation", 1)):
        (tmp_path / f"{split}.txt").write_text("\n".join(builtin_data.text_lines(30, seed=seed)))
    train, validation = data_loader.wikitext_from_hub(str(tmp_path), None)
    assert train[:30] == builtin_data.text_lines(30, seed=0)[:30] and len(validation) == 30
    blocks = tokenize_text(train, tokenizer, 64)
    assert blocks and all(len(b["input_ids"]) == 64 for b in blocks)


def test_prepare_masks_the_prompt_of_every_sample_it_returns(tokenizer):
    """The run's data as prepare() returns it, against each record tokenised here by hand: with --loss_on answer
    the prompt's labels are -100 and the answer's (with EOS) are its tokens, in training and in evaluation; with
    --loss_on sequence every token is a target. (Tried: prepare() not passing loss_on on, which put the prompt
    in the loss of every run, passed the tests of tokenize_qa alone.)"""
    args = dict(dataset_name="builtin", max_train_samples=20, max_eval_samples=6, answer_eval_samples=0,
                max_seq_length=256)
    prepared = data_loader.prepare(DataArguments(loss_on="answer", **args), tokenizer, seed=5)
    train_raw = builtin_data.squad_records(20, seed=5)
    eval_raw = builtin_data.squad_records(6, seed=6)  # validation: other people than training's
    for samples, records in ((prepared.train, train_raw), (prepared.eval, eval_raw)):
        assert sorted(s["input_ids"] for s in samples) == sorted(
            tokenizer(prompt_text(r), add_special_tokens=False)["input_ids"]
            + tokenizer(" " + r["answers"]["text"][0], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for r in records)
        for s in samples:
            n_answer = next(i for i, label in enumerate(reversed(s["labels"])) if label == IGNORE_INDEX)
            assert s["labels"] == [IGNORE_INDEX] * (len(s["input_ids"]) - n_answer) + s["input_ids"][-n_answer:]
            assert s["labels"][-1] == tokenizer.eos_token_id and n_answer >= 2
    sequence = data_loader.prepare(DataArguments(loss_on="sequence", **args), tokenizer, seed=5)
    assert all(s["labels"] == s["input_ids"] for s in sequence.train + sequence.eval)
    assert [s["input_ids"] for s in sequence.train] == [s["input_ids"] for s in prepared.train]


def test_prepare_is_a_function_of_the_seed_and_counts_what_it_drops(tokenizer, tmp_path, caplog):
    records = builtin_data.squad_records(40, seed=0)
    lengths = [len(tokenizer(prompt_text(r) + " " + r["answers"]["text"][0], add_special_tokens=False)["input_ids"])
               + 1 for r in records]
    limit = sorted(lengths)[len(lengths) // 2]  # about half of the samples are longer and dropped
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(dict(r, id=str(i))) for i, r in enumerate(records)))
    args = DataArguments(train_file=str(train), max_train_samples=30, max_eval_samples=40, answer_eval_samples=0,
                         max_seq_length=limit)
    first, again, other = (data_loader.prepare(args, tokenizer, seed=s) for s in (1, 1, 2))
    assert caplog.messages[0] == (f"dropped {first.stats['dropped_too_long']} samples longer than --max_seq_length "
                                  f"{limit} (raise it to keep them)")
    assert first.train == again.train and first.eval == again.eval
    assert first.train != other.train
    # by hand: the 10 % held out (4 records), then 30 of the 36 others drawn, then the long ones dropped
    kept = [s for s in first.train + first.eval]
    assert first.stats["dropped_too_long"] == 30 + 4 - len(kept) > 0
    assert all(len(s["input_ids"]) <= limit for s in kept)
    held_out = data_loader._split(records, 1)[1]
    assert len(held_out) == 4 and len(data_loader._split(records[:5], 1)[1]) == 1  # at least one, else 10 %
    lengths = [len(s["input_ids"]) for s in first.train]
    # the loss is on the answer: every label of the prompt, the first token included, is ignored
    answers = [len(s["input_ids"]) - s["labels"].count(-100) for s in first.train]
    assert {k: first.stats[k] for k in ("length_mean", "length_max", "length_min", "train_samples", "eval_samples",
                                        "targets_max", "train_tokens")} \
        == {"length_mean": sum(lengths) / len(lengths), "length_max": max(lengths), "length_min": min(lengths),
            "train_samples": len(first.train), "eval_samples": len(first.eval), "targets_max": max(answers),
            "train_tokens": sum(lengths)}
    assert 0 < max(answers) < min(lengths)


def test_answer_evaluation_keeps_only_prompts_shorter_than_the_limit(tokenizer):
    """Generation appends tokens to the prompt: a prompt of exactly --max_seq_length tokens has no room left."""
    records = builtin_data.squad_records(8, seed=1)
    prompt_lengths = [len(tokenizer(prompt_text(r), add_special_tokens=False)["input_ids"]) for r in records]
    limit = max(prompt_lengths)  # the longest prompt is exactly as long as allowed: left out
    prepared = data_loader.prepare(DataArguments(dataset_name="builtin", max_train_samples=40, max_eval_samples=8,
                                                 answer_eval_samples=8, max_seq_length=limit), tokenizer, seed=0)
    assert prepared.answer_eval == [r for r, n in zip(records, prompt_lengths) if n < limit]
    assert 0 < len(prepared.answer_eval) < len(records)
    prepared = data_loader.prepare(DataArguments(dataset_name="builtin", max_train_samples=4, max_eval_samples=1,
                                                 answer_eval_samples=8, max_seq_length=limit + 1), tokenizer, seed=0)
    assert prepared.answer_eval == records


def test_a_sample_as_long_as_the_limit_is_kept_and_a_long_one_does_not_stop_the_rest(tokenizer):
    records = builtin_data.squad_records(12, seed=2)
    lengths = [len(tokenizer(prompt_text(r), add_special_tokens=False)["input_ids"])
               + len(tokenizer(" " + r["answers"]["text"][0], add_special_tokens=False)["input_ids"]) + 1
               for r in records]
    limit = sorted(lengths)[len(lengths) // 2]
    assert any(n > limit for n in lengths[:lengths.index(min(lengths))])  # a long one before a short one
    samples, dropped = tokenize_qa(records, tokenizer, limit, loss_on="sequence")
    assert [len(s["input_ids"]) for s in samples] == [n for n in lengths if n <= limit]  # in order, = limit kept
    assert dropped == sum(n > limit for n in lengths) >= 2
    assert tokenize_qa([], tokenizer, limit, loss_on="answer") == ([], 0)


def test_text_blocks_at_the_edges_of_a_whole_block(tokenizer):
    """A last block one token short is dropped; a text of exactly k blocks keeps all k (block 16)."""
    lines = builtin_data.text_lines(200)
    totals = [0]
    for line_ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        totals.append(totals[-1] + len(line_ids))
    for residue in (15, 0):  # the first text (a prefix of the lines) whose token count leaves this residue
        k = next(k for k in range(2, len(totals)) if totals[k] % 16 == residue)
        assert len(tokenize_text(lines[:k], tokenizer, block_size=16)) == totals[k] // 16, residue


def test_a_validation_file_is_read_as_given_and_both_files_must_hold_samples_of_one_kind(tmp_path):
    train, same, text, empty = (tmp_path / n for n in ("train.jsonl", "val.jsonl", "val.txt", "empty.jsonl"))
    train.write_text(json.dumps(RECORD))
    same.write_text("\n".join(json.dumps(dict(RECORD, id=i)) for i in ("v1", "v2")))
    text.write_text("a line of text\n")
    empty.write_text("\n")

    def raw(train_file, validation_file):
        return data_loader.load_raw(DataArguments(train_file=str(train_file), validation_file=str(validation_file)), 0)

    assert raw(train, same) == ("qa", [RECORD], [dict(RECORD, id="v1"), dict(RECORD, id="v2")])  # no split
    with pytest.raises(WorkshopError, match=r"^--validation_file must be the same kind \(QA .json/.jsonl or .txt\) "
                                            "as --train_file$"):
        raw(train, text)
    with pytest.raises(WorkshopError, match="^--validation_file must be the same kind"):
        raw(text, same)
    assert raw(text, text) == ("text", ["a line of text"], ["a line of text"])
    with pytest.raises(WorkshopError, match=f"^--validation_file {empty} holds no samples: give a file with data in "
                                            "it$"):
        raw(train, empty)
    with pytest.raises(WorkshopError, match=f"^--train_file {empty} holds no samples: give a file with data in it$"):
        raw(empty, same)


def test_builtin_text_trains_and_validates_on_paragraphs_of_other_seeds():
    task, train, evaluation = data_loader.load_raw(DataArguments(dataset_name="builtin_text"), seed=3)
    assert task == "text"
    assert train == builtin_data.text_lines(2000, seed=3)
    assert evaluation == builtin_data.text_lines(200, seed=4)  # like builtin's: other paragraphs than training's


def test_hub_data_sets_are_asked_for_by_their_ids_and_wikitext_by_its_configuration(monkeypatch):
    """The hub's answers faked: which repository and configuration each --dataset_name asks for."""
    asked = []

    def load_dataset(path, name=None):
        asked.append((path, name))
        if path == "rajpurkar/squad":
            return {"train": [RECORD], "validation": [dict(RECORD, id="v")]}
        return {"train": {"text": ["t1", "t2"]}, "validation": {"text": ["v1"]}}

    monkeypatch.setattr("datasets.load_dataset", load_dataset)

    def raw(**flags):
        return data_loader.load_raw(DataArguments(**flags), seed=0)

    assert raw(dataset_name="squad") == ("qa", [RECORD], [dict(RECORD, id="v")])
    assert raw(dataset_name="wikitext") == ("text", ["t1", "t2"], ["v1"])
    assert raw(dataset_name="wikitext", dataset_config_name="wikitext-103-raw-v1") == ("text", ["t1", "t2"], ["v1"])
    assert asked == [("rajpurkar/squad", None), ("Salesforce/wikitext", "wikitext-2-raw-v1"),
                     ("Salesforce/wikitext", "wikitext-103-raw-v1")]
    with pytest.raises(WorkshopError, match="^--dataset_name imagenet is not known$"):
        raw(dataset_name="imagenet")  # workshop train refuses it earlier, in config.validate


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_data_set_that_does_not_load_names_the_prefetch_command(monkeypatch, offline):
    """Online, the error's first line (cut at 160 characters) is quoted; offline, the cache is named instead."""
    import datasets

    def load_dataset(path, name=None):
        raise ConnectionError("x" * 200 + "\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    fetch = ("run `workshop prefetch --model_name_or_path none --dataset_name wikitext --dataset_config_name "
             "wikitext-103-raw-v1` on a login node with internet, or use --train_file with local data")
    expected = ("--dataset_name wikitext is not in the local cache and the hub is offline: " if offline else
                f"--dataset_name wikitext: could not load Salesforce/wikitext ({'x' * 160}): ") + fetch
    with pytest.raises(WorkshopError) as error:
        data_loader.load_hub_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert str(error.value) == expected
