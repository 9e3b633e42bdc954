"""The files moedge writes and reads, defined once: names, format versions, readers and writers.

The lowest layer of the package (it imports nothing of moedge but ``_errors`` and the bounded input
reads of ``inputs``; never torch). One module per artifact:

- ``recipe``: the recipe folder (``recipe.json``, ``weights.safetensors``, ``report.md``);
- ``routing``: ``routing.json`` (the recorder calibration uses, ``RoutingStats``, its checks);
- ``export_folder``: the exported folder (file names, format version, ``config.json``'s ``ExportInfo``);
- ``graph_names``: node metadata and graph I/O names that export and the graph passes share;
- ``manifest``: the bundle's ``manifest.json`` (schema, stage I/O names, parsing and file checks);
- ``external_data``: the external-data files an ONNX graph names, read without the onnx package;
- ``placement_plan``: the placement plan file (``moedge profile --plan``).
"""
