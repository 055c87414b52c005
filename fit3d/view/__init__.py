"""Interactive 3D viewer of lifted scenes (`python -m fit3d.view RUN_DIR/SCENE`).

`data` computes what is shown (splat geometry, RGB / PCA / similarity colours, picking, cameras)
without a browser; `server.Viewer` serves it with viser; `browser` drives headless Chromium for
pictures and checks; `synthetic` writes generated lifted scenes for tests and benchmarks.
"""
