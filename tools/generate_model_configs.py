"""Write model_config.json beside the checkpoints in every folder, as the original system's
generator did, and print its report.

Each folder's config comes through the library's own resolution (`ckptfmt.checkpoint.
open_checkpoint`): the embedded config of a .safetensors, else the sidecar already there, else
the architecture inferred from the weights. Never a default. A sidecar that disagrees with the
weights is reported, and replaced only with --force.

Usage: python tools/generate_model_configs.py [ROOT] [--force]   (default ROOT: checkpoints)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ckptfmt.checkpoint import open_checkpoint
from ckptfmt.config.sidecar import write_sidecar
from ckptfmt.errors import CkptfmtError, CkptfmtWarning

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")
RULE = "=" * 80


def representative_checkpoints(root: Path) -> dict[Path, Path]:
    """One checkpoint per folder: best_model if there is one, else the first by name."""
    found: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in CHECKPOINT_SUFFIXES and path.is_file() and not path.name.endswith(".optimizer.safetensors"):
            found.setdefault(path.parent, []).append(path)
    return {
        folder: next((p for p in paths if p.stem == "best_model"), paths[0])
        for folder, paths in sorted(found.items())
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="checkpoints", type=Path)
    parser.add_argument("--force", action="store_true", help="replace sidecars that disagree")
    args = parser.parse_args()
    # Inferring the config is what this tool is for; the loader's warning about it is noise here.
    warnings.simplefilter("ignore", CkptfmtWarning)

    print(RULE, "Generating Model Configuration Files", RULE, "", sep="\n")
    generated = failed = 0
    for folder, checkpoint in representative_checkpoints(args.root).items():
        name = folder.relative_to(args.root) if folder != args.root else folder.name
        try:
            opened = open_checkpoint(checkpoint)
            binding = (checkpoint.name, opened.header.weights_sha256) if opened.header else (None, None)
            location = write_sidecar(folder, opened.config, *binding, overwrite=args.force)
        except CkptfmtError as exc:
            failed += 1
            print(f"[FAIL] Could not generate config for: {name}\n  Reason: {exc}\n")
            continue
        generated += 1
        print(f"[OK] Generated config for: {name}")
        print(f"  Location: {location}")
        print(f"  Architecture: {opened.config.summary()}\n")
    print(RULE)
    print(f"✅ Generated {generated} configuration files" + (f", ❌ {failed} failed" if failed else ""))
    print(RULE)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
