"""Distributed models (FSDP2, DTensor): load a checkpoint into a sharded model, save one, resume.

- `load_model(path, mesh=mesh)`: every rank builds the model on the meta device from the
  checkpoint's config, shards it (`shard=`, FSDP2's `fully_shard` by default), allocates its
  own shards only, and reads only its own slices of each tensor from the file: no rank ever
  holds the full state dict. `load_into(model, path)` does the reading for a model the user
  has built and sharded already.
- `save(model, path)`: the full state dict is gathered to rank 0 (torch's
  `get_model_state_dict` with `full_state_dict=True, cpu_offload=True`), which writes it with
  ckptfmt's own writer, so a distributed save keeps every guarantee of `ckptfmt.save`
  (atomic replace, fsync, read back and compared, digest, sidecar, shards).
- `load_training_state(path, model, optimizer)`: the optimizer state saved with the checkpoint
  (the full state, keyed by parameter name) is read on rank 0 and scattered to the shards by
  torch's `set_optimizer_state_dict`; save, resume, step equals never stopping, bit for bit.

Loading lives in `loading`, saving and resuming in `saving`; every collective is torch's.
"""

from .loading import load_into, load_model, shard_model
from .saving import load_training_state, save

__all__ = ["load_into", "load_model", "load_training_state", "save", "shard_model"]
