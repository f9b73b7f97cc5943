"""Keeps torch.compile from reusing graphs that another build of cnnkernels traced.

torch.compile's on-disk caches (Inductor's FX graph cache and AOTAutograd's cache) know a
custom op by its name only: a graph compiled through our ops' autograd and fake kernels is
reused after an upgrade or a rebuild that changed them (pytorch/pytorch#144344), so a stale
backward could run silently. Importing cnnkernels adds a digest of this install's code to
`torch.compiler.config.cache_key_tag`, which both caches hash: the first compile after an
install misses, later ones hit. A tag the user sets keeps its place; one assigned after
`import cnnkernels` replaces ours.
"""
import hashlib
import os

import torch

_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))


def install_identity(root=_PACKAGE_ROOT):
    """A digest of every Python and JSON file under `root`, paths and contents.

    The extension is known by _build_info.SOURCES_DIGEST, which setup.py writes from csrc/ and
    the build's configuration: hashing the 30 MB .so itself took 35 ms here, on every import.
    """
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json")):
                path = os.path.join(directory, name)
                try:
                    with open(path, "rb") as f:
                        digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read())
                except OSError:  # never a reason to fail the import
                    continue
    return digest.hexdigest()[:16]


def tag_compile_caches():
    """Puts `cnnkernels-<install identity>` into torch.compile's cache key tag, once."""
    tag = f"cnnkernels-{install_identity()}"
    current = torch.compiler.config.cache_key_tag
    kept = [part for part in current.split("+") if part and not part.startswith("cnnkernels-")]
    torch.compiler.config.cache_key_tag = "+".join(kept + [tag])
