// An export's manifest (model.json beside model.onnx): read, checked against the graph file.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace prtool {

struct Manifest {
  nlohmann::json doc;
  std::string onnx_path, json_path;
  std::vector<std::string> output_names;  // in the manifest's order
  std::vector<std::string> classnames;    // the columns of "logits", when the export has them
};

// Loads the manifest beside onnx_path and checks that its onnx_sha256 is the file's (a manifest
// describes exactly one graph). Throws with the fix on any mismatch.
Manifest load_manifest(const std::string& onnx_path);

std::string sha256_file(const std::string& path);

}  // namespace prtool
