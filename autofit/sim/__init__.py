"""The simulation engine: a training step run on fake CPU tensors that imitate CUDA, with every allocation recorded.

It sits beneath the public layer (``autofit.memory`` is its user) and imports nothing from it. Its surface:

- ``arch``: ``ModelSpec`` (an architecture and its exact counts) and building models on ``meta`` (``build``,
  ``with_layers``, ``apply_lora``).
- ``simulate``: ``StepConfig`` (method, quantization, precision, checkpointing, optimizer), ``run`` and ``run_many``
  (cached, parallel) returning a ``Simulation``: the allocation ``Timeline``, its categories and phases.
- ``allocator``: a model of PyTorch's CUDA caching allocator; ``replay`` gives reserved memory for a timeline.
- ``tracker``: the ``TorchDispatchMode`` that records storages; it also measures real CPU runs (tests, probes).
- ``cuda_autocast``, ``attention``, ``kbit``: CUDA's behaviour imitated on the CPU (autocast lists, the attention
  kernel choice, bitsandbytes' 4- and 8-bit layers).
"""
