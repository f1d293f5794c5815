"""Fails when imported, as a plugin whose own dependency is missing does."""

raise RuntimeError("this plugin needs a GPU")
