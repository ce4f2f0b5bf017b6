"""The ONNX adapters on onnxruntime: graph building and sessions (``common``), one adapter per
module, timed bodies (``timed``)."""
