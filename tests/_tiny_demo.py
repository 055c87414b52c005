"""The tiny demo set the end-to-end tests share (tests/test_pipeline.py, test_families.py,
test_gpu_pipeline.py): one train and one held-out room of 8 views, one probe room, two test
rooms, all 112x84 (token grids 8x6 at p14, 7x5 at p16)."""

TINY_DEMO = [
    "scenes.demo_train=1",
    "scenes.demo_val=1",
    "scenes.demo_views=8",
    "scenes.demo_width=112",
    "scenes.demo_height=84",
    "scenes.demo_probe=1",
    "scenes.demo_probe_views=3",
    "scenes.demo_test=2",
    "scenes.demo_test_views=3",
]
