"""Distributed models (FSDP2, DTensor): load a checkpoint into a sharded model, save one, resume.

- `load_model(path, mesh=mesh)`: every rank builds the model on the meta device from the
  checkpoint's config, shards it (`shard=`, FSDP2's `fully_shard` by default), allocates its
  own shards only, and reads only its own slices of each tensor from the file: no rank ever
  holds the full state dict. `load_into(model, path)` does the reading for a model the user
  has built and sharded already.
- `save(model, path)`: nothing is gathered to one rank. Every rank writes the whole tensors it
  owns (owners by balanced bytes) into shards, Hugging Face's layout, in parallel, with
  ckptfmt's own writer; rank 0 writes the index, the sidecar and the optimizer companion's
  index, and commits the set in one transaction. It keeps every guarantee of `ckptfmt.save`
  (read back and compared, digest, atomic: a kill of any rank leaves the previous checkpoint).
- `async_save(model, path)`: the same save, with the caller blocked only while each rank copies
  its pieces of the state into host memory; the rest runs on a thread, talking through a gloo
  group of its own.
- `load_training_state(path, model, optimizer)`: the optimizer state saved with the checkpoint
  (keyed by parameter name) is read on rank 0 and scattered to the shards by torch's
  `set_optimizer_state_dict`; save, resume, step equals never stopping, bit for bit.

Loading lives in `loading`, saving in `saving` (the plan in `ownership`, what a rank holds in
`pieces`, each rank's writing in `shards`), resuming in `resuming`; every collective is torch's.
"""

from .loading import load_into, load_model, shard_model
from .resuming import load_training_state
from .saving import async_save, save

__all__ = ["async_save", "load_into", "load_model", "load_training_state", "save", "shard_model"]
