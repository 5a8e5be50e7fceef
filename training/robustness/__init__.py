"""Robustness and generalization: does the model see the disease, or the hospital?

- :mod:`training.robustness.populations` — who is a child, which images come from which hospital,
  and what a held-out source is tested against;
- :mod:`training.robustness.loso` — leave-one-source-out training and evaluation (``make loso``);
- :mod:`training.robustness.mitigations` — shortcut mitigations as config, compared on LOSO;
- :mod:`training.robustness.perturb` — graded image perturbations before preprocessing (``make perturb``);
- :mod:`training.robustness.shortcuts` — source/age probes, lung masking, Grad-CAM outside the chest
  (``make shortcuts``).

Settings live in ``configs/robustness.yaml`` (:class:`training.robustness.config.RobustnessConfig`);
reports are written under ``reports/robustness/`` by the commands that measure them.
"""
