"""The files moedge writes and reads, defined once: names, format versions, readers and writers.

The lowest layer of the package (it imports nothing above ``moedge._errors``): export and the graph
passes share the node-metadata and graph I/O names here (``graph_names``); the exported folder's file
names, format version and ``config.json`` reader/writer live in ``export_folder``. The bundle
manifest is ``moedge.manifest``.
"""
