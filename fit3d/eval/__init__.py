"""Evaluation of original vs FiT3D fine-tuned features: linear probes (segmentation, depth,
normals), Probe3D's DPT heads, zero-shot multiview correspondence and the before/after report.

Entry point: `python -m fit3d.eval` (see `fit3d.eval.run`). Modules: `data` (the dataset's splits
through `fit3d.datasets.open_dataset`, checked ground truth), `cache` (on-disk memory-mapped
per-view stores), `features` (extraction into the cache, probe inputs), `probes` (heads, losses,
schedules, the training loop), `paper` (FiT3D's protocol: augmentation, slide and flip
inference), `correspondence` (Probe3D's protocol), `metrics` (pure metric functions), `report`
(results.json/md/png, PCA panel) and `html` (results.html).
"""
