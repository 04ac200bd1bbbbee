"""COVIDLesionSegLib — the pure-Python core shared by the CLI, the 3D Slicer module and training.

Never imports ``slicer``, ``qt`` or ``ctk``. Modules: ``models`` (networks and registry),
``preprocessing`` (slice recipe shared with training), ``checkpoints`` (safetensors checkpoints, model
registry, downloads), ``io`` (reading CT, writing segmentations), ``predictor`` (batched inference),
``statistics`` (lesion volume and lung share), ``segments`` (names, colours, terminology), ``cli``.
"""

__version__ = "0.1.0"
