"""CoE for translation: English to Spanish Bible verses, offline, on the CPU.

Run from the repository root: ``python -m examples.translation.train_translation``. The verses come from
:mod:`examples.common.bible`; ``text`` holds the tokeniser and BLEU, ``models`` the networks.
"""
