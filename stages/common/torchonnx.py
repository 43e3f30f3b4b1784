"""An ONNX file as a torch module, for the ``safety`` stage's torch engine.

Why a module: onnx2torch (1.5.15) converts the graphs these detectors use,
with one gap. It looks a convolution's weights up among the graph's
*initializers*, while paddle2onnx (which exported PP-OCRv4's detector) stores
every weight as a ``Constant`` node. :func:`load` moves each such constant
into the initializers first (same name, same tensor; the graph computes the
same function), then converts. The file is read as data (protobuf); the torch
module is built from the graph's operators by onnx2torch, no code from the
file runs.

The model's metadata (an Ultralytics export's class ``names``) comes back
beside the module, as ONNX Runtime's ``custom_metadata_map`` has it.
"""

from __future__ import annotations


def lift_constants(model) -> int:
    """Move every ``Constant`` node that holds a tensor (its ``value``
    attribute) into the graph's initializers; returns how many moved."""
    import onnx

    kept, moved = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return moved


def load(path: str):
    """``(module, metadata)``: the ONNX file at ``path`` as an eval-mode
    torch module on the CPU, and its metadata properties."""
    import warnings

    import onnx
    from onnx2torch import convert

    # onnx2torch's Slice indexes with a list of slices, which torch (2.11-2.14) still reads as a tuple
    # and warns about at every worker's first call; tests/stages/test_safety_engines.py compares the results
    # with ONNX Runtime's, so a torch that changes the meaning fails there, not silently
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    model = onnx.load(path)
    lift_constants(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    with warnings.catch_warnings():
        # onnx2torch warns that its converted Resize/Slice "may differ" from ONNX's in corner cases;
        # tests/stages/test_safety_engines.py compares the outputs with ONNX Runtime's instead
        warnings.simplefilter("ignore")
        module = convert(model)
    return module.eval(), metadata
