"""Inference: the runtime seam (``runtime``: PyTorch; ``onnx_runtime``: ONNX Runtime), the
prediction service (``prediction``) and what it writes (``outputs``)."""
