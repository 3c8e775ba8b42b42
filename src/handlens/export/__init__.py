"""Models that travel: ONNX export (logits and the explanation layer's features), an onnxruntime predictor,
and an offline web page that classifies and explains in the browser."""
