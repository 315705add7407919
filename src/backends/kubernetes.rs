//! Watch cache of the Kubernetes secret stores (key names only).
