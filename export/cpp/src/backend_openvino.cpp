// OpenVINO (CPU plugin, ONNX frontend). On CPUs with bf16 or fp16 units the CPU plugin infers in
// reduced precision by default (about 1e-3 off); FP32 is forced so results match the export's.
#include <openvino/openvino.hpp>

#include "backend.h"

namespace prtool {
namespace {

class OpenVinoBackend : public Backend {
 public:
  OpenVinoBackend(const std::string& onnx_path, int threads) {
    ov::AnyMap config{ov::hint::inference_precision(ov::element::f32)};
    if (threads > 0) config.emplace(ov::inference_num_threads(threads));
    compiled_ = core_.compile_model(core_.read_model(onnx_path), "CPU", config);
    request_ = compiled_.create_infer_request();
  }

  std::string describe() const override {
    return "openvino " + openvino_version();
  }

  std::vector<Output> run(const float* pixels, const std::array<int64_t, 4>& shape) override {
    ov::Shape dims(shape.begin(), shape.end());
    request_.set_tensor("pixel_values", ov::Tensor(ov::element::f32, dims, const_cast<float*>(pixels)));
    request_.infer();
    std::vector<Output> outs;
    for (const auto& port : compiled_.outputs()) {
      const ov::Tensor t = request_.get_tensor(port);
      const ov::Shape s = t.get_shape();
      Output o{port.get_any_name(), std::vector<int64_t>(s.begin(), s.end()), {}, {}};
      const size_t n = t.get_size();
      const auto type = t.get_element_type();
      if (type == ov::element::i64) {
        o.i64.assign(t.data<const int64_t>(), t.data<const int64_t>() + n);
      } else if (type == ov::element::i32) {
        o.i64.assign(t.data<const int32_t>(), t.data<const int32_t>() + n);
      } else {
        o.f32.assign(t.data<const float>(), t.data<const float>() + n);
      }
      outs.push_back(std::move(o));
    }
    return outs;
  }

 private:
  ov::Core core_;
  ov::CompiledModel compiled_;
  ov::InferRequest request_;
};

}  // namespace

std::string openvino_version() { return ov::get_openvino_version().buildNumber; }

std::unique_ptr<Backend> make_openvino_backend(const std::string& onnx_path, int threads) {
  return std::make_unique<OpenVinoBackend>(onnx_path, threads);
}

}  // namespace prtool
