"""Graph passes: torch program export, ONNX export with parity checks, precision conversion."""
