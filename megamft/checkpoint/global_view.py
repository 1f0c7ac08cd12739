"""The layout-free view of a megatron dist checkpoint, read and written chunk by chunk.

megatron's ``torch_dist`` format stores every tensor under its *global* key and
shape (layers stacked on a leading axis, TP shards as chunks at their global
offsets), so one checkpoint loads at any TP/PP/DP. Conversion tools only need
that global view, and only one layer of it at a time: this module writes a
checkpoint from chunk producers that are called one at a time while writing,
and reads any region back, so memory stays at one chunk, not one model. Each
chunk names its data file, so that a rank reading the checkpoint opens only
the files holding what it loads.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megamft.checkpoint.layout import LATEST, CheckpointError, iteration_dir, write_atomically
from megamft.platform.output_folder import publish

# What megatron's dist_checkpointing.load expects beside the tensor data.
_MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class Chunk:
    """One region of a global tensor and how to produce its values when written."""

    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    file: str = "__0_0"
    """Data file (without its .distcp suffix) the chunk is stored in."""


class _ChunkSavePlanner(DefaultSavePlanner):
    """Plans the writes from chunk descriptions; produces each tensor only when it is written."""

    def __init__(self, chunks: list[Chunk], on_written: Callable[[Chunk], None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self._on_written = on_written

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.shape)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        self.plan = SavePlan(items)
        return self.plan

    def chunk_of(self, write_item: WriteItem) -> Chunk:
        return self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self.chunk_of(write_item)
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.shape):
            raise ValueError(
                f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)}, planned {chunk.shape}"
            )
        self._on_written(chunk)
        tensor = tensor.to(chunk.dtype).contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view of a larger tensor: torch.save would store all of it
        return tensor


class _ChunkFileWriter(FileSystemWriter):
    """Writes the chunks in plan order, each into the data file it names.

    FileSystemWriter writes a rank's items into files of its own choosing, one file
    after another; here the chunks say where they go (e.g. one file per loading rank),
    and the order stays the planner's, so that pieces of one tensor are produced in a row.
    Each item is written as FileSystemWriter writes it (filesystem._write_item).
    """

    def write_data(self, plan: SavePlan, planner: _ChunkSavePlanner) -> Future[list[WriteResult]]:
        streams, results = {}, []
        try:
            for item in plan.items:
                name = planner.chunk_of(item).file + DEFAULT_SUFFIX
                if name not in streams:
                    streams[name] = open(os.path.join(self.path, name), "wb")
                data = planner.resolve_data(item)
                results.append(
                    _write_item(
                        self.transforms, streams[name], data, item, name, self.serialization_format
                    )
                )
            for stream in streams.values():
                stream.flush()
                os.fsync(stream.fileno())
        finally:
            for stream in streams.values():
                stream.close()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


def write_checkpoint(
    save_dir: str | Path,
    iteration: int,
    chunks: list[Chunk],
    common: dict,
    on_written: Callable[[Chunk], None] = lambda chunk: None,
) -> Path:
    """Write a megatron dist checkpoint (complete only once renamed) and point `latest` at it."""
    final = iteration_dir(save_dir, iteration)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    writer = _ChunkFileWriter(str(partial), single_file_per_rank=True, thread_count=1)
    dcp_save({}, storage_writer=writer, planner=_ChunkSavePlanner(chunks, on_written), no_dist=True)
    torch.save(common, partial / "common.pt")
    (partial / "metadata.json").write_text(json.dumps(_MEGATRON_METADATA))
    publish(partial, final)
    write_atomically(Path(save_dir) / LATEST, f"{iteration}\n")
    return final


def tensor_index(checkpoint_dir: str | Path) -> dict[str, TensorStorageMetadata]:
    """Global key -> stored shape, dtype and chunks, for every tensor in a checkpoint."""
    metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    return {
        key: md
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def read_common(checkpoint_dir: str | Path) -> dict:
    """The non-tensor state (progress, config) that rank 0 saved.

    Read onto the host: it may hold CUDA tensors (fp16's loss scale), which would
    otherwise open a CUDA context on GPU 0 in every rank, or fail without a GPU.
    """
    return torch.load(Path(checkpoint_dir) / "common.pt", weights_only=False, map_location="cpu")


@dataclass(frozen=True)
class Region:
    """A request for part of a global tensor."""

    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self, regions: list[Region], destinations: list[torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions
        self._destinations = destinations

    def create_local_plan(self) -> LoadPlan:
        items = []
        for index, region in enumerate(self._regions):
            stored = self.metadata.state_dict_metadata[region.key]
            wanted = ChunkStorageMetadata(torch.Size(region.offsets), torch.Size(region.shape))
            for item in create_read_items_for_chunk_list(region.key, stored, [wanted]):
                # dest_index names the region (a key may be read twice, at two offsets)
                items.append(
                    item.__class__(**{**item.__dict__, "dest_index": MetadataIndex(str(index))})
                )
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self._destinations[int(read_item.dest_index.fqn)]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: already in place


def read_regions(checkpoint_dir: str | Path, regions: Iterable[Region]) -> list[torch.Tensor]:
    """Read several regions in one pass over the checkpoint files."""
    regions = list(regions)
    index = tensor_index(checkpoint_dir)
    missing = [r.key for r in regions if r.key not in index]
    if missing:
        raise CheckpointError(
            f"{checkpoint_dir} has no tensor {missing[0]!r}: not a checkpoint of the model its "
            "config describes; check the checkpoint folder"
        )
    for r in regions:
        stored = tuple(index[r.key].size)
        if len(stored) != len(r.shape) or any(
            o + n > s for o, n, s in zip(r.offsets, r.shape, stored)
        ):
            raise CheckpointError(
                f"{checkpoint_dir}: region {r.offsets}+{r.shape} lies outside {r.key} {stored}: "
                "the checkpoint does not match the model its config describes"
            )
    destinations = [torch.empty(r.shape, dtype=index[r.key].properties.dtype) for r in regions]
    reader = FileSystemReader(str(checkpoint_dir))
    dcp_load(
        {}, storage_reader=reader, planner=_RegionLoadPlanner(regions, destinations), no_dist=True
    )
    return destinations
