// ONNX Runtime through its C++ API (header-only wrappers over the versioned C API).
#include <onnxruntime_cxx_api.h>

#include "backend.h"

namespace prtool {
namespace {

class OrtBackend : public Backend {
 public:
  OrtBackend(const std::string& onnx_path, int threads) {
    Ort::SessionOptions options;
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    session_ = Ort::Session(env_, onnx_path.c_str(), options);
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < session_.GetOutputCount(); ++i)
      names_.push_back(session_.GetOutputNameAllocated(i, alloc).get());
  }

  std::string describe() const override { return "onnxruntime " + ort_version(); }

  std::vector<Output> run(const float* pixels, const std::array<int64_t, 4>& shape) override {
    const auto mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    const size_t count = static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]);
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, const_cast<float*>(pixels), count, shape.data(), 4);
    const char* input_name = "pixel_values";
    std::vector<const char*> names;
    for (const auto& n : names_) names.push_back(n.c_str());
    auto values = session_.Run(Ort::RunOptions{nullptr}, &input_name, &input, 1, names.data(), names.size());
    std::vector<Output> outs;
    for (size_t i = 0; i < values.size(); ++i) {
      const auto info = values[i].GetTensorTypeAndShapeInfo();
      Output o{names_[i], info.GetShape(), {}, {}};
      const size_t n = info.GetElementCount();
      if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
        const int64_t* p = values[i].GetTensorData<int64_t>();
        o.i64.assign(p, p + n);
      } else {
        const float* p = values[i].GetTensorData<float>();
        o.f32.assign(p, p + n);
      }
      outs.push_back(std::move(o));
    }
    return outs;
  }

 private:
  Ort::Env env_{ORT_LOGGING_LEVEL_WARNING, "prtool-embed"};
  Ort::Session session_{nullptr};
  std::vector<std::string> names_;
};

}  // namespace

std::string ort_version() { return Ort::GetVersionString(); }

std::unique_ptr<Backend> make_ort_backend(const std::string& onnx_path, int threads) {
  return std::make_unique<OrtBackend>(onnx_path, threads);
}

}  // namespace prtool
