"""Face embeddings and verification: what ``megaclass extract`` and ``megaclass verify`` run.

``megaclass extract --run runs/faces --data lfw.bin --out feats.npy --flip``
``megaclass verify --data lfw.bin --features feats.npy``  (or ``--run runs/faces``)

Embeddings come out in file order (a ``.bin``'s images, or a data set's rows); with flip fusion each is the
sum of the embeddings of the image and its mirror. Verification L2-normalises them and runs the 10-fold
protocol of :mod:`megaclass.metrics.verification`. During training, :class:`VerificationEvaluator` holds the
decoded ``.bin`` sets given by ``eval.verification`` and scores the encoder on each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from megaclass.data.images import decode_image, flip_images, images_to_tensor, open_face_dataset
from megaclass.data.verification_bin import VerificationSet, load_verification_bin
from megaclass.metrics.verification import VerificationResult, evaluate_verification

__all__ = [
    "VerificationEvaluator",
    "decode_images",
    "embed_images",
    "extract",
    "load_run_encoder",
    "verify",
]


def decode_images(images: Sequence[bytes], *, where: str = "<images>") -> Tensor:
    """Decode encoded images to uint8 ``(N, 3, S, S)``, resized to ``S x S`` (S: the first one's height)."""
    if not images:
        raise ValueError(f"{where}: no images to decode")
    first = decode_image(images[0], where=f"{where} image 0")
    size = first.shape[0]
    if first.shape[1] != size:
        first = decode_image(images[0], size=size, where=f"{where} image 0")
    decoded = [first] + [
        decode_image(data, size=size, where=f"{where} image {i}")
        for i, data in enumerate(images[1:], start=1)
    ]
    return images_to_tensor(decoded)  # (N, 3, S, S)


@torch.no_grad()
def embed_images(
    encoder: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 256,
    flip: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], object] | None = None,
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of uint8 images ``(N, 3, S, S)``, in order, the encoder in eval mode.

    Args:
        flip: flip fusion, ``f(x) + f(mirror(x))``.
        progress: called with ``(images done in this batch, total images)`` after each batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected > 0, got {batch_size}")
    was_training = encoder.training
    encoder.eval()
    outputs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)  # (b, 3, S, S)
            features = encoder(batch).float()  # (b, D)
            if flip:
                features = features + encoder(flip_images(batch)).float()
            outputs.append(features.cpu())
            if progress is not None:
                progress(batch.shape[0], images.shape[0])
    finally:
        encoder.train(was_training)
    return torch.cat(outputs).numpy()  # (N, D)


class VerificationEvaluator:
    """Decoded verification sets, scored on an encoder whenever the trainer evaluates.

    Args:
        paths: ``.bin`` files; each is loaded (safely) and decoded once.
        batch_size: images per forward pass.
        flip: flip fusion (InsightFace's validation uses it).
        folds: ``k`` of the k-fold protocol.
        far_target: the FAR at which TAR is reported.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int = 256,
        flip: bool = True,
        folds: int = 10,
        far_target: float = 1e-3,
    ) -> None:
        self.sets: list[tuple[VerificationSet, Tensor]] = []
        for path in paths:
            data = load_verification_bin(path)
            self.sets.append((data, decode_images(data.images, where=os.fspath(path))))
        self.batch_size = batch_size
        self.flip = flip
        self.folds = folds
        self.far_target = far_target

    def __call__(
        self, encoder: nn.Module, *, device: torch.device | str = "cpu"
    ) -> dict[str, VerificationResult]:
        """``{set name: result}`` of ``encoder`` on every set."""
        results = {}
        for data, images in self.sets:
            embeddings = embed_images(
                encoder, images, batch_size=self.batch_size, flip=self.flip, device=device
            )
            results[data.name] = evaluate_verification(
                embeddings, data.issame, folds=self.folds, far_target=self.far_target
            )
        return results

    @staticmethod
    def flatten(results: dict[str, VerificationResult]) -> dict[str, float]:
        """Metrics for the run log: ``<name>/accuracy``, ``<name>/accuracy_std``, ``<name>/tar@far``."""
        metrics = {}
        for name, result in results.items():
            metrics[f"{name}/accuracy"] = result.accuracy
            metrics[f"{name}/accuracy_std"] = result.accuracy_std
            metrics[f"{name}/threshold"] = result.threshold
            metrics[f"{name}/tar@far={result.far_target:g}"] = result.tar
        return metrics


def load_run_encoder(run_dir: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """The encoder of training run ``run_dir`` (final weights, else its newest checkpoint), in eval mode."""
    from megaclass.train.inference import load_run

    run = load_run(os.fspath(run_dir), device=str(device))
    kind = run.facts.get("input_spec", {}).get("kind")
    if kind != "image":
        raise ValueError(
            f"--run {os.fspath(run_dir)}: its model reads {kind} inputs, not face images; extract and verify "
            "take a run trained on face images (a .rec, an image folder or an image list)"
        )
    return run.encoder.eval()


def _image_chunks(path: str, chunk: int) -> tuple[int, Iterator[Tensor]]:
    """The number of images of a ``.bin`` (file order) or face data set (row order), and their uint8 chunks.

    A data set is decoded ``chunk`` rows at a time, so embedding a large ``.rec`` never holds it all.
    """
    if path.endswith(".bin"):
        images = decode_images(load_verification_bin(path).images, where=path)
        return images.shape[0], iter([images])
    dataset = open_face_dataset(path)
    rows = np.arange(len(dataset))
    return rows.size, (dataset.images(rows[start : start + chunk]) for start in range(0, rows.size, chunk))


def extract(
    run_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    flip: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> np.ndarray:
    """Embed every image of ``data_path`` with run ``run_dir``'s encoder; save ``(N, D)`` float32 as ``.npy``.

    Args:
        data_path: a ``.bin`` verification set, a ``.rec``, an image folder or a ``relpath label`` list.
        flip: flip fusion.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    """
    target = _device(device)
    encoder = load_run_encoder(run_dir, device=target)
    total, chunks = _image_chunks(os.fspath(data_path), 16 * batch_size)
    parts = []
    for images in chunks:
        parts.append(embed_images(encoder, images, batch_size=batch_size, flip=flip, device=target))
        if progress is not None:
            progress(images.shape[0], total)
    embeddings = np.concatenate(parts)  # (N, D)
    out_path = os.fspath(out_path)
    if os.path.isdir(out_path):
        raise ValueError(f"--out: {out_path} is a folder: expected a file path such as feats.npy")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.save(out_path, embeddings)
    return embeddings


def verify(
    data_path: str | os.PathLike,
    *,
    features: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    flip: bool = False,
    folds: int = 10,
    far_target: float = 1e-3,
    batch_size: int = 256,
    device: str = "auto",
) -> VerificationResult:
    """Verification result on the pairs of ``.bin`` set ``data_path``, from saved features or a run's encoder.

    Give exactly one of ``features`` (a ``.npy`` of ``(2P, D)``, as :func:`extract` writes) and ``run_dir``.
    """
    if (features is None) == (run_dir is None):
        raise ValueError("verify: give exactly one of --features FILE and --run DIR")
    data = load_verification_bin(data_path)
    if features is not None:
        embeddings = _load_features(os.fspath(features), os.fspath(data_path), len(data.images))
    else:
        target = _device(device)
        encoder = load_run_encoder(run_dir, device=target)
        images = decode_images(data.images, where=os.fspath(data_path))
        embeddings = embed_images(encoder, images, batch_size=batch_size, flip=flip, device=target)
    return evaluate_verification(embeddings, data.issame, folds=folds, far_target=far_target)


def _load_features(path: str, data_path: str, count: int) -> np.ndarray:
    """The ``(count, D)`` float features of ``.npy`` file ``path``, one row per image of ``data_path``."""
    expected = (
        f"expected a .npy of float features, shape ({count}, D): one row per image of {data_path}, as "
        "megaclass extract writes"
    )
    if os.path.isdir(path):
        raise ValueError(f"--features {path}: is a folder: {expected}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
            handle.seek(0)
            embeddings = np.load(handle, allow_pickle=False) if magic == b"\x93NUMPY" else None
    except FileNotFoundError:
        raise ValueError(f"--features {path}: no such file: {expected}") from None
    except OSError as error:
        raise ValueError(f"--features {path}: cannot read ({error.strerror or error}): {expected}") from None
    except (ValueError, EOFError):  # a damaged header, cut-short data, or object (pickled) values
        raise ValueError(f"--features {path}: cut short, damaged or holding objects: {expected}") from None
    if embeddings is None:
        what = "an empty file" if not magic else "not a .npy file"
        raise ValueError(f"--features {path}: {what}: {expected}")
    if embeddings.dtype.kind != "f":
        raise ValueError(f"--features {path}: values of type {embeddings.dtype}: {expected}")
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise ValueError(
            f"--features {path}: shape {embeddings.shape}, expected ({count}, D) for the images of "
            f"{data_path}"
        )
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"--features {path}: row {row} (image {row + 1} of {data_path}) holds NaN or infinite values, "
            f"and {int((~finite).sum())} rows in all: {expected}"
        )
    return embeddings


def _device(name: str) -> torch.device:
    from megaclass.train.build import resolve_device
    from megaclass.train.inference import check_device

    return resolve_device(check_device(name), setting="--device")
