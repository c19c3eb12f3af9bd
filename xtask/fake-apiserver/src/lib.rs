//! An in-process Kubernetes API server (skeleton; being built).
