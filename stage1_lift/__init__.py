"""Stage 1 of FiT3D: lift backbone features into per-scene 3D Gaussians (python -m stage1_lift)."""
