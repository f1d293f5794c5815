"""Prediction: a checkpoint's model run on images (`predictor`: `Predictor`, or by the original system's name `MultiTaskPredictor`, which
rebuilds the model from the file alone), and on a list of image files, written as masks and a
table of results that a rerun picks up from (`files`: `predict_files`).
"""

from .files import FileResult, predict_files
from .predictor import MultiTaskPredictor, Prediction, Predictor, normalize

__all__ = ["FileResult", "MultiTaskPredictor", "Prediction", "Predictor", "normalize", "predict_files"]
