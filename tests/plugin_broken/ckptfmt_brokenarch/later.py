"""Imports fine, then ends the process from its infer_config, asked of every bare state dict."""

import sys


class Net:
    """A builder that registers fine; only its infer_config misbehaves."""

    def __init__(self, width: int = 3):
        self.width = width

    @staticmethod
    def infer_config(shapes):
        sys.exit(3)
