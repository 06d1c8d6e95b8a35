"""Small, reproducible experiments that run normkit's tools on real models and data.

* :mod:`normkit_torch.experiments.digits`: batch norm at test time under synthetic corruptions of
  scikit-learn's digits (standard eval, AdaBN, prediction-time BN and prior mixing at test batch
  sizes 2 to 64, i.i.d. and label-sorted streams); ``python -m normkit_torch.experiments.digits``.

The experiments import scikit-learn and matplotlib only when they run, so importing
``normkit_torch`` (or this package) imports neither.
"""
