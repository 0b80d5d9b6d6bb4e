"""Pure numpy math of the compression methods: arrays in, arrays out, no ONNX."""
