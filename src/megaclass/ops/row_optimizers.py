"""Row-sparse optimizers as pure functions over tensors: only the rows a step touched change; and the
seeded initial rows every row store draws.

A store keeps, beside its ``(C, D)`` rows, a state dict of same-leading-dimension tensors (momentum buffers,
Adam moments, per-row step counts). A step gathers the touched rows and their state, calls
:func:`apply_row_update_` on the gathered slices, and writes them back; :func:`apply_sparse_update_` does the
three at once for rows held in one tensor. :func:`take_rows` and :func:`put_rows_` are that gather and that
write-back, fast for rows at random places in host memory.

A row sits out the steps it is not active. Two rules for those steps (``RowOptimizerConfig.lazy``):

- ``lazy=False`` (the default): at its next touch a row catches up on what a dense optimizer would have done
  to it over the skipped steps with a zero gradient, where that has a closed form: decoupled weight decay
  (AdamW) ``(1 - lr wd)^k``, SGD's L2 decay at the steady rate it has through the momentum buffer, and
  Adam's second moment ``v b2^k`` with the bias correction of the global step. The first moment / momentum
  buffer stays a per-touch average (its whole tail is paid on the row's next touches, the total a dense
  optimizer pays over the skipped steps). Without this, a row active on a share ``p`` of the steps moves
  ``sqrt(p)`` times as far under Adam as under dense Adam for the same gradients (its ``v`` holds only the
  touched steps' squares, ``1 / p`` times dense's), and is decayed ``p`` times as much.
- ``lazy=True``: untouched rows get no momentum, no decay and no step count: HF-Softmax's SGD and
  ``torch.optim.SparseAdam`` (with per-row bias correction).

When every row is touched every step both rules equal ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` /
``Adagrad`` on the dense matrix (tests check it). Adagrad and Adam's coupled L2 decay have no closed form
over skipped steps (the decay feeds the accumulators): they are lazy under both rules.

:func:`init_rows_` draws a ``(C, D)`` matrix in fixed chunks of rows, each from its own seed, so a store in
device memory, one in host memory and the parameter-server shards (each drawing only its own rows) start
from the same matrix.
"""

from __future__ import annotations

import enum
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megaclass.ops import run_split
from megaclass.schema import ConfigError
from megaclass.staging import copy_rows_

__all__ = [
    "RowOptimizerConfig",
    "RowOptimizerKind",
    "apply_row_update_",
    "apply_sparse_update_",
    "gather_state",
    "init_row_state",
    "init_rows_",
    "put_rows_",
    "scatter_state_",
    "take_rows",
]


INIT_CHUNK = 1 << 16  # rows drawn per generator seed: the unit every store draws its initial rows in
_INIT_THREADS = 4  # CPU chunks drawn at once (each holds one chunk of rows in fp32)
_PUT_THREAD_BYTES = 2 << 20  # put_rows_: the least a host write gives each of torch's threads for numpy's put


class RowOptimizerKind(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    ADAGRAD = "adagrad"


@dataclass(frozen=True)
class RowOptimizerConfig:
    """The optimizer a row store applies to the rows a step touched."""

    kind: RowOptimizerKind = RowOptimizerKind.SGD  # HF-Softmax trains its classifier with SGD + momentum
    momentum: float = 0.9  # SGD momentum (0 keeps no buffer)
    weight_decay: float = 0.0  # L2 added to the gradient (decoupled, applied to the row, for AdamW)
    nesterov: bool = False  # SGD Nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW moment decays
    eps: float = 1e-8  # Adam/AdamW/Adagrad denominator guard
    lazy: bool = False  # True: skipped steps leave a row's state alone; False: it catches up (module doc)

    def __post_init__(self) -> None:
        try:  # modes accept their string names
            object.__setattr__(self, "kind", RowOptimizerKind(self.kind))
        except ValueError:
            raise ConfigError(
                f"optimizer.kind: {self.kind!r} is not one of {[k.value for k in RowOptimizerKind]}"
            ) from None
        object.__setattr__(self, "betas", tuple(self.betas))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.kind is not RowOptimizerKind.SGD or self.momentum == 0):
            raise ConfigError("optimizer.nesterov needs kind sgd with momentum > 0")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each state tensor (``()`` for a scalar per row)."""
        if self.kind is RowOptimizerKind.SGD:
            shapes = {"momentum_buffer": (dim,)} if self.momentum > 0 else {}
        elif self.kind is RowOptimizerKind.ADAGRAD:
            return {"sum": (dim,), "step": ()}
        else:
            shapes = {"exp_avg": (dim,), "exp_avg_sq": (dim,), "step": ()}
        if self.catches_up:
            shapes["last_step"] = ()  # the global step of the row's last update (0: never)
        return shapes

    @property
    def catches_up(self) -> bool:
        """Whether a row's state advances over the steps it sat out (needs the global step of each update)."""
        if self.lazy or self.kind is RowOptimizerKind.ADAGRAD:
            return False
        return self.kind is not RowOptimizerKind.SGD or self.weight_decay > 0  # SGD: only its decay


def init_row_state(
    config: RowOptimizerConfig,
    num_rows: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Zeroed optimizer state for ``num_rows`` rows of width ``dim``: ``{name: (num_rows, ...)}``, row-shaped
    state in ``dtype`` (the rows'), per-row counts in float32."""
    return {
        name: torch.zeros((num_rows, *shape), dtype=dtype if shape else torch.float32, device=device)
        for name, shape in config.state_shapes(dim).items()
    }


@torch.no_grad()
def apply_row_update_(
    rows: Tensor,
    state: dict[str, Tensor],
    grads: Tensor,
    *,
    lr: float,
    config: RowOptimizerConfig,
    step: int | None = None,
) -> None:
    """One optimizer step on ``rows (S, D)`` in place, given ``grads (S, D)`` and the rows' ``state``.

    ``state`` holds this optimizer's tensors for the same ``S`` rows (see :func:`init_row_state`); they are
    updated in place, including the per-row ``step`` count used for Adam's first-moment bias correction.
    ``step`` is the global optimizer step this update is (1-based): rows whose last update was earlier catch
    up on the steps between (see the module). None: each row's last update counts as the step before (the
    lazy rule, for callers without a global step).
    """
    if rows.shape != grads.shape:
        raise ValueError(f"grads: expected shape {tuple(rows.shape)} like rows, got {tuple(grads.shape)}")
    if step is not None and step < 1:
        raise ValueError(f"step: expected the 1-based global step or None, got {step}")
    grads = grads.to(torch.promote_types(rows.dtype, torch.float32))  # fp32 maths at least
    skipped = None  # (S,) steps each row sat out since its last update
    if config.catches_up:
        last = state["last_step"]
        current = last + 1 if step is None else torch.full_like(last, float(step))
        skipped = (current - last - 1).clamp_min_(0)  # (S,); a step repeated after a resume skips none
        last.copy_(current)
    if config.kind is RowOptimizerKind.SGD:
        _sgd_(rows, state, grads, lr=lr, config=config, skipped=skipped)
    elif config.kind is RowOptimizerKind.ADAGRAD:
        _adagrad_(rows, state, grads, lr=lr, config=config)
    else:
        _adam_(rows, state, grads, lr=lr, config=config, skipped=skipped)


def _sgd_(
    rows: Tensor,
    state: dict[str, Tensor],
    grads: Tensor,
    *,
    lr: float,
    config: RowOptimizerConfig,
    skipped: Tensor | None,
) -> None:
    # torch.optim.SGD: d = g + wd * w; buf = mu * buf + d; d = d + mu * buf (Nesterov) or buf; w -= lr * d
    if skipped is not None:
        # the skipped steps' gradient is wd * w alone: (w, buf) <- [[1 - a, -lr mu], [wd, mu]] (w, buf) with
        # a = lr wd, whose dominant eigenvalue (1 + mu - a + sqrt((1 + mu - a)^2 - 4 mu)) / 2 is the rate w
        # shrinks at once steady (1 - a without momentum; sqrt(mu) in modulus where the roots are complex)
        trace, mu = 1 + config.momentum - lr * config.weight_decay, config.momentum
        discriminant = trace * trace - 4 * mu
        shrink = (trace + math.sqrt(discriminant)) / 2 if discriminant >= 0 else math.sqrt(mu)
        rows.mul_(torch.pow(shrink, skipped).to(rows.dtype)[:, None])
    # the decay is added where it is used, not into a copy of the gradients: no (S, D) temporary but Nesterov
    weight_decay, momentum = config.weight_decay, config.momentum
    if momentum > 0:
        buffer = state["momentum_buffer"]
        buffer.mul_(momentum).add_(grads)
        if weight_decay:
            buffer.add_(rows, alpha=weight_decay)
        if config.nesterov:  # d + mu buf, with d = g + wd w
            step = torch.add(grads, buffer, alpha=momentum)
            if weight_decay:
                step.add_(rows, alpha=weight_decay)
            rows.add_(step.to(rows.dtype), alpha=-lr)
        else:
            rows.add_(buffer.to(rows.dtype), alpha=-lr)
    elif weight_decay:
        rows.add_(torch.add(grads, rows, alpha=weight_decay).to(rows.dtype), alpha=-lr)
    else:
        rows.add_(grads.to(rows.dtype), alpha=-lr)


def _adagrad_(
    rows: Tensor, state: dict[str, Tensor], grads: Tensor, *, lr: float, config: RowOptimizerConfig
) -> None:
    # torch.optim.Adagrad (lr_decay 0): g += wd * w; sum += g^2; w -= lr * g / (sqrt(sum) + eps)
    if config.weight_decay:
        grads = grads + config.weight_decay * rows
    state["step"].add_(1)
    state["sum"].addcmul_(grads, grads)
    rows.addcdiv_(grads, state["sum"].sqrt().add_(config.eps), value=-lr)


def _adam_(
    rows: Tensor,
    state: dict[str, Tensor],
    grads: Tensor,
    *,
    lr: float,
    config: RowOptimizerConfig,
    skipped: Tensor | None,
) -> None:
    # torch.optim.Adam / AdamW: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    # w -= lr / (1 - b1^n) * m / (sqrt(v / (1 - b2^t)) + eps), n counting the steps row r was touched, and
    # t = n (lazy) or the global step, with v decayed by b2^k and w by (1 - lr wd)^k over k skipped steps
    beta1, beta2 = config.betas
    if config.weight_decay and config.kind is RowOptimizerKind.ADAMW:
        decay = 1 - lr * config.weight_decay
        if skipped is not None:  # the skipped steps' decay too
            rows.mul_(torch.pow(decay, skipped).to(rows.dtype)[:, None])
        rows.mul_(decay)
    elif config.weight_decay:
        grads = grads + config.weight_decay * rows
    count = state["step"].add_(1)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    global_step = count
    if skipped is not None:
        exp_avg_sq.mul_(torch.pow(beta2, skipped)[:, None])
        global_step = state["last_step"]  # the step just recorded for each row
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    correction1 = 1 - beta1**count  # (S,)
    correction2 = 1 - beta2**global_step
    denominator = (exp_avg_sq / correction2[:, None]).sqrt_().add_(config.eps).mul_(correction1[:, None] / lr)
    rows.addcdiv_(exp_avg, denominator, value=-1.0)


def take_rows(tensor: Tensor, ids: Tensor) -> Tensor:
    """``tensor[ids]`` as a new tensor on ``tensor``'s device (``index_select``: a row copied whole)."""
    return torch.index_select(tensor, 0, ids.to(tensor.device))


def put_rows_(tensor: Tensor, ids: Tensor, values: Tensor) -> None:
    """``tensor[ids] = values`` for unique row ids ``ids (S,)``, in place.

    In host memory a write of at least :data:`_PUT_THREAD_BYTES` for each of torch's threads copies each row
    as one item (numpy's ``put`` over a row-sized void dtype, which lets go of the GIL), one piece a thread:
    rows at random places are a wait on memory, which the threads overlap, and numpy's put waits less a row
    than ``index_put_`` (where the rule takes it on a GPU host's 10^7 rows of D 256: 1.2 to 1.5 times its
    speed on 2 to 8 threads, 0.8 on 16 threads at 50,000 rows). Smaller writes, and other devices:
    ``index_put_``, which spreads a write over more threads at less cost (1.2 to 2.6 times numpy's speed on 4
    to 16 threads at 5,000 rows of D 256; ``benchmarks/RESULTS.md``).
    """
    ids = ids.to(tensor.device)
    values = values.to(tensor.device, tensor.dtype)
    row_bytes = tensor[:1].numel() * tensor.element_size()
    threads = torch.get_num_threads()
    small = len(ids) * row_bytes < threads * _PUT_THREAD_BYTES
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or not row_bytes or small:
        tensor[ids] = values
        return
    target, source, where = _row_items(tensor), _row_items(values.contiguous()), ids.numpy()
    bounds = np.linspace(0, len(where), threads + 1).astype(np.int64).tolist()
    run_split(lambda a, b: np.put(target, where[a:b], source[a:b]), bounds)


def _row_items(tensor: Tensor) -> np.ndarray:
    """A contiguous host tensor's rows as a ``(n,)`` numpy array of row-sized void items (its bytes)."""
    rows = tensor.detach().reshape(len(tensor), -1).view(torch.uint8).numpy()  # any dtype: its bytes
    return rows.view(np.dtype((np.void, rows.shape[1]))).reshape(-1)


def gather_state(state: dict[str, Tensor], ids: Tensor) -> dict[str, Tensor]:
    """The state of rows ``ids (S,)``, as new tensors on ``ids``' device."""
    return {name: take_rows(tensor, ids).to(ids.device, non_blocking=True) for name, tensor in state.items()}


def scatter_state_(state: dict[str, Tensor], ids: Tensor, rows_state: dict[str, Tensor]) -> None:
    """Write ``rows_state`` (from :func:`gather_state`) back into ``state`` at rows ``ids``."""
    for name, tensor in state.items():
        put_rows_(tensor, ids, rows_state[name])


@torch.no_grad()
def apply_sparse_update_(
    weight: Tensor,
    state: dict[str, Tensor],
    ids: Tensor,
    grads: Tensor,
    *,
    lr: float,
    config: RowOptimizerConfig,
    step: int | None = None,
) -> None:
    """One step (global ``step``, see :func:`apply_row_update_`) on rows ``ids (S,)`` (unique) of
    ``weight (C, D)`` and its full-size ``state``."""
    if ids.dim() != 1 or grads.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(
            f"ids/grads: expected (S,) and (S, {weight.shape[1]}), "
            f"got {tuple(ids.shape)} and {tuple(grads.shape)}"
        )
    ids = ids.to(weight.device)
    rows = take_rows(weight, ids)
    rows_state = gather_state(state, ids)
    apply_row_update_(rows, rows_state, grads.to(weight.device), lr=lr, config=config, step=step)
    put_rows_(weight, ids, rows)
    scatter_state_(state, ids, rows_state)


@torch.no_grad()
def init_rows_(
    weight: Tensor,
    *,
    seed: int,
    bound: float | None = None,
    draw_device: torch.device | str | None = None,
    row_start: int = 0,
    num_rows: int | None = None,
) -> None:
    """Fill ``weight (n, D)`` with rows ``[row_start, row_start + n)`` of a ``(num_rows, D)`` matrix
    ``U(-bound, bound)`` (default bound ``1 / sqrt(D)``, as ``nn.Linear``).

    The matrix is drawn on ``draw_device`` (default the CPU) in chunks of :data:`INIT_CHUNK` rows, chunk
    ``i`` with seed ``seed + i``, so the result depends neither on where the rows live nor on how they are
    split: a device store, a host store with the same compute device, and shards each filling their own
    range on the CPU all hold the same matrix (a host store draws on the GPU, not with the slower CPU
    generator). On the CPU, up to 4 chunks are drawn at once on torch's threads.

    Args:
        weight: the rows to fill, in place.
        seed: seeds chunk ``i`` with ``seed + i``.
        bound: half-width of the uniform distribution.
        draw_device: where the random numbers are drawn.
        row_start: the row of the whole matrix that ``weight[0]`` is.
        num_rows: rows of the whole matrix (``C``); default ``row_start + n``.

    >>> whole, part = torch.empty(5, 2), torch.empty(2, 2)
    >>> init_rows_(whole, seed=3); init_rows_(part, seed=3, row_start=2, num_rows=5)
    >>> torch.equal(whole[2:4], part)
    True
    """
    row_stop = row_start + weight.shape[0]
    num_rows = row_stop if num_rows is None else num_rows
    if not 0 <= row_start <= row_stop <= num_rows:
        raise ValueError(f"rows [{row_start}, {row_stop}) are not inside a matrix of {num_rows} rows")
    dim = weight.shape[1]
    bound = 1.0 / math.sqrt(dim) if bound is None else bound
    draw_device = torch.device("cpu" if draw_device is None else draw_device)

    def draw(index: int) -> None:
        start = index * INIT_CHUNK
        generator = torch.Generator(device=draw_device).manual_seed(seed + index)
        # the chunk's full length is drawn: a shorter draw need not be its prefix on every device
        chunk = torch.rand(min(INIT_CHUNK, num_rows - start), dim, generator=generator, device=draw_device)
        low, high = max(start, row_start), min(start + chunk.shape[0], row_stop)
        values = chunk[low - start : high - start].mul_(2 * bound).sub_(bound)  # (high - low, D)
        copy_rows_(weight[low - row_start : high - row_start], values)

    chunks = range(row_start // INIT_CHUNK, -(-row_stop // INIT_CHUNK))
    threads = min(torch.get_num_threads(), _INIT_THREADS, len(chunks)) if draw_device.type == "cpu" else 1
    if threads <= 1:
        for index in chunks:
            draw(index)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="init-rows") as pool:
        list(pool.map(draw, chunks))  # CPU chunks side by side (each its own generator: the same matrix)
