"""The sensitivity protocol: how each class's score moves along each direction."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .._data import LabelledData
from .._model import FunctionalModel


class SensitivityEstimator(BaseEstimator):
    """Base class: ``estimate(...) -> ndarray (C, k)``.

    ``S[j, i]`` is the directional derivative of class ``j``'s score along
    ``directions[:, i]`` at ``theta``. Subclasses hold configuration only.
    """

    def estimate(
        self,
        fmodel: FunctionalModel,
        theta: torch.Tensor,
        directions: torch.Tensor,
        data: LabelledData,
        n_classes: int,
        *,
        budget: float,
        batch_size: int,
    ) -> np.ndarray:
        """The sensitivity matrix ``S`` (C, k) at ``theta``.

        Parameters
        ----------
        fmodel : FunctionalModel
            The model as a function of its selected parameters.
        theta : torch.Tensor (D,)
            Where the derivatives are taken.
        directions : torch.Tensor (D, k)
            The spike eigenvectors (columns).
        data : LabelledData
            The sensitivity set (validation data).
        n_classes : int
        budget : float
            The current ``α_max`` (the finite-difference probe may follow it).
        batch_size : int
            Chunk size of every pass over ``data``.

        Returns
        -------
        ndarray (C, k), float64; rows of absent classes are 0.
        """
        raise NotImplementedError


def check_directions(theta: torch.Tensor, directions: Any) -> torch.Tensor:
    if not isinstance(directions, torch.Tensor) or directions.ndim != 2:
        raise ValueError("directions must be a (D, k) tensor.")
    if directions.shape[0] != theta.shape[0]:
        raise ValueError(
            f"directions has {directions.shape[0]} rows; theta has {theta.shape[0]} entries."
        )
    return directions.to(device=theta.device, dtype=theta.dtype)
