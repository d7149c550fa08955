"""A CoE of Hugging Face BERTs classifying the genre of a Bible verse's book, offline, on the CPU.

Run from the repository root: ``python -m examples.text_classification.train`` (``--smoke`` for a tiny run). The
verses come from :mod:`examples.common.bible`; ``data`` holds the chapter split, the tokenizer and the batches,
``models`` the networks and their FLOPs, ``report`` the numbers and the table.
"""
