"""Inference: everything between a trained checkpoint and generated text.

- :mod:`~mobillama.infer.load`: what a model argument is (:func:`~mobillama.infer.load.describe_checkpoint`),
  and loading it for inference (model and tokenizer);
- :mod:`~mobillama.infer.quant`: whole-model int8/int4 weight-only quantization, over the layers of
  :mod:`~mobillama.infer.quant_layers` and the tied embedding of :mod:`~mobillama.infer.quant_embedding`;
  :mod:`~mobillama.infer.quant_checkpoint`: quantized checkpoint directories;
- :mod:`~mobillama.infer.sampling`: sampling parameters, token choice, stop strings;
- :mod:`~mobillama.infer.decoder`: the static-cache fast decode path;
- :mod:`~mobillama.infer.generator`: the one streaming generation loop (text and MobiLlama-V prompts);
- :mod:`~mobillama.infer.chat`: the terminal chat loops;
- :mod:`~mobillama.infer.bench`: speed, memory and bandwidth measurement.

Nothing is re-exported here: importing the package costs nothing until a module is used.
"""
