"""A tiny offline BERT setup: a word-level vocabulary written to a folder, loaded as a fast tokenizer."""

import os

import pytest

WORDS = (
    "ruby python perl lib library client server http data file files tool tools web mail font fonts "
    "game games audio video image x11 gnome kde dev development documentation doc shell editor text "
    "network database sql test plugin plugins module modules kernel driver system utility utilities "
    "for and the of to a in with package packages support"
).split()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A folder holding ``vocab.txt`` and a saved ``BertTokenizerFast`` (lower case, 80-odd tokens)."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *"abcdefghijklmnopqrstuvwxyz-",
        *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
    ]
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as file:
        file.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_options(tiny_tokenizer_dir) -> dict:
    """``model`` section of a random 2-layer BERT of width 32 over the tiny vocabulary."""
    return {
        "type": "transformer",
        "pretrained": "none",
        "tokenizer": tiny_tokenizer_dir,
        "config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "max_length": 24,
        "dropout": 0.0,
    }


def write_text_data(folder, *, n_train: int = 64, n_test: int = 24, classes: int = 6, seed: int = 0) -> None:
    """``train.txt``, ``test.txt`` (``labels<TAB>text``, topic words per label), ``labels.txt``."""
    import random

    rng = random.Random(seed)
    topics = [WORDS[i * 8 : (i + 1) * 8] for i in range(classes)]

    def document() -> str:
        labels = sorted(rng.sample(range(classes), rng.choice([1, 2])))
        words = [rng.choice(topics[label]) for label in labels for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        return ",".join(map(str, labels)) + "\t" + " ".join(words)

    os.makedirs(folder, exist_ok=True)
    for name, count in (("train.txt", n_train), ("test.txt", n_test)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
            file.write("\n".join(document() for _ in range(count)) + "\n")
    with open(os.path.join(folder, "labels.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(" ".join(topic[:2]) for topic in topics) + "\n")
