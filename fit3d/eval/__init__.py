"""Evaluation of original vs FiT3D fine-tuned features: linear probes (segmentation, depth,
normals), zero-shot multiview correspondence and the before/after report.

Entry point: `python -m fit3d.eval` (see `fit3d.eval.__main__`). Modules: `metrics` (pure metric
functions), `probes` (heads, losses, training loop), `correspondence` (Probe3D protocol),
`features` (extraction and cache), `report` (results.json/md/png, PCA panel).
"""
