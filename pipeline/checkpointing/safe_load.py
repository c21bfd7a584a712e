"""Loading tensor files without unpickling arbitrary objects.

`torch.load` runs pickle; a crafted `.pt` file can execute code while it is read. Every `.pt` file
this project reads goes through `load_tensors`, which uses `weights_only=True` (tensors, plain
containers and numbers only) and turns every refusal or corruption into one line naming the file.
Weights themselves are safetensors, which holds no code at all.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from pipeline.errors import first_line


def load_tensors(path: str | Path, map_location: str | None = "cpu") -> object:
    """`torch.load(path, weights_only=True)`; a ValueError with one line if the file is refused or unreadable."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "nsupported" in line), "")
        raise ValueError(f"refusing to load '{path}': it holds pickled objects other than tensors, which could run "
                         f"code (torch.load weights_only=True){'; ' + found if found else ''}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, ImportError) as exc:
        first = first_line(exc)
        raise ValueError(f"cannot read '{path}' as a tensor file: {first}") from None
