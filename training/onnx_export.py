"""Export a PyTorch module to serialized ONNX with fixed input/output names and a dynamic batch axis."""
from __future__ import annotations

import warnings
from typing import Sequence

OPSET = 18


def export_onnx(module, example_inputs: tuple, input_names: Sequence[str], output_name: str) -> bytes:
    """``module`` (run in eval mode, its mode restored after) as ONNX bytes: inputs named ``input_names``
    (axis 0 of each is the dynamic ``batch``), one output named ``output_name``, opset :data:`OPSET`,
    checked by ``onnx.checker``. ``example_inputs`` are tensors of the right shapes (batch >= 2)."""
    import onnx
    import torch

    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            # torch's exporter warns about its own internals (pytree deprecations) and about the shared
            # batch axis name; neither concerns the exported graph.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
            program = torch.onnx.export(module, tuple(example_inputs), dynamo=True, opset_version=OPSET,
                                        verbose=False, input_names=list(input_names), output_names=[output_name],
                                        dynamic_shapes={n: {0: "batch"} for n in input_names})
    finally:
        module.train(was_training)
    proto = program.model_proto
    graph = proto.graph
    if len(graph.input) != len(input_names) or len(graph.output) != 1:
        raise RuntimeError(f"the exported {type(module).__name__} has {len(graph.input)} inputs and "
                           f"{len(graph.output)} outputs, expected {len(input_names)} and 1")
    renames = {old.name: new for old, new in zip(list(graph.input) + list(graph.output), [*input_names, output_name])
               if old.name != new}
    if renames:   # the exporter chose other names: rename them everywhere in the graph
        for v in list(graph.input) + list(graph.output):
            v.name = renames.get(v.name, v.name)
        for node in graph.node:
            node.input[:] = [renames.get(x, x) for x in node.input]
            node.output[:] = [renames.get(x, x) for x in node.output]
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
