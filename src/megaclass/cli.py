"""The ``megaclass`` command: ``train``, ``eval``, ``predict`` (and more, added one entry at a time).

``megaclass train --train data/deb-tags/train_bow.txt.gz --test data/deb-tags/test_bow.txt.gz --out runs/x``

Each command is a pair ``_add_<command>_arguments(parser)`` / ``_run_<command>(args) -> exit code`` and one
line in :data:`COMMANDS`. The CLI only builds configs and calls :mod:`megaclass.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
import zlib
from collections.abc import Callable
from typing import Any

from megaclass import __version__
from megaclass.errors import DataFormatError, RunDoesNotFit, TrainingDiverged, one_line
from megaclass.schema import ConfigError

__all__ = ["COMMANDS", "build_parser", "main", "run"]


# ---------------------------------------------------------------------------------------------------- train


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train", metavar="PATH", help="training data (format detected); with --resume, default: the run's"
    )
    parser.add_argument(
        "--test",
        metavar="PATH",
        help="test data, scored at the end with the kept weights (without it the validation rows score the "
        "run); with --resume, default: the run's",
    )
    parser.add_argument(
        "--valid",
        metavar="PATH",
        help="validation data that picks the epoch kept and stops early (default: train.valid_fraction of "
        "--train's rows, held out)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder to write")
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="run config (sections data, model, head, optim, ...)"
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a shipped recipe (before --config); without --preset or --config a recipe is "
        "chosen from the data and the head and encoder types",
    )
    parser.add_argument("--head", metavar="NAME", help="head type, e.g. dense (replaces the config's head)")
    parser.add_argument("--epochs", type=int, metavar="N", help="number of epochs (train.epochs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, applied last, e.g. --set optim.head.lr=0.01 model.hidden=[512]",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest whole checkpoint, on the data files and settings it "
        "recorded where none are given (with other learning rates or schedule, train.grad_clip, "
        "train.epochs, train.patience, eval.* settings or --test if given)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that --out holds (without it or --resume such a folder is refused)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train on N processes of this host through torchrun (multi-node: torchrun -m megaclass train)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan of this run (GPU and host, by part, and the disk its --out folder "
        "takes; with --nproc-per-node, of its rank 0, no process started) and exit without writing anything; "
        f"exit code {_DOES_NOT_FIT} when it does not fit",
    )
    parser.add_argument(
        "--no-fit-check",
        action="store_true",
        help=f"start the run where its memory plan does not fit (else refused: exit code {_DOES_NOT_FIT}; a "
        "resume is not checked)",
    )
    _add_capacity_arguments(parser)


_DOES_NOT_FIT = 3  # the exit code of a plan that does not fit
_ALLOCATOR_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the names PyTorch reads them from


def _add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GiB",
        help="plan for a GPU of this many GiB (default: this machine's GPU; implies a GPU run)",
    )
    parser.add_argument(
        "--host-memory", type=float, metavar="GiB", help="plan for this much host memory (default: available)"
    )


def _print_plan(command: str, recipe: str, plan: Any) -> int:
    """Print a run's recipe line and memory plan (:func:`_plan`); 0 when it fits, else one line on stderr
    naming the part that does not fit and :data:`_DOES_NOT_FIT`."""
    print(recipe)
    print(plan.format())
    refusal = plan.refusal()
    if refusal is None:
        return 0
    print(f"megaclass {command}: error: {refusal}", file=sys.stderr)
    return _DOES_NOT_FIT


def _plan(
    args: argparse.Namespace,
    config: Any,
    explicit_keys: frozenset[str] | None,
    other_paths: tuple[str, ...],
    *,
    disk: bool = True,
) -> tuple[str, Any]:
    """The recipe line and the :class:`~megaclass.train.plan.MemoryPlan` of the run ``args`` describe (with
    ``--resume``, the run's with the settings it recorded; with ``disk``, the free disk where ``train --out``
    goes too)."""
    from megaclass.distributed.info import DistInfo
    from megaclass.train.loop import read_recorded_config, read_run_facts, resolve_run_recipe, resume_settings
    from megaclass.train.plan import plan_for

    world_size = DistInfo.from_env().world_size if args.nproc_per_node is None else args.nproc_per_node
    if world_size < 1:
        raise ValueError(f"--nproc-per-node: expected >= 1, got {world_size}")
    # the processes on this host: all of --nproc-per-node's, torchrun's local ones
    on_host = args.nproc_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    recorded = read_recorded_config(args.out) if getattr(args, "resume", False) else None
    if recorded is not None and explicit_keys is not None:  # as the trainer resumes it
        config, explicit_keys, _ = resume_settings(recorded, read_run_facts(args.out), config, explicit_keys)
    recipe = [""]

    def resolve(config: Any, facts: Any) -> Any:
        config, recipe[0] = resolve_run_recipe(config, explicit_keys, facts, recorded)
        return config

    plan = plan_for(
        config,
        args.train,
        other_paths=other_paths,
        resolve=resolve,
        gpu_memory=args.gpu_memory,
        host_memory=args.host_memory,
        out_dir=getattr(args, "out", None) if disk else None,  # train: the disk of the run folder too
        world_size=world_size,
        host_processes=on_host,
    )
    return recipe[0], plan


def _forward_to_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``torchrun --nproc-per-node nproc -m megaclass train <argv>`` and return its exit code."""
    import subprocess

    if nproc < 1:
        raise ValueError(f"--nproc-per-node: expected >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*command, "-m", "megaclass", "train", *argv])


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            out.append(item)
    return out


def _recorded_data_files(args: argparse.Namespace) -> None:
    """Give a ``--resume`` the files its run recorded in ``run.json`` where it names none: ``--train``, and
    ``--test`` and ``--valid`` where the run had them; without ``--resume`` only ``--train`` is required."""
    if not args.resume:
        if args.train is None:
            raise ValueError("--train required (a --resume takes the files its run recorded)")
        return
    if args.train is not None and args.test is not None:
        return
    from megaclass.train.loop import resume_data_files

    wanted = " and ".join(f"--{flag}" for flag in ("train", "test") if getattr(args, flag) is None)
    path = os.path.join(args.out, "run.json")
    if not os.path.exists(path):
        if args.train is None:
            raise ValueError(f"--resume: {args.out} holds no run.json to take --train from; pass it")
        return  # nothing recorded: the resume runs on the files given
    try:
        files = resume_data_files(args.out, args.train, args.test, args.valid)
    except DataFormatError as error:
        raise DataFormatError(path, f"{error.problem}; pass {wanted}") from None
    taken = []
    for flag, recorded in files.items():
        if getattr(args, flag) is not None or recorded is None:
            continue
        if not os.path.exists(recorded):
            raise ValueError(
                f"--resume: --{flag} {recorded}, as {path} records it, does not exist here (the run was "
                f"started from another folder?); pass --{flag}"
            )
        setattr(args, flag, recorded)
        taken.append(f"--{flag} {recorded}")
    if args.train is None:
        raise ValueError(f"--resume: {path} records no --train; pass it")
    from megaclass.distributed.info import DistInfo

    if taken and DistInfo.from_env().is_main:
        print(f"--resume: {', '.join(taken)} (as {path} records them)")


def _run_train(args: argparse.Namespace) -> int:
    from megaclass.distributed.info import DistInfo
    from megaclass.state_io import format_bytes
    from megaclass.train.config import load_config_and_keys
    from megaclass.train.loop import train

    _recorded_data_files(args)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.insert(0, f"train.epochs={args.epochs}")
    config, explicit_keys = load_config_and_keys(args.config, overrides, preset=args.preset, head=args.head)
    plan_args = (
        config,
        None if args.preset else explicit_keys,
        tuple(path for path in (args.test, args.valid) if path is not None),
    )
    if args.dry_run:
        return _print_plan(args.command, *_plan(args, *plan_args))
    if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        # the ranks do not check the plan (they could disagree on the host's free memory): checked here
        if not (args.resume or args.no_fit_check):
            refusal = _plan(args, *plan_args, disk=False)[1].refusal()  # the disk: as the trainer's check
            if refusal is not None:
                raise RunDoesNotFit(refusal)
        return _forward_to_torchrun(args.nproc_per_node, _without_nproc(args.argv))
    metrics = train(
        config,
        train_path=args.train,
        test_path=args.test,
        valid_path=args.valid,
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        explicit_keys=None if args.preset else explicit_keys,  # a preset is a whole recipe
        check_fit=not args.no_fit_check,
    )
    if not DistInfo.from_env().is_main:
        return 0
    if not metrics:
        print(f"run stopped early; continue it with: megaclass train --resume --out {args.out}")
        return 0
    print(  # the scores are on the trainer's "test (epoch N)" line above
        f"train time {metrics['train_seconds']:.1f} s  "
        f"peak memory {format_bytes(metrics['peak_memory_bytes'])}  run folder {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------- plan


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train", required=True, metavar="PATH", help="training data (BoW, text, LF JSON or face images)"
    )
    parser.add_argument("--test", metavar="PATH", help="test data, held in memory too")
    parser.add_argument("--valid", metavar="PATH", help="validation data, held in memory too")
    parser.add_argument("--config", metavar="FILE.yaml", help="run config, as for train")
    parser.add_argument("--preset", metavar="NAME", help="start from a shipped recipe, as for train")
    parser.add_argument("--head", metavar="NAME", help="head type, as for train")
    parser.add_argument("--epochs", type=int, metavar="N", help="number of epochs (train.epochs)")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides, as for train",
    )  # fmt: skip
    parser.add_argument(
        "--nproc-per-node", type=int, metavar="N", help="plan rank 0 of a run on N processes, as for train"
    )
    _add_capacity_arguments(parser)


def _run_plan(args: argparse.Namespace) -> int:
    from megaclass.train.config import load_config_and_keys

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.insert(0, f"train.epochs={args.epochs}")
    config, explicit_keys = load_config_and_keys(args.config, overrides, preset=args.preset, head=args.head)
    others = tuple(path for path in (args.test, args.valid) if path is not None)
    return _print_plan(args.command, *_plan(args, config, None if args.preset else explicit_keys, others))


# ----------------------------------------------------------------------------------------------------- eval


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a folder written by `megaclass train`")
    parser.add_argument("--test", required=True, metavar="PATH", help="data to evaluate on")
    parser.add_argument("--device", metavar="NAME", help="cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="also write the metrics here (they go to stdout anyway: - adds nothing)",
    )
    parser.add_argument(
        "--filter",
        metavar="FILE",
        help="'doc_id label_id' pairs of --test left out of scoring (filter_labels_test.txt of the XMC "
        "repository; default: the run's eval.filter_labels)",
    )


def _run_eval(args: argparse.Namespace) -> int:
    from megaclass.train.inference import evaluate_run, open_output

    metrics = evaluate_run(args.run, args.test, device=args.device, filter_labels=args.filter)
    text = json.dumps(metrics, indent=1)
    if args.out and args.out != "-":  # (stdout gets them anyway)
        with open_output(args.out) as file:
            file.write(text + "\n")
    print(text)
    return 0


# -------------------------------------------------------------------------------------------------- predict


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", dest="run_dir", required=True, metavar="DIR", help="a folder written by `megaclass train`"
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help="rows to score, in the training format, labels optional (BoW: header optional, ' f:v ...' "
        "lines; text: bare documents, one a line), or - (stdin)",
    )
    parser.add_argument(
        "--out",
        default="-",
        metavar="FILE",
        help="one line per row: id:score ..., best first (default -: stdout)",
    )
    parser.add_argument("--k", type=int, default=10, help="labels per row (default 10)")
    parser.add_argument("--device", metavar="NAME", help="cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument(
        "--names",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="write label names, name:score pairs separated by tabs: from FILE (one name a line, or the "
        "repository's lbl.json), else the run's own (its training file's lines named them), else from the "
        "labels.txt or lbl.json beside the run's training file",
    )


def _run_predict(args: argparse.Namespace) -> int:
    from megaclass.train.inference import predict_run

    rows, k = predict_run(args.run_dir, args.input, args.out, k=args.k, device=args.device, names=args.names)
    stream = sys.stderr if args.out == "-" else sys.stdout  # stdout may carry the predictions themselves
    every = f" (all the run's {k} classes)" if k < args.k else ""
    where = "stdout" if args.out == "-" else args.out
    print(f"wrote top-{k} labels{every} of {rows} rows to {where}", file=stream)
    return 0


# ---------------------------------------------------------------------------------------- extract, verify


class _ProgressBar:
    """A tqdm bar fed by ``progress(count, total)`` callbacks, shown from the first (the total is known only
    once work starts; a command refused before then prints its error alone)."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.bar: Any = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, count: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, dynamic_ncols=True, leave=False, disable=None)
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(count)


def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", dest="run_dir", required=True, metavar="DIR", help="a folder written by `megaclass train`"
    )
    parser.add_argument("--data", required=True, metavar="PATH", help=".bin set, .rec, image folder or list")
    parser.add_argument("--out", required=True, metavar="FILE.npy", help="(N, D) float32, in file order")
    parser.add_argument("--flip", action="store_true", help="flip fusion: add the mirrored image's embedding")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass")
    parser.add_argument("--device", default="auto", metavar="NAME", help="auto, cpu, cuda or cuda:N")


def _run_extract(args: argparse.Namespace) -> int:
    from megaclass.train.extract import extract

    with _ProgressBar("img") as bar:
        embeddings = extract(
            args.run_dir,
            args.data,
            args.out,
            flip=args.flip,
            batch_size=args.batch_size,
            device=args.device,
            progress=bar,
        )
    print(f"wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.out}")
    return 0


def _add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="FILE.bin", help="pair set (lfw.bin, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="FILE.npy", help="embeddings written by `megaclass extract`")
    source.add_argument("--run", dest="run_dir", metavar="DIR", help="embed the images with this run's model")
    parser.add_argument("--flip", action="store_true", help="with --run: flip fusion")
    parser.add_argument("--folds", type=int, default=10, metavar="K", help="k-fold protocol (default 10)")
    parser.add_argument("--far", type=float, default=1e-3, metavar="RATE", help="TAR@FAR's FAR (1e-3)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON here (- for stdout)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="--run: images per pass")
    parser.add_argument("--device", default="auto", metavar="NAME", help="--run: auto, cpu, cuda or cuda:N")


def _run_verify(args: argparse.Namespace) -> int:
    import os

    from megaclass.train.extract import verify

    result = verify(
        args.data,
        features=args.features,
        run_dir=args.run_dir,
        flip=args.flip,
        folds=args.folds,
        far_target=args.far,
        batch_size=args.batch_size,
        device=args.device,
    )
    name = os.path.splitext(os.path.basename(args.data))[0]
    if args.json == "-":
        print(result.to_json())
        return 0
    print(result.format(name))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            file.write(result.to_json() + "\n")
    return 0


# ----------------------------------------------------------------------------------------------------- data


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    decode = tools.add_parser(
        "decode-rec", help="unpack IN_DIR/train.rec into OUT_DIR/<label>/<key>.jpg + train/val lists"
    )
    decode.add_argument("in_dir", metavar="IN_DIR", help="folder holding train.rec and train.idx")
    decode.add_argument("out_dir", metavar="OUT_DIR", help="folder to write images and lists into")
    decode.add_argument("--val-fraction", type=float, default=0.1, help="per-identity share for val_list.txt")
    decode.add_argument("--seed", type=int, default=0, help="seeds the validation split")
    decode.set_defaults(data_run=_run_decode_rec)
    make = tools.add_parser("make-rec", help="pack an image folder or list file as OUT_DIR/train.rec")
    make.add_argument("source", metavar="SOURCE", help="image folder (<class>/<image>) or list file")
    make.add_argument("out_dir", metavar="OUT_DIR", help="folder for train.rec, train.idx and property")
    make.set_defaults(data_run=_run_make_rec)
    synth = tools.add_parser("synth", help="write a synthetic XMC task (power-law labels, planted clusters)")
    synth.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder for train and test files (train_bow.txt, ...)"
    )
    synth.add_argument(
        "--num-labels", type=int, required=True, help="label space size (10^3 to 10^7 and more)"
    )
    synth.add_argument("--num-docs", type=int, required=True, help="training documents")
    synth.add_argument(
        "--num-test-docs", type=int, default=None, help="test documents (default num-docs / 5)"
    )
    synth.add_argument("--num-features", type=int, default=100_000, help="vocabulary / BoW feature dimension")
    synth.add_argument("--format", choices=("bow", "text"), default="bow", help="BoW or labels<TAB>text")
    synth.add_argument(
        "--labels-per-doc", type=float, default=3.0, help="mean labels a document; 1: multi-class"
    )
    synth.add_argument("--seed", type=int, default=0, help="fixes the task; train and test share it")
    synth.add_argument("--gzip", action="store_true", help="write .gz files")
    synth.set_defaults(data_run=_run_synth)


def _run_data(args: argparse.Namespace) -> int:
    return args.data_run(args)


def _run_decode_rec(args: argparse.Namespace) -> int:
    from megaclass.data.images import decode_rec

    with _ProgressBar("img") as bar:
        summary = decode_rec(
            args.in_dir, args.out_dir, val_fraction=args.val_fraction, seed=args.seed, progress=bar
        )
    print(
        f"wrote {summary.images} images of {summary.classes} identities to {args.out_dir} "
        f"({summary.train} in train_list.txt, {summary.val} in val_list.txt)"
    )
    return 0


def _run_make_rec(args: argparse.Namespace) -> int:
    from megaclass.data.images import make_rec

    with _ProgressBar("img") as bar:
        count = make_rec(args.source, args.out_dir, progress=bar)
    print(f"packed {count} images into {args.out_dir}/train.rec (+ train.idx, property)")
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    import os
    import time

    from megaclass.data.synthetic import SynthConfig, synthesize, write_label_names

    config = SynthConfig(labels_per_doc=args.labels_per_doc)
    os.makedirs(args.out_dir, exist_ok=True)
    suffix = ("_bow.txt" if args.format == "bow" else ".txt") + (".gz" if args.gzip else "")
    test_docs = args.num_test_docs if args.num_test_docs is not None else max(args.num_docs // 5, 1)
    for stream, (split, docs) in enumerate((("train", args.num_docs), ("test", test_docs))):
        path = os.path.join(args.out_dir, split + suffix)
        start = time.perf_counter()
        synthesize(
            path,
            num_docs=docs,
            num_labels=args.num_labels,
            num_features=args.num_features,
            format=args.format,
            seed=args.seed,
            stream=stream,
            config=config,
        )
        print(f"wrote {docs} documents to {path} in {time.perf_counter() - start:.1f} s")
    if args.format == "text":  # text files take their label space from labels.txt beside them
        write_label_names(
            os.path.join(args.out_dir, "labels.txt" + (".gz" if args.gzip else "")), args.num_labels
        )
    return 0


# ------------------------------------------------------------------------------------------------ paramserver


def _add_paramserver_arguments(parser: argparse.ArgumentParser) -> None:
    from megaclass.paramserver.config import add_serve_arguments

    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    serve = tools.add_parser("serve", help="run one shard: rows [i*C/N, (i+1)*C/N) of a (C, D) classifier")
    add_serve_arguments(serve)


def _run_paramserver(args: argparse.Namespace) -> int:
    from megaclass.paramserver.server import run_serve

    return run_serve(args)


# --------------------------------------------------------------------------------------------------- export


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a run folder (sharded or not)")
    parser.add_argument(
        "--out", required=True, metavar="FILE.safetensors", help="the inference file to write"
    )


def _run_export(args: argparse.Namespace) -> int:
    from megaclass.train.export import export_run

    if os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} is a folder: expected a file path such as model.safetensors")
    path = export_run(args.run, args.out)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------- dispatch

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "train": ("train a model, evaluate it, write a run folder", _add_train_arguments, _run_train),
    "plan": (
        "the memory a training run will need on the GPU and the host, by part; refuse what cannot fit",
        _add_plan_arguments,
        _run_plan,
    ),
    "eval": ("evaluate a run folder's model on a data file", _add_eval_arguments, _run_eval),
    "predict": (
        "write a run folder's top-k labels for each row of a file",
        _add_predict_arguments,
        _run_predict,
    ),
    "extract": ("face embeddings of a .bin set or image data by a run", _add_extract_arguments, _run_extract),
    "verify": ("face verification accuracy, TAR@FAR on a .bin set", _add_verify_arguments, _run_verify),
    "export": (
        "write a run's model (sharded or not) as one inference file",
        _add_export_arguments,
        _run_export,
    ),
    "data": ("data tools: decode-rec, make-rec, synth", _add_data_arguments, _run_data),
    "paramserver": ("parameter-server tools: serve", _add_paramserver_arguments, _run_paramserver),
}
"""Command name -> (help, add its arguments, run it). Add a command with one entry."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="megaclass", description="Train classifiers over huge output spaces."
    )
    parser.add_argument("--version", action="version", version=f"megaclass {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(handler=run)  # not `run`: eval and predict take a --run DIR
    return parser


def run() -> None:
    """The ``megaclass`` command: :func:`main` on ``sys.argv``, then exit with its code.

    A rank of a torchrun world leaves without interpreter teardown, where gloo threads can still abort the
    process after its work is done and its files are closed, failing a finished run.
    """
    code = main()
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _warning_format(command: str, default: Callable[..., str]) -> Callable[..., str]:
    """Format a warning of megaclass's own as one line, ``megaclass <command>: warning: <message>`` (no source
    line); others as ``default`` does."""
    package = os.path.dirname(os.path.abspath(__file__))

    def format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
        if not os.path.abspath(filename).startswith(package + os.sep):
            return default(message, category, filename, lineno, line)
        text = one_line(message) if isinstance(message, BaseException) else str(message)
        return f"megaclass {command}: warning: {text}\n"

    return format_warning


def _stdout_to_devnull() -> None:
    """Point stdout at the null device, so that Python's flush of it at exit finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test's capture): nothing to redirect
        pass


def _grow_gpu_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments in place (``expandable_segments``) unless the user chose
    the allocator's settings: a run planned within a few GiB of the card's memory then is not stopped by
    fragmentation (at 3.2 x 10^8 classes on a 139.8 GiB card, 5.8 GiB stood reserved and free when a 4.8 GiB
    request failed). Read by PyTorch when the process first touches the GPU; torchrun's ranks inherit it."""
    if not any(name in os.environ for name in _ALLOCATOR_SETTINGS):
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    User errors (bad config, bad data, missing or unwritable files) print one line and return 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    _grow_gpu_segments()
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # after the command name: what --nproc-per-node forwards to torchrun
    try:
        with warnings.catch_warnings():  # restores the warning format on the way out
            warnings.formatwarning = _warning_format(args.command, warnings.formatwarning)
            return args.handler(args)
    except BrokenPipeError:  # the reader of stdout stopped (`megaclass eval ... | head`): nothing to say
        _stdout_to_devnull()
        return 0
    except RunDoesNotFit as error:
        more = "--dry-run prints the plan by part; --no-fit-check starts the run anyway"
        print(f"megaclass {args.command}: error: {one_line(error)} ({more})", file=sys.stderr)
        return _DOES_NOT_FIT
    except (ConfigError, DataFormatError, OSError, TrainingDiverged, ValueError, zlib.error) as error:
        print(f"megaclass {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megaclass {args.command}: interrupted", file=sys.stderr)
        return 130
