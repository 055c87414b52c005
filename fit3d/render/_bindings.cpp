// Python bindings of the CPU kernels (`_project.cpp`, `_composite.cpp`).

#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats,
                                           torch::Tensor scales, torch::Tensor opacities,
                                           torch::Tensor viewmats, torch::Tensor Ks,
                                           int64_t width, int64_t height, double near,
                                           double far, double eps2d);
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats,
                                            torch::Tensor scales, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height,
                                            double eps2d, torch::Tensor camera_ids,
                                            torch::Tensor gaussian_ids, torch::Tensor conics,
                                            torch::Tensor v_means2d, torch::Tensor v_conics,
                                            torch::Tensor v_depths);
std::vector<torch::Tensor> intersect_tiles(torch::Tensor means2d, torch::Tensor radii,
                                           torch::Tensor depths, torch::Tensor camera_ids,
                                           int64_t n_cams, int64_t tiles_x, int64_t tiles_y);
std::vector<torch::Tensor> composite_forward(torch::Tensor means2d, torch::Tensor conics,
                                             torch::Tensor opacities, torch::Tensor colors,
                                             torch::Tensor radii, torch::Tensor flatten_ids,
                                             torch::Tensor offsets, int64_t n_cams,
                                             int64_t width, int64_t height, int64_t tiles_x,
                                             int64_t tiles_y);
std::vector<torch::Tensor> composite_backward(torch::Tensor means2d, torch::Tensor conics,
                                              torch::Tensor opacities, torch::Tensor colors,
                                              torch::Tensor radii, torch::Tensor flatten_ids,
                                              torch::Tensor offsets, torch::Tensor trans,
                                              torch::Tensor last, torch::Tensor v_out,
                                              torch::Tensor v_alpha, int64_t n_cams,
                                              int64_t width, int64_t height, int64_t tiles_x,
                                              int64_t tiles_y, int64_t geo_channels);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_forward", &project_forward, "EWA projection, packed visible entries");
  m.def("project_backward", &project_backward, "EWA projection backward");
  m.def("intersect_tiles", &intersect_tiles, "16x16 tile binning, depth-sorted per tile");
  m.def("composite_forward", &composite_forward, "tile compositor forward");
  m.def("composite_backward", &composite_backward, "tile compositor backward");
}
