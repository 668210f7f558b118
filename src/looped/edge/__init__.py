"""looped.edge: run an exported looped model (`looped export onnx`) on ONNX Runtime, without torch.

    from looped.edge import EdgeModel
    model = EdgeModel("edge/demo")                      # a folder written by `looped export onnx`
    for piece in model.generate("KING HENRY.", loops=8, max_new_tokens=40):
        print(piece.text, end="", flush=True)

What it needs: onnxruntime, numpy and tokenizers (pip install 'looped[edge]'). Importing this package, or
anything it uses, never imports torch; tests/edge checks that with torch blocked.
"""

from looped.edge.decode import Piece
from looped.edge.runtime import EdgeError, EdgeModel

__all__ = ["EdgeError", "EdgeModel", "Piece"]
