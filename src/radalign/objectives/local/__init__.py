"""Local (region <-> word / sentence) alignment objectives: GLoRIA, MGCA's token level, LoVT's intra-sample terms.

Each variant is vectorised over the batch with padding masks and is checked against a plain loop reference in
the tests. Shared pieces live in ``common``.
"""
