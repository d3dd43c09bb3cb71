"""The serving side: a bundle's engine behind the Open Inference Protocol, with batching and metrics.

Needs only the engine's backend (onnxruntime or openvino), never PyTorch.
"""
