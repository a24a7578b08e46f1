"""Downstream evaluation of a frozen pre-trained model (zero-shot, retrieval; more protocols follow)."""
