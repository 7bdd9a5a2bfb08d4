"""The formats the compiler writes and the runtime reads; imports nothing from ``compiler``, ``passes`` or
``runtime``. ``graph``: the shipped program (JSON graph + safetensors tensors)."""
