"""The slow, obvious implementation of NIO.md and GRADINIT.md, written straight from the text.

Whole-batch forward, one autograd call per chunk, the Gram by explicit dot products, scale
updates one tensor at a time with Python floats. Every fast path is held equal to this; the
benchmarks time it as "the reference".
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def spec_modes(model):
    """NIO.md step 1, done by hand: eval, BatchNorm on batch statistics, buffers untouched."""
    flags = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    model.eval()
    for m, _ in norms:
        m.train()
        m.track_running_stats = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        for m, flag in norms:
            m.track_running_stats = flag


def spec_chunks(num, num_chunks, overlap):
    length = num // num_chunks
    chunks = []
    for k in range(num_chunks):
        start = 0 if k == 0 else int(math.floor((1 - overlap) * length * k))
        end = num if k == num_chunks - 1 else int(math.floor((1 + overlap) * length * (k + 1)))
        chunks.append((start, end))
    return chunks


def reference_gradcosine(model, inputs, targets, loss_fn, params, num_chunks, overlap):
    """(GradCosine, gnorm, norms list, Gram list of lists), differentiable w.r.t. params."""
    outputs = model(inputs)
    grads = []
    for start, end in spec_chunks(len(targets), num_chunks, overlap):
        loss = loss_fn(outputs[start:end], targets[start:end])
        g = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if gp is None else gp for gp, p in zip(g, params)])
    gram = [[sum((gi * gj).sum() for gi, gj in zip(grads[i], grads[j])) for j in range(num_chunks)]
            for i in range(num_chunks)]
    norms = [torch.sqrt(gram[k][k]) for k in range(num_chunks)]
    total = 0
    for i in range(num_chunks):
        for j in range(num_chunks):
            if i != j:
                total = total + gram[i][j] / (norms[i] * norms[j])
    gradcosine = total / (num_chunks * (num_chunks - 1))
    gnorm = sum(norms) / num_chunks
    return gradcosine, gnorm, norms, gram


class ReferenceScales:
    """NIO.md steps 3-5, one tensor at a time, in Python floats."""

    def __init__(self, names, params, lr, min_scale, grad_clip):
        self.params = params
        self.lr, self.grad_clip = lr, grad_clip
        self.init_norm = [float(p.detach().norm()) for p in params]
        self.direction = [p.detach().clone() / n if n > 0 else None for p, n in zip(params, self.init_norm)]
        self.lower = [0.0 if name.endswith("bias") else min_scale for name in names]
        count = len(params)
        self.alpha = [1.0] * count
        self.m = {"c": [0.0] * count, "o": [0.0] * count}
        self.v = [0.0] * count
        self.t = {"c": 0, "o": 0}

    def step(self, grads, kind):
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.t[kind] += 1
        for p, (param, g) in enumerate(zip(self.params, grads)):
            if self.init_norm[p] == 0:
                continue
            g = torch.zeros_like(param) if g is None else g
            s = float((g * param.detach()).sum()) * self.init_norm[p] / float(param.detach().norm())
            if self.grad_clip is not None:
                s = max(-self.grad_clip, min(self.grad_clip, s))
            self.m[kind][p] = b1 * self.m[kind][p] + (1 - b1) * s
            self.v[p] = b2 * self.v[p] + (1 - b2) * s * s
            m_hat = self.m[kind][p] / (1 - b1 ** self.t[kind])
            v_hat = self.v[p] / (1 - b2 ** (self.t["c"] + self.t["o"]))
            self.alpha[p] = max(self.alpha[p] - self.lr * m_hat / (math.sqrt(v_hat) + eps), self.lower[p])
            with torch.no_grad():
                param.copy_(self.alpha[p] * self.init_norm[p] * self.direction[p])


def reference_nio(model, batches, loss_fn, names, params, *, iters, sub_batches=2, overlap=0.0, gamma=None,
                  lr=0.05, min_scale=0.01, grad_clip=1.0, objective="gc", mu=1.0):
    """Returns (scales list, history list of dicts)."""
    scales = ReferenceScales(names, params, lr, min_scale, grad_clip)
    history = []
    with spec_modes(model):
        for it in range(iters):
            inputs, targets = batches[it % len(batches)]
            gc, gnorm, norms, _ = reference_gradcosine(model, inputs, targets, loss_fn, params, sub_batches,
                                                       overlap)
            if gamma is None:
                gamma = float(gnorm.detach())
            if float(gnorm.detach()) > gamma:
                kind, target = "c", gnorm
            else:
                kind = "o"
                target = -gc
                if objective == "gc_gn":
                    target = target - mu * sum(n ** 2 for n in norms)
                elif objective == "gc_gn_sqrt":
                    target = target - mu * sum(norms)
            grads = torch.autograd.grad(target, params, allow_unused=True)
            history.append({"gradcosine": float(gc.detach()), "gnorm": float(gnorm.detach()),
                            "constraint": kind == "c", "objective": float(target.detach())})
            scales.step(grads, kind)
    return scales.alpha, history


def reference_gradinit(model, batches, loss_fn, names, params, *, iters, gamma=None, lr=0.05, min_scale=0.01,
                       grad_clip=1.0, inner="sgd", eta=0.1):
    """GRADINIT.md, with three batches A, B, C drawn per iteration in order."""
    scales = ReferenceScales(names, params, lr, min_scale, grad_clip)
    history = []
    cursor = 0

    def draw():
        nonlocal cursor
        batch = batches[cursor % len(batches)]
        cursor += 1
        return batch

    with spec_modes(model):
        for _ in range(iters):
            a, b, c = draw(), draw(), draw()
            loss = loss_fn(model(torch.cat([a[0], b[0]])), torch.cat([a[1], b[1]]))
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if gp is None else gp for gp, p in zip(g, params)]
            if inner == "adam":
                norm = sum(gp.abs().sum() for gp in g)
            else:
                norm = torch.sqrt(sum((gp * gp).sum() for gp in g))
            if gamma is None:
                gamma = float(norm.detach())
            if float(norm.detach()) > gamma:
                kind, target = "c", norm
            else:
                kind = "o"
                if inner == "adam":
                    steps = [eta * gp.detach().sign() for gp in g]
                else:
                    steps = [eta * gp.detach() / float(norm.detach()) for gp in g]
                stepped = {name: p - s for name, p, s in zip(names, params, steps)}
                out = torch.func.functional_call(model, stepped, (torch.cat([a[0], c[0]]),))
                target = loss_fn(out, torch.cat([a[1], c[1]])) / eta
            grads = torch.autograd.grad(target, params, allow_unused=True)
            history.append({"loss": float(loss.detach()), "gnorm": float(norm.detach()),
                            "constraint": kind == "c", "objective": float(target.detach())})
            scales.step(grads, kind)
    return scales.alpha, history
