"""Take a trained PyTorch model to a measured, deployable inference engine.

Importing this package imports no inference backend and no torch: every backend is
imported inside the function that needs it (see ``optimize.targets.registry``).
"""

__version__ = "0.1.0"
