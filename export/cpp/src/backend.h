// One interface, two engines: ONNX Runtime's C++ API and OpenVINO (FP32 forced).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace prtool {

struct Output {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> f32;    // float outputs (image_embeds, logits)
  std::vector<int64_t> i64;  // integer outputs (kept_patch_indices)
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Engine and version, e.g. "onnxruntime 1.32.0".
  virtual std::string describe() const = 0;
  // Runs pixel_values [N, 3, H, W] (float32, planar) and returns every graph output, by name.
  virtual std::vector<Output> run(const float* pixels, const std::array<int64_t, 4>& shape) = 0;
};

// kind: "onnxruntime" or "openvino"; threads <= 0 leaves the engine's default.
std::unique_ptr<Backend> make_backend(const std::string& kind, const std::string& onnx_path, int threads);

// The backends this binary was built with, comma-separated.
std::string available_backends();

// {"backend": "engine version", ...} for the backends built in (no model needed).
std::string backend_versions_json();

// Each backend's own file (built in when its PRTOOL_WITH_* is defined).
std::unique_ptr<Backend> make_ort_backend(const std::string& onnx_path, int threads);
std::string ort_version();
std::unique_ptr<Backend> make_openvino_backend(const std::string& onnx_path, int threads);
std::string openvino_version();

}  // namespace prtool
