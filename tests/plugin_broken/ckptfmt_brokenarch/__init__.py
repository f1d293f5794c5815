"""Modules that misbehave when imported: each is one entry point of this package."""
