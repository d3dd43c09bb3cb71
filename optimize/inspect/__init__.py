"""What really runs, read from the built engines: every layer's error against the FP32 model
(``optimize explain``). Each engine's precision, layer by layer, is read at build time
(``optimize.targets.coverage``) and shown here beside the errors."""
