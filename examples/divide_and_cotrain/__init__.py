"""Divide-and-Co-training on Fashion-MNIST: S = 1, 2, 4 small CNNs at equal total parameters, over seeds.

Run from the repository root: ``python -m examples.divide_and_cotrain.train``.
"""
