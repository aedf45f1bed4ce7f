"""Shared test setup: Triton runs in its interpreter when there is no GPU (and on the GPU when there is one:
``device_for``); every test starts from a fixed seed on one intra-op thread."""

import gzip
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: pytest-xdist runs a worker per core, and contended OpenMP threads make
    small ops a hundred times slower. Restored after tests (the trainer sets its own thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device_for():
    """``device_for(impl) -> torch.device``: where a test of ``impl`` puts its tensors. Triton kernels run on
    the GPU when there is one (the interpreter is switched on only without CUDA); everything else on the CPU.
    """

    def device(impl: str) -> torch.device:
        return torch.device("cuda" if str(impl) == "triton" and torch.cuda.is_available() else "cpu")

    return device


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def deb_tags_slice(repo_root, tmp_path_factory):
    """``make(train_rows, test_rows) -> (train, test)``: the first rows of the embedded deb-tags BoW files,
    written with a matching header to a fresh folder."""
    data = os.path.join(repo_root, "data", "deb-tags")

    def write(source: str, target: str, rows: int) -> str:
        with gzip.open(source, "rt") as file:
            header = file.readline().split()
            lines = [file.readline() for _ in range(rows)]
        with open(target, "w") as file:
            file.write(f"{rows} {header[1]} {header[2]}\n")
            file.writelines(lines)
        return target

    def make(train_rows: int, test_rows: int) -> tuple[str, str]:
        folder = tmp_path_factory.mktemp("deb_tags_slice")
        return (
            write(os.path.join(data, "train_bow.txt.gz"), str(folder / "train.txt"), train_rows),
            write(os.path.join(data, "test_bow.txt.gz"), str(folder / "test.txt"), test_rows),
        )

    return make


FACE_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faces", "fixtures")


@pytest.fixture(scope="session")
def fixture_dir() -> str:
    """The InsightFace-format files (``train.rec``, ``train.idx``, ``property``, ``verify.bin``)."""
    return FACE_FIXTURES


@pytest.fixture(scope="session")
def fixture_rec() -> str:
    return os.path.join(FACE_FIXTURES, "train.rec")


@pytest.fixture(scope="session")
def fixture_bin() -> str:
    return os.path.join(FACE_FIXTURES, "verify.bin")


# A tiny offline BERT setup: a word-level vocabulary written to a folder, loaded as a fast tokenizer.
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
    # read from the folder: transformers 5 ignores a vocab_file given to the constructor (every word [UNK])
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
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


def _write_text_data(folder, *, n_train: int = 64, n_test: int = 24, classes: int = 6, seed: int = 0) -> None:
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


@pytest.fixture(scope="session")
def write_text_data():
    """``write(folder, *, n_train, n_test, classes, seed)``: a tiny text data set of topic words per label."""
    return _write_text_data


@pytest.fixture(scope="session")
def train_head():
    """``train(head, batches, start, lr=0.5) -> losses``: forward, backward and ``after_step`` over
    ``(features, targets)`` batches numbered from ``start``; the losses as floats."""

    def train(head, batches, start, lr=0.5):
        losses = []
        for step, (features, targets) in enumerate(batches, start=start):
            loss = head(features, targets)
            loss.backward()
            head.after_step(step, 0.0, lr=lr)
            losses.append(float(loss.detach()))
        return losses

    return train
