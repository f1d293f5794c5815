"""The version of ckptfmt, on the ground floor: what records it (provenance, caches, --version)
imports it from here, never from the package above."""

__version__ = "0.2.0"
