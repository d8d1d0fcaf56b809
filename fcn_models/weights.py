"""Reading a state-dict file, safely: tensors only, and one clear error for each way the file can be wrong.

    read_state_dict(path)   {name: tensor}, loaded with torch.load(..., weights_only=True)

A file that is empty, truncated or not a PyTorch file, one whose pickle holds other
objects than tensors (which could run code when unpickled: it is refused, never
loaded another way), or one that holds something other than a mapping of names to
tensors gives a ValueError naming the file and what is wrong with it. torch's own
message is not passed on: it suggests loading with weights_only=False.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping, Union

import torch

# In torch's message when weights_only meets a reference to a Python object (a class,
# a function such as os.system) in the pickle.
_REFUSED_OBJECT = "GLOBAL"


def read_state_dict(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    """The state dict saved at `path`; FileNotFoundError when there is none, ValueError when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the write that made it never finished")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if _REFUSED_OBJECT in str(err):
            raise ValueError(
                f"{path} holds Python objects besides tensors, and unpickling those could run code: refused. "
                "A weights file must be a plain state dict (torch.save(model.state_dict(), path)); "
                "replace it with one from a source you trust") from None
        raise ValueError(f"{path} is not a readable PyTorch file (a pickle the tensors-only loader cannot read: damaged, or "
                         "not written by torch.save): replace it") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for broken files
        raise ValueError(f"{path} is not a readable PyTorch file ({type(err).__name__}: truncated, damaged or "
                         "not written by torch.save): replace it") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)
