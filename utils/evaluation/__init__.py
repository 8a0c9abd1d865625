"""Evaluation: the paper's test protocol (``protocol``), the metrics (``metrics``), the heat maps
and panels (``visualize``) and the threshold calibration (``calibration``). ``metrics``,
``visualize`` and ``calibration`` are pure leaves that any room may use (docs/api.md)."""
