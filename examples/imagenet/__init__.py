"""The CoE recipe for image classification: ImageNet folders with torchvision models, or Fashion-MNIST offline.

Run from the repository root: ``python -m examples.imagenet.train_coe`` (the recipe, one run) and
``python -m examples.imagenet.run_seeds`` (one configuration over several seeds). The README of this folder
describes the stages, the options and the outputs; :mod:`examples.imagenet.train_coe` lists the modules.
"""
