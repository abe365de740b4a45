"""The FAISS side of the index: exact (flat) while small, IVF with compressed codes when large.

A flat inner-product scan costs time and 4*dim bytes per vector in proportion to the corpus
(12.9 ms and 1.5 KB per chunk-vector at 100k chunks, docs/benchmarks.md); an IVF index scans only
`nprobe` of its `nlist` lists and stores 1-byte (SQ8) or `pq_m`-byte (PQ) codes. `auto` switches
at `auto_threshold` chunks and back below half of it, so an index near the line does not flap.

Every kind keeps the chunk id as the FAISS id (flat through IndexIDMap2, IVF natively with a
hashtable direct map), so deletion removes vectors by id and `ids()` equals SQLite's chunk ids.
HNSW was left out: faiss cannot remove vectors from it, and rag deletes and replaces documents.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from rag.config import Settings

KINDS = ("auto", "flat", "ivf-sq8", "ivf-pq")
APPROX_KINDS = ("ivf-sq8", "ivf-pq")
TRAIN_PER_LIST = 64  # training vectors per IVF list
MIN_PER_LIST = 39  # faiss k-means warns (and centroids get poor) below this many vectors per list
MIN_IVF_VECTORS = 256  # below, every kind is flat: PQ's 8-bit codebooks need 256 training vectors


@dataclass(frozen=True)
class VectorSpec:
    """Which vector index to keep, from the settings (see rag/config.py)."""

    kind: str = "auto"
    auto_threshold: int = 200_000
    auto_kind: str = "ivf-sq8"  # what `auto` switches to at the threshold
    nlist: int = 0  # 0: from the corpus size (`nlist_for`)
    nprobe: int = 64
    pq_m: int = 48  # bytes per vector of PQ codes (dim must be a multiple)
    rerank: int = 4  # IVF: k * rerank candidates re-scored with their exact vectors (0: off)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown vector index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.auto_kind not in APPROX_KINDS:
            raise ValueError(f"auto_kind must be one of {', '.join(APPROX_KINDS)}, not {self.auto_kind!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> VectorSpec:
        return cls(
            kind=settings.vector_index,
            auto_threshold=settings.vector_auto_threshold,
            auto_kind=settings.vector_auto_kind,
            nlist=settings.vector_nlist,
            nprobe=settings.vector_nprobe,
            pq_m=settings.vector_pq_m,
            rerank=settings.vector_rerank,
        )

    def check(self, dim: int) -> None:
        """Refuse now what would fail at the first IVF-PQ build, mid-ingest."""
        uses_pq = "ivf-pq" in (self.kind, self.auto_kind if self.kind == "auto" else None)
        if uses_pq and dim % self.pq_m:
            raise ValueError(f"ivf-pq needs the dimension ({dim}) to be a multiple of pq_m ({self.pq_m})")

    def kind_for(self, n: int, current: str) -> str:
        """The kind an index of `n` vectors should have now, given the one it has."""
        if n < MIN_IVF_VECTORS:
            return "flat"
        if self.kind != "auto":
            return self.kind
        if current == "flat":
            return self.auto_kind if n >= self.auto_threshold else "flat"
        return "flat" if n < self.auto_threshold // 2 else self.auto_kind

    def nlist_for(self, n: int) -> int:
        """About 4*sqrt(n) lists (a power of two), so a list holds ~sqrt(n)/4 vectors; fewer while
        `n` is too small to train that many centroids well."""
        want = self.nlist or int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(max(n, 1))))))
        return max(1, min(want, n // MIN_PER_LIST))

    def train_size(self, n: int) -> int:
        """Vectors to train an IVF index of `n` on: TRAIN_PER_LIST per list, at most all of them."""
        return min(n, TRAIN_PER_LIST * self.nlist_for(n))

    def needs_rebuild(self, index: VectorIndex, n: int) -> bool:
        """True when `index` holding `n` vectors should be rebuilt: its kind is no longer the one
        wanted, or it has grown 4x past the size its lists were trained for (or nlist was set)."""
        if self.kind_for(n, index.kind) != index.kind:
            return True
        if index.kind == "flat":
            return False
        want = self.nlist_for(n)
        return want >= 2 * index.nlist or bool(self.nlist and want != index.nlist)


def _id_selector(ids: np.ndarray) -> faiss.IDSelectorArray:
    """IVF with a hashtable direct map removes only by an explicit id array (not a batch selector);
    ids it does not hold are passed over."""
    sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
    sel.referenced = ids  # keep the numpy buffer alive as long as the selector
    return sel


class VectorIndex:
    """An id-mapped FAISS index of unit vectors (inner product == cosine), one of `KINDS`."""

    def __init__(self, index: faiss.Index):
        self.index = index  # faiss.read_index and the constructors give the concrete class
        self._pending: list[np.ndarray] = []  # flat: removals batched (each costs O(n))

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def flat(cls, dim: int) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def read(cls, path: str, dim: int) -> VectorIndex | None:
        """The snapshot at `path`, or None when it is missing, unreadable or of another shape."""
        try:
            index = faiss.read_index(path)
        except RuntimeError:
            return None
        ok = isinstance(index, faiss.IndexIDMap2) or (
            isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.Hashtable
        )
        return cls(index) if ok and index.d == dim else None

    @classmethod
    def build(
        cls,
        kind: str,
        dim: int,
        spec: VectorSpec,
        n: int,
        sample: np.ndarray,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
    ) -> VectorIndex:
        """A new index of `kind` for `n` vectors, IVF trained on `sample` (`spec.train_size(n)` of
        them), filled from `batches` of (ids, vectors)."""
        if kind == "flat":
            out = cls.flat(dim)
        else:
            nlist = max(1, min(spec.nlist_for(n), len(sample) // MIN_PER_LIST))
            quantizer = faiss.IndexFlatIP(dim)
            if kind == "ivf-sq8":
                index = faiss.IndexIVFScalarQuantizer(
                    quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
                )
            else:
                if dim % spec.pq_m:
                    raise ValueError(f"ivf-pq needs dim ({dim}) to be a multiple of pq_m ({spec.pq_m})")
                index = faiss.IndexIVFPQ(quantizer, dim, nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = 0  # the same vectors give the same lists
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            out = cls(index)
        for ids, vecs in batches:
            out.add(ids, vecs)
        return out

    # ---- facts ----------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        if isinstance(self.index, faiss.IndexIVFScalarQuantizer):
            return "ivf-sq8"
        if isinstance(self.index, faiss.IndexIVFPQ):
            return "ivf-pq"
        return "flat"

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if isinstance(self.index, faiss.IndexIVF) else 0

    @property
    def ntotal(self) -> int:
        self._apply_removals()
        return int(self.index.ntotal)

    def bytes_per_vector(self) -> float:
        """Memory of the stored codes and ids (not the coarse quantizer), per vector."""
        if isinstance(self.index, faiss.IndexIVF):
            return float(self.index.code_size + 8)  # + the id in its inverted list
        return float(self.index.d * 4 + 8)

    def ids(self) -> np.ndarray:
        """All ids held, unsorted."""
        self._apply_removals()
        if isinstance(self.index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = self.index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(self.index.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    # ---- changes --------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids):  # pending removals can wait: chunk ids are never reused
            self.index.add_with_ids(
                np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray | list[int], defer: bool = False) -> None:
        """Remove by id; `defer` batches flat removals until the next read (each costs O(n))."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if defer and self.kind == "flat":
            self._pending.append(ids)
            return
        self._remove_now(ids)

    def _remove_now(self, ids: np.ndarray) -> None:
        if isinstance(self.index, faiss.IndexIDMap2):
            self.index.remove_ids(ids)
            return
        self.index.remove_ids(_id_selector(ids))

    def _apply_removals(self) -> None:
        if self._pending:
            pending, self._pending = np.concatenate(self._pending), []
            self.index.remove_ids(pending)

    # ---- reading --------------------------------------------------------------------------------

    def search(self, q: np.ndarray, k: int, nprobe: int) -> list[tuple[int, float]]:
        self._apply_removals()
        n = self.index.ntotal
        if k <= 0 or n == 0:
            return []
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist)) if self.nlist else None
        scores, ids = self.index.search(q.reshape(1, -1), min(k, n), params=params)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def reconstruct(self, chunk_id: int) -> np.ndarray:
        """The stored vector (decoded from its code for IVF); KeyError when absent."""
        self._apply_removals()
        try:
            return self.index.reconstruct(int(chunk_id))
        except RuntimeError:
            raise KeyError(f"chunk id {chunk_id} is not in the index") from None

    def reconstruct_batch(self, chunk_ids: np.ndarray) -> np.ndarray:
        """`reconstruct` of many ids in one call; KeyError when one is absent."""
        self._apply_removals()
        try:
            return self.index.reconstruct_batch(np.ascontiguousarray(chunk_ids, dtype=np.int64))
        except RuntimeError:
            raise KeyError("a chunk id is not in the index") from None

    def stored_form(self, vecs: np.ndarray) -> np.ndarray:
        """What `reconstruct` returns for these vectors once added: themselves (flat) or their
        decoded codes (IVF), so `Store.verify()` can compare exactly."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.kind == "flat":
            return vecs
        return self.index.sa_decode(self.index.sa_encode(vecs))

    def write(self, path: str) -> None:
        self._apply_removals()
        faiss.write_index(self.index, path)
