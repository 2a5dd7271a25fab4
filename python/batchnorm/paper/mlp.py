"""The network of the paper's MNIST experiment (section 4.1): fully connected hidden layers of
sigmoid units and a softmax output, in NumPy float32, optionally with batch normalization
before each sigmoid. Every batch-norm step runs on the library's kernels (batchnorm.BatchNorm)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

import batchnorm


def sigmoid(z: np.ndarray) -> np.ndarray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-z)) for large negative z, which the
    # runs with a 30x learning rate and no batch norm reach.
    return np.tanh(z * np.float32(0.5)) * np.float32(0.5) + np.float32(0.5)


class MLP:
    """sizes = (inputs, hidden..., classes). With batch norm, a hidden layer computes
    sigmoid(BN(x W)): BN's shift makes the layer's own bias redundant (paper, section 3.2),
    so only the output layer keeps one. The same seed gives the same weights with and
    without batch norm, so that paired runs differ in batch norm alone."""

    def __init__(self, sizes: Sequence[int], *, batch_norm: bool, init_std: float, rng: np.random.Generator):
        self.batch_norm = batch_norm
        self.weights = [
            (rng.standard_normal((n_in, n_out)) * init_std).astype(np.float32)
            for n_in, n_out in zip(sizes[:-1], sizes[1:])
        ]
        hidden = len(sizes) - 2
        self.biases: List[Optional[np.ndarray]] = [
            None if (batch_norm and i < hidden) else np.zeros(n, np.float32) for i, n in enumerate(sizes[1:])
        ]
        # (N, 100) activations with the channel on axis 1; the library's kernels do every
        # normalization, its backward and, in evaluation, the running-statistics map.
        self.norms = [batchnorm.BatchNorm(n, axis=1) for n in sizes[1:-1]] if batch_norm else []
        self._cache: Optional[Tuple[List[np.ndarray], List[np.ndarray]]] = None

    def train(self, mode: bool = True) -> "MLP":
        for norm in self.norms:
            norm.train(mode)
        return self

    def forward(self, x: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Logits, and the sigmoid inputs of every hidden layer (what Figure 1 (b, c) plots)."""
        outputs = [x]
        sigmoid_inputs = []
        for i in range(len(self.weights) - 1):
            z = outputs[-1] @ self.weights[i]
            if self.batch_norm:
                z = self.norms[i](z)
            else:
                z += self.biases[i]
            sigmoid_inputs.append(z)
            outputs.append(sigmoid(z))
        logits = outputs[-1] @ self.weights[-1] + self.biases[-1]
        self._cache = (outputs, sigmoid_inputs)
        return logits, sigmoid_inputs

    def sgd_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One step of plain SGD on the mean cross-entropy of the mini-batch (x, y); returns
        that loss, before the step (not finite once the network has diverged)."""
        logits, _ = self.forward(x)
        outputs, _ = self._cache
        rows = np.arange(len(y))
        # Softmax cross-entropy and its gradient (softmax - one_hot) / N, from max-shifted logits.
        shifted = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        total = p.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
        p /= total
        p[rows, y] -= 1
        grad = p * np.float32(1 / len(y))
        lr = np.float32(lr)
        for i in reversed(range(len(self.weights))):
            below = outputs[i]
            if i < len(self.weights) - 1:
                h = outputs[i + 1]
                grad = grad * h * (1 - h)  # through the sigmoid
                if self.batch_norm:
                    norm = self.norms[i]
                    norm.zero_grad()
                    grad = norm.backward(grad)
                    norm.weight -= lr * norm.grad_weight
                    norm.bias -= lr * norm.grad_bias
            grad_below = grad @ self.weights[i].T if i > 0 else None
            self.weights[i] -= lr * (below.T @ grad)
            if self.biases[i] is not None:
                self.biases[i] -= lr * grad.sum(axis=0)
            grad = grad_below
        return loss

    def predict(self, x: np.ndarray, batch: int = 2000) -> Tuple[np.ndarray, np.ndarray]:
        """Inference (running statistics for batch norm): class predictions and the sigmoid
        inputs of the last hidden layer, in batches to bound memory on full MNIST."""
        self.train(False)
        labels, last = [], []
        for start in range(0, len(x), batch):
            logits, sigmoid_inputs = self.forward(x[start : start + batch])
            labels.append(logits.argmax(axis=1))
            last.append(sigmoid_inputs[-1])
        self.train(True)
        return np.concatenate(labels), np.concatenate(last)
