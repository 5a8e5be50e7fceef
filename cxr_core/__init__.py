"""Shared core of cxr-screen: what training and serving must agree on.

Preprocessing, model definitions, calibration, policy, explanation and the bundle format live
here and nowhere else. Nothing in this package knows about HTTP, MLflow or Ray.
"""

__version__ = "0.1.0"
