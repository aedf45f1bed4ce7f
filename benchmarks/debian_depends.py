"""Build a multi-label text set from a Debian package index: a package's descriptions -> what it depends on.

``apt-get -o Acquire::Languages=en update``, then
``python benchmarks/debian_depends.py --packages P --translations T --out deb-depends``
where ``P`` is ``apt-cache dumpavail``'s output and ``T`` a ``Translation-en`` file as text
(``/usr/lib/apt/apt-helper cat-file /var/lib/apt/lists/*_main_i18n_Translation-en.lz4``).

A document is a package's name, short and long description; its labels are the packages it names in
``Depends``, ``Pre-Depends`` and ``Recommends`` (the first of each group of alternatives, without versions or
architecture), those named by at least ``--min-count`` packages. Packages without such a label are left out.
Written as deb-tags' texts are (``l1,l2,...<TAB>text`` a line, label ids the rows of ``labels.txt.gz``),
split by a seeded shuffle into ``--test-fraction`` test documents and the rest for training.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import random
import re


def _stanzas(path: str) -> list[dict[str, str]]:
    """The ``Field: value`` stanzas of a Debian control file (continuation lines joined by newlines)."""
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and name is not None:
                fields[name] += "\n" + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def _depends(fields: dict[str, str]) -> list[str]:
    """The packages named in Depends, Pre-Depends and Recommends: each group's first alternative, bare
    names."""
    names = []
    for key in ("Depends", "Pre-Depends", "Recommends"):
        for group in fields.get(key, "").split(","):
            first = group.split("|")[0].strip()
            name = re.split(r"[\s(:\[<]", first, maxsplit=1)[0]
            if name:
                names.append(name)
    return sorted(set(names))


def _text(name: str, description: str) -> str:
    """The package's name and descriptions on one line (a long description's ``.`` lines dropped)."""
    lines = [line for line in description.splitlines() if line.strip() != "."]
    return " ".join([name, *lines]).replace("\t", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", required=True, help="apt-cache dumpavail's output")
    parser.add_argument("--translations", required=True, help="a Translation-en file, as text")
    parser.add_argument("--out", required=True, help="folder for train.txt.gz, test.txt.gz, labels.txt.gz")
    parser.add_argument("--min-count", type=int, default=5, help="labels named by fewer packages are dropped")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    descriptions = {}
    for fields in _stanzas(args.translations):
        descriptions.setdefault(fields["Package"], fields.get("Description-en", ""))
    packages: dict[str, list[str]] = {}
    for fields in _stanzas(args.packages):
        name = fields["Package"]
        if name in packages or name not in descriptions:
            continue
        packages[name] = [label for label in _depends(fields) if label != name]
    counts = collections.Counter(label for labels in packages.values() for label in labels)
    names = sorted(label for label, count in counts.items() if count >= args.min_count)
    ids = {label: i for i, label in enumerate(names)}
    documents = []
    for name in sorted(packages):
        labels = sorted(ids[label] for label in packages[name] if label in ids)
        if labels:
            documents.append((labels, _text(name, descriptions[name])))
    random.Random(args.seed).shuffle(documents)
    num_test = round(len(documents) * args.test_fraction)
    os.makedirs(args.out, exist_ok=True)
    for part, rows in (("test", documents[:num_test]), ("train", documents[num_test:])):
        with gzip.open(os.path.join(args.out, f"{part}.txt.gz"), "wt", encoding="utf-8") as file:
            for labels, text in rows:
                file.write(",".join(map(str, labels)) + "\t" + text + "\n")
    with gzip.open(os.path.join(args.out, "labels.txt.gz"), "wt", encoding="utf-8") as file:
        file.write("".join(name + "\n" for name in names))
    positives = sum(len(labels) for labels, _ in documents)
    print(
        f"{len(documents) - num_test:,} train / {num_test:,} test documents, {len(names):,} labels, "
        f"{positives / len(documents):.1f} labels a document"
    )


if __name__ == "__main__":
    main()
