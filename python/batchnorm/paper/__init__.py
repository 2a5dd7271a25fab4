"""Reproduction of Ioffe & Szegedy (2015), "Batch Normalization", at laptop scale: the MNIST
experiment of section 4.1 (Figure 1) and the learning-rate, initialization and overfitting
claims of section 4.2, run with `python -m batchnorm` (see docs/paper.md)."""
