"""Sidecar injection by annotation: what is done to a pod, the mutating admission webhook that
does it, and the webhook's own certificate (docs/kubernetes.md "Injection by annotation")."""
