"""The example recipes of pycoe, each a package run as a module from the repository root:

- ``python -m examples.imagenet.train_coe``: the CoE recipe for image classification (Fashion-MNIST offline by
  default, ImageNet folders with torchvision models), and ``python -m examples.imagenet.run_seeds`` to repeat it
  over seeds;
- ``python -m examples.translation.train_translation``: CoE for English-to-Spanish translation of Bible verses;
- ``python -m examples.divide_and_cotrain.train``: Divide-and-Co-training on Fashion-MNIST.

What they share (the Fashion-MNIST reader, the small CNNs, the SWORD Bible reader) is in :mod:`examples.common`.
The examples are not part of the installed ``pycoe`` package: run them from a clone of the repository.
"""
