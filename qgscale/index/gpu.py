"""FAISS on GPUs, selected by the resources a task or actor got.

A task or actor that Ray gave GPUs (``index.build.gpus_per_actor``: training and, when set
explicitly, the add actors; ``index.search.gpus_per_actor``: the search actors) runs FAISS on
them when this faiss build has GPU support (``faiss-gpu-cu12``, the ``gpu`` extra and
``cluster/Dockerfile``); asked for explicitly without it, it fails with one line naming the
stage. Indexes go to the GPUs with ``index_cpu_to_all_gpus`` (the task's visible GPUs,
``useFloat16``: an exact Flat shard in fp16, half the GPU memory) and come back with
``index_gpu_to_cpu`` before they are written.
"""

from __future__ import annotations

import logging
from typing import Any

from qgscale.errors import ConfigError

log = logging.getLogger(__name__)


def faiss_gpus() -> int:
    """GPUs this process's faiss can use (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(stage: str, gpus: float | None, explicit: bool) -> bool:
    """Whether a task of ``stage`` given ``gpus`` GPUs runs FAISS on them. ``explicit``: the
    config asked for them (``gpus_per_actor > 0``), so a faiss without GPU support is a
    :class:`ConfigError` rather than a fallback to the CPU."""
    if not gpus:
        return False
    if faiss_gpus() > 0:
        return True
    if explicit:
        raise ConfigError(
            f"{stage}.gpus_per_actor={gpus:g}: this faiss has no GPU support "
            "(faiss.get_num_gpus() == 0); install faiss-gpu (pip install 'qgscale[gpu]', as "
            f"cluster/Dockerfile does) or set {stage}.gpus_per_actor: 0")
    log.warning("%s: %g GPUs given but faiss has no GPU support: FAISS runs on CPU", stage,
                gpus)
    return False


def fp16_for_add(index: Any) -> bool:
    """``useFloat16`` for an add on GPUs: on for IVF-PQ, where it makes the search's lookup
    tables float16 (the codes are the same) and faiss' GPU IVF-PQ refuses more than 48 bytes
    a code without it (``M x 256 x 4`` bytes of tables must fit 48 KiB of shared memory:
    ``IVF16384,PQ64`` fails); off otherwise, where it would store a Flat index's vectors in
    float16 and the part written back would lose precision."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ)


def to_gpu(index: Any, fp16: bool = True) -> Any:
    """``index`` on this task's GPUs (sharded over them when several); ``fp16``: store
    vectors / codes lookup tables in float16 (``GpuMultipleClonerOptions.useFloat16``)."""
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = fp16
    co.shard = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co)
    except RuntimeError as e:  # e.g. fast-scan PQ, HNSW: no GPU implementation
        raise ConfigError(f"index {type(faiss.downcast_index(index)).__name__} has no FAISS "
                          f"GPU implementation ({str(e).splitlines()[0]}); use Flat, IVF-Flat, "
                          "IVF-SQ or 8-bit IVF-PQ on GPUs, or gpus_per_actor: 0") from e


def to_cpu(index: Any) -> Any:
    import faiss

    return faiss.index_gpu_to_cpu(index)
