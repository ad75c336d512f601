"""Fingerprints of tensors by everything that determines their value.

A value's fingerprint hashes its producer (op, domain, attributes), the fingerprints of
the producer's inputs, and for initializers their content. Two graphs give a tensor
the same fingerprint exactly when the computation cone above it is the same, so
cached calibration statistics stay valid across passes that did not touch that cone
and are invalidated by any pass that did.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

# Content digests by tensor object; the tensor is kept alive with its digest so its id
# cannot be reused by another object while the entry exists.
_TENSOR_DIGESTS: dict[int, tuple[object, str]] = {}
_CHUNK_ELEMENTS = 1 << 24


def tensor_digest(tensor: ir.TensorProtocol) -> str:
    """Content hash of a tensor, computed once per tensor object, chunk by chunk."""
    key = id(tensor)
    cached = _TENSOR_DIGESTS.get(key)
    if cached is not None and cached[0] is tensor:
        return cached[1]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    array = np.asarray(tensor.numpy()).reshape(-1)
    for start in range(0, array.size, _CHUNK_ELEMENTS):
        digest.update(np.ascontiguousarray(array[start:start + _CHUNK_ELEMENTS]).tobytes())
    result = digest.hexdigest()
    _TENSOR_DIGESTS[key] = (tensor, result)
    return result


def value_fingerprints(graph: ir.Graph) -> dict[str, str]:
    """Fingerprint of every named value in ``graph`` (inputs, initializers, node outputs)."""
    prints: dict[int, str] = {}
    by_name: dict[str, str] = {}

    def of(value: ir.Value | None) -> str:
        if value is None:
            return "none"
        known = prints.get(id(value))
        if known is not None:
            return known
        if value.const_value is not None:
            text = "init:" + tensor_digest(value.const_value)
        else:
            text = f"input:{value.name}:{value.dtype}:{value.shape}"
        prints[id(value)] = text
        return text

    for value in graph.inputs:
        by_name[value.name] = of(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        attrs = sorted((k, repr(a.value)) for k, a in node.attributes.items())
        head = f"{node.domain}:{node.op_type}:{node.overload}:{attrs}:" + "|".join(of(v) for v in node.inputs)
        node_digest = hashlib.blake2b(head.encode(), digest_size=16).hexdigest()
        for index, output in enumerate(node.outputs):
            prints[id(output)] = f"{node_digest}:{index}"
            if output.name:
                by_name[output.name] = prints[id(output)]
    for name, value in graph.initializers.items():
        by_name[name] = of(value)
    return by_name
