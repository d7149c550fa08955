"""What the examples share, each in its module:

- :mod:`examples.common.fashion_mnist`: reading IDX files and loading Fashion-MNIST offline (the Debian package
  ``dataset-fashion-mnist``);
- :mod:`examples.common.cnn`: the small CNNs the image examples train on a CPU;
- :mod:`examples.common.bible`: reading the English (KJV) and Spanish (Reina-Valera 1909) Bibles offline from
  Debian's SWORD modules, verse by verse with book, chapter and verse number, and as aligned verse pairs;
- :mod:`examples.common.versification`: the KJV versification those modules use (books, chapters, verses, and
  the genre of each book).
"""

from __future__ import annotations

__all__ = ["DataUnavailableError"]


class DataUnavailableError(FileNotFoundError):
    """A data set an example needs is not on this machine; the message says how to install it."""
