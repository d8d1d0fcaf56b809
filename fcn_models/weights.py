"""Reading torch.save files, safely: plain data only, and one clear error for each way the file can be wrong.

    read_state_dict(path)   {name: tensor}, loaded with torch.load(..., weights_only=True)
    read_plain(path)        dicts, lists, tensors, numbers, strings (e.g. a training state), the same way
    refused_global(err)     the Python object a refused pickle asked for ("posix.system"), or None

A file that is empty, truncated or not a PyTorch file, one whose pickle holds other
objects than plain data (which could run code when unpickled: it is refused, never
loaded another way), or one that holds something other than a mapping of names to
tensors gives a ValueError naming the file and what is wrong with it. torch's own
message is not passed on: it suggests loading with weights_only=False or allowlisting
globals.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Union

import torch

# In torch's message when weights_only meets a reference to a Python object (a class,
# a function such as os.system) in the pickle: "GLOBAL posix.system was not an allowed global".
_REFUSED_OBJECT = re.compile(r"GLOBAL (\S+)")


def refused_global(err: BaseException) -> str | None:
    """The object a pickle refused by weights_only asked for, from torch's message; None if it names none."""
    found = _REFUSED_OBJECT.search(str(err))
    return found.group(1) if found else None


def _load(path: Union[str, os.PathLike], map_location, plain: str) -> Any:
    """torch.load with weights_only=True, every failure a ValueError naming the file; `plain`:
    what the file must be instead, for the message when it carries code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the write that made it never finished")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if refused_global(err):
            raise ValueError(
                f"{path} holds Python objects besides tensors, and unpickling those could run code: refused. "
                f"{plain}; replace it with one from a source you trust") from None
        raise ValueError(f"{path} is not a readable PyTorch file (a pickle the tensors-only loader cannot read: damaged, or "
                         "not written by torch.save): replace it") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for broken files
        raise ValueError(f"{path} is not a readable PyTorch file ({type(err).__name__}: truncated, damaged or "
                         "not written by torch.save): replace it") from None


def read_state_dict(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    """The state dict saved at `path`; FileNotFoundError when there is none, ValueError when it is unusable."""
    state = _load(path, map_location, "A weights file must be a plain state dict "
                                      "(torch.save(model.state_dict(), path))")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def read_plain(path: Union[str, os.PathLike], map_location="cpu") -> Any:
    """Plain data saved at `path` (dicts, lists, tensors, numbers, strings); errors as read_state_dict's."""
    return _load(path, map_location, "It must hold only tensors, numbers, strings and dicts or lists of them")
