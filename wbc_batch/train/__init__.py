"""Training (PyTorch). Imported only by ``wbc-batch train``/``export``: the inference side never needs torch."""
