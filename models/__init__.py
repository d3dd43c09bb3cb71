"""Reference models: architectures and the scripts that make their real checkpoints.

- ``models.digits``: a small CNN trained on scikit-learn's real handwritten digits.
- ``models.minilm``: the real all-MiniLM-L6-v2 sentence encoder, with English text for calibration.
- ``models.resnet`` and ``models.mobilenet``: standard shapes with random weights, for speed work.
- ``models.zoo``: eleven tiny models of different families (architectures in ``models.zoo_nets``,
  packaged data in ``models.zoo_data``), each with the quality and ONNX operations it must show.
"""
