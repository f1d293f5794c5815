"""Prints when imported, as a plugin with a stray debug print does; it works otherwise."""

print("loading prints_at_import")


def Net(width: int = 3):
    """A builder that registers fine; only its import talks."""
    import torch

    return torch.nn.Linear(2, width)
