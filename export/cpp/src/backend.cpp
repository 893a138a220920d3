#include "backend.h"

#include <stdexcept>

namespace prtool {

std::string backend_versions_json() {
  std::string out;
#ifdef PRTOOL_WITH_ORT
  out += "\"onnxruntime\": \"" + ort_version() + "\"";
#endif
#ifdef PRTOOL_WITH_OPENVINO
  out += std::string(out.empty() ? "" : ", ") + "\"openvino\": \"" + openvino_version() + "\"";
#endif
  return "{" + out + "}";
}

std::string available_backends() {
  std::string out;
#ifdef PRTOOL_WITH_ORT
  out += "onnxruntime";
#endif
#ifdef PRTOOL_WITH_OPENVINO
  out += out.empty() ? "openvino" : ",openvino";
#endif
  return out;
}

std::unique_ptr<Backend> make_backend(const std::string& kind, const std::string& onnx_path, int threads) {
#ifdef PRTOOL_WITH_ORT
  if (kind == "onnxruntime") return make_ort_backend(onnx_path, threads);
#endif
#ifdef PRTOOL_WITH_OPENVINO
  if (kind == "openvino") return make_openvino_backend(onnx_path, threads);
#endif
  throw std::runtime_error("backend '" + kind + "' is not built in (available: " + available_backends() +
                           "): run export/cpp/setup.sh");
}

}  // namespace prtool
