"""SelectedHead benchmark: HF-Softmax class selection vs full softmax, Cut Cross-Entropy and Partial FC.

    python benchmarks/selected.py                  # C = 10^6 and 10^7, D = 512, B = 512 (a GPU, < 3 minutes)
    python benchmarks/selected.py --quick          # small sizes, runs on CPU as a smoke test

One table, every provider in the same run, the face-recognition shape (fp32 master rows, bf16 compute):

- ``torch``: full softmax, ``x @ W.T`` under bf16 autocast then ``F.cross_entropy`` (``fwd+bwd``);
- ``cce``: ``cut_cross_entropy.linear_cross_entropy`` on bf16 ``x`` and ``W`` (``fwd+bwd``; skipped when
  absent; at ``C * D >= 2^31`` a row "crashes: 32-bit indexing, not run": its kernels fault there);
- ``partial_fc``: :class:`~megaclass.heads.selected.SelectedHead` as ``partial_fc``, 10% of the classes
  active (``step``: forward, backward and the row-sparse SGD update);
- ``selected``: :class:`~megaclass.heads.selected.SelectedHead` with the GPU index (``step``: forward,
  backward, update; ``build``: one warm index rebuild). Rows in the device store at 10^6 and in the host store
  at 10^7 (where the index keeps an int8 snapshot, so the GPU holds well under 8 GiB).

The class rows are "trained-like": each row is a group direction plus noise (groups of ~50 classes), and each
sample's feature is its class row plus noise, so nearest-class queries have real answers. After the table
a summary gives the amortised step (``step + build / interval``), the index build time and recall@10 of the
index against the exact top-10 on one batch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Case,
    Result,
    add_common_arguments,
    cce_available,
    cuda_graph,
    markdown_table,
    run_cases,
)
from megaclass.heads import HeadContext, build_head, head_config  # noqa: E402
from megaclass.index.exact import exact_topk  # noqa: E402
from megaclass.index.kmeans import DEFAULT_PROBES  # noqa: E402

FULL_CLASSES = (1_000_000, 10_000_000)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--classes", type=int, nargs="+", help="C values (default 1000000 10000000)")
    parser.add_argument("--dim", type=int, default=512, help="D, the feature width")
    parser.add_argument("--batch", type=int, default=512, help="B, the batch size")
    parser.add_argument("--sample-num", type=int, default=1000, help="SelectedHead's active classes per step")
    parser.add_argument("--interval", type=int, default=100, help="steps between index rebuilds (amortised)")
    parser.add_argument("--host-from", type=int, default=5_000_000, help="use the host store from this C on")
    parser.add_argument("--providers", default="torch,cce,partial_fc,selected", help="comma-separated subset")
    parser.add_argument(
        "--probes", type=int, default=DEFAULT_PROBES, help="clusters the GPU index searches per query"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="add a selected step captured in a CUDA graph and replayed (GPU only): the GPU's time alone",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of the selected step per C"
    )
    return parser.parse_args()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast() -> contextlib.AbstractContextManager:
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if torch.cuda.is_available()
        else contextlib.nullcontext()
    )


@torch.no_grad()
def plant_rows_(rows: torch.Tensor, *, group_size: int = 50, seed: int = 0) -> None:
    """Overwrite ``rows (C, D)`` (any device) with group directions plus noise, chunk by chunk on the GPU."""
    classes, dim = rows.shape
    generator = torch.Generator(device=device()).manual_seed(seed)
    groups = max(1, classes // group_size)
    centres = F.normalize(torch.randn(groups, dim, device=device(), generator=generator), dim=1)
    for start in range(0, classes, 1 << 20):
        stop = min(classes, start + (1 << 20))
        group = torch.randint(groups, (stop - start,), device=device(), generator=generator)
        noise = torch.randn(stop - start, dim, device=device(), generator=generator)
        rows[start:stop] = (centres[group] + 0.5 * noise / dim**0.5).to(rows.device)


def batch_for(rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features near their class rows ``(B, D)`` and the classes ``(B,)``."""
    targets = torch.randint(rows.shape[0], (batch,), device=device())
    centres = rows[targets.to(rows.device)].to(device())
    features = centres + 0.3 * torch.randn_like(centres) / rows.shape[1] ** 0.5
    return features.requires_grad_(True), targets


def full_softmax_case(classes: int, dim: int, batch: int) -> Callable[[], Callable[[], None]]:
    def setup() -> Callable[[], None]:
        weight = torch.empty(classes, dim, device=device())
        plant_rows_(weight)
        weight.requires_grad_(True)
        features, targets = batch_for(weight.detach(), batch)

        def step() -> None:
            with autocast():
                loss = F.cross_entropy(features @ weight.T, targets)
            loss.backward()
            weight.grad = features.grad = None

        return step

    return setup


def cce_case(classes: int, dim: int, batch: int) -> Callable[[], Callable[[], None]]:
    def setup() -> Callable[[], None]:
        from cut_cross_entropy import linear_cross_entropy

        weight = torch.empty(classes, dim, device=device(), dtype=torch.bfloat16)
        plant_rows_(weight)
        weight.requires_grad_(True)
        features, targets = batch_for(weight.detach(), batch)
        features = features.detach().bfloat16().requires_grad_(True)

        def step() -> None:
            linear_cross_entropy(features, weight, targets).backward()
            weight.grad = features.grad = None

        return step

    return setup


def make_head(
    kind: str, classes: int, dim: int, *, sample_num: int, store: str, probes: int = DEFAULT_PROBES
):
    """A PartialFC (10%) or SelectedHead (gpu index) on the device, rows planted."""
    if kind == "partial_fc":
        options = {"type": "partial_fc", "sample_num": 0.1, "store": store}
    else:
        index_dtype = "int8" if store == "host" else "auto"
        options = {
            "type": "selected",
            "sample_num": sample_num,
            "index": {"type": "gpu", "dtype": index_dtype, "probes": probes},
            "store": store,
            "interval": 10**9,
        }
    config = head_config({**options, "coverage_every": 0})
    head = build_head(config, HeadContext(in_features=dim, num_classes=classes, multilabel=False)).to(
        device()
    )
    head.materialize()
    plant_rows_(head.store.rows())
    return head


def head_step_case(
    holder: dict, make: Callable[[], object], batch: int, *, graph: bool = False
) -> Callable[[], Callable[[], None]]:
    """Builds the head inside the measured span (its rows and index count in peak memory), times one step.

    With ``graph`` the step (selection, forward, backward, row update) is captured once in a CUDA graph after
    three warm-up steps on a side stream and replayed: its shapes are fixed and it never waits for the host.
    """

    def setup() -> Callable[[], None]:
        head = holder["head"] = make()
        features, targets = batch_for(head.store.rows(), batch)
        if head.selector is not None:
            head.selector.build(head.store.rows())  # the cold build
        counter = [0]

        def step() -> None:
            counter[0] += 1
            with autocast():
                loss = head(features, targets)
            loss.backward()
            features.grad = None
            head.after_step(counter[0], 0.0, lr=0.01)

        holder["step"] = step
        if not graph:
            return step
        # the random fill draws from the head's own generator
        return cuda_graph(step, warmup=3, generators=[head._generator])

    return setup


def build_case(holder: dict, updated_rows: int) -> Callable[[], Callable[[], None]]:
    """Times a warm rebuild of the step case's head index, as after ``interval`` steps: ``updated_rows``
    random rows are marked as updated (the rows a snapshot index must refresh)."""

    def setup() -> Callable[[], None]:
        head = holder["head"]
        classes = head.context.num_classes

        def rebuild() -> None:
            head._dirty[torch.randint(classes, (updated_rows,), device=head._dirty.device)] = True
            head.rebuild_index()

        return rebuild

    return setup


def recall_at_10(head, batch: int) -> float:
    features, _ = batch_for(head.store.rows(), batch)
    features = features.detach()
    found = head.selector.query(features, 10)
    truth = exact_topk(features, head.store.rows(), 10, metric="cosine", chunk_size=1 << 16)[1]
    hits = (found[:, :, None] == truth[:, None, :]).any(2).sum()
    return float(hits) / truth.numel()


def run_heads(
    args, classes: int, wanted: set[str], results_path: str
) -> tuple[list[Result], dict[str, float]]:
    """Partial FC and SelectedHead cases of one ``C``, and the selected head's build time and recall."""
    results, summary = [], {}
    for kind in ("partial_fc", "selected"):
        if kind not in wanted:
            continue
        # Partial FC's 10% active rows are too many to gather from host memory each step: device store
        store = "host" if kind == "selected" and classes >= args.host_from else "gpu"
        params = {"C": classes, "D": args.dim, "B": args.batch, "store": store}
        holder: dict = {}
        make = lambda kind=kind, store=store: make_head(
            kind, classes, args.dim, sample_num=args.sample_num, store=store, probes=args.probes
        )
        cases = [Case(kind, "step", params, head_step_case(holder, make, args.batch))]
        if kind == "selected":
            updated = min(classes, args.interval * args.sample_num)
            cases.append(Case(kind, "build", params, build_case(holder, updated)))
            # a host store's step gathers in host memory: it cannot be captured (its capture_blocker says so)
            if args.cuda_graph and torch.cuda.is_available() and store != "host":
                graphed = head_step_case({}, make, args.batch, graph=True)
                cases.append(Case(f"{kind}-graph", "step", params, graphed))
        measured = run_cases(
            cases, benchmark="selected", results_path=results_path, reps=args.reps, warmup=args.warmup
        )
        results += measured
        head = holder.pop("head", None)
        if args.profile and kind == "selected" and "step" in holder:
            profile_step(holder.pop("step"), f"selected step, C={classes}")
        if kind == "selected" and head is not None and all(r.status == "ok" for r in measured[:2]):
            step_ms, build_ms = measured[0].time_ms, measured[1].time_ms
            summary = {
                "step_ms": step_ms,
                "build_ms": build_ms,
                "amortised_ms": step_ms + build_ms / args.interval,
                "recall_at_10": recall_at_10(head, args.batch),
                "clusters": head.selector.metrics().get("index_clusters", 0.0),
            }
        if head is not None and store == "host":
            head.store.close()
        del head
    return results, summary


def profile_step(step: Callable[[], None], title: str, *, steps: int = 20) -> None:
    """Print the kernels, launches and host syncs of ``steps`` calls of ``step`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for _ in range(3):
        step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\n{title}: {steps} steps profiled")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def cce_refusal(case: Case) -> Result | None:
    """Cut Cross-Entropy indexes logits with 32 bits: at ``C * D >= 2^31`` it faults (illegal memory access)
    and leaves the CUDA context unusable, so that case is reported without running it."""
    if case.provider == "cce" and case.params["C"] * case.params["D"] >= 2**31:
        return Result(case.provider, case.mode, dict(case.params), status="crashes: 32-bit indexing, not run")
    return None


def main() -> None:
    args = parse_args()
    if args.quick:
        args.classes, args.dim, args.batch, args.reps = args.classes or [20_000, 100_000], 64, 64, 5
        args.host_from, args.sample_num = min(args.host_from, 100_000), min(args.sample_num, 500)
    wanted = set(args.providers.split(","))
    if "cce" in wanted and not cce_available():
        print("cce: cut_cross_entropy not importable or no CUDA device; skipped", file=sys.stderr)
        wanted.discard("cce")
    results, summaries = [], []
    for classes in args.classes or FULL_CLASSES:
        # the heads first, the baselines last (Cut Cross-Entropy at C * D >= 2^31 is refused: it faults)
        head_results, summary = run_heads(args, classes, wanted, args.results)
        if summary:
            summaries.append((classes, summary))
        params = {"C": classes, "D": args.dim, "B": args.batch, "store": "-"}
        baselines = [
            Case(name, "fwd+bwd", params, factory(classes, args.dim, args.batch))
            for name, factory in (("torch", full_softmax_case), ("cce", cce_case))
            if name in wanted
        ]
        results += head_results + run_cases(
            baselines,
            benchmark="selected",
            results_path=args.results,
            reps=args.reps,
            warmup=args.warmup,
            isolate=cce_refusal,
        )
    print()
    print(markdown_table(results, columns=["time_ms", "q20_ms", "q80_ms", "peak_mem_gib"]))
    print()
    print(
        "| C | selected step ms | index build ms | amortised step ms (interval "
        f"{args.interval}) | recall@10 vs exact | clusters |"
    )
    print("|---|---|---|---|---|---|")
    for classes, s in summaries:
        print(
            f"| {classes} | {s['step_ms']:.3f} | {s['build_ms']:.1f} | {s['amortised_ms']:.3f} | "
            f"{s['recall_at_10']:.3f} | {s['clusters']:.0f} |"
        )


if __name__ == "__main__":
    main()
