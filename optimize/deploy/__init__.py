"""Exports for serving at scale: a Triton model repository (``triton``) and Kubernetes/KServe
manifests (``kubernetes``), both written from a bundle."""
