#include "manifest.h"

#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <stdexcept>

namespace prtool {

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (f.read(buf.data(), static_cast<std::streamsize>(buf.size())) || f.gcount() > 0)
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(f.gcount()));
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &len);
  std::string hex;
  char two[3];
  for (unsigned int i = 0; i < len; ++i) {
    std::snprintf(two, sizeof two, "%02x", digest[i]);
    hex += two;
  }
  return hex;
}

Manifest load_manifest(const std::string& onnx_path) {
  Manifest m;
  m.onnx_path = onnx_path;
  const auto dot = onnx_path.rfind('.');
  const auto slash = onnx_path.rfind('/');
  m.json_path = (dot != std::string::npos && (slash == std::string::npos || dot > slash) ? onnx_path.substr(0, dot)
                                                                                           : onnx_path) + ".json";
  std::ifstream f(m.json_path);
  if (!f) throw std::runtime_error("no manifest " + m.json_path + " beside " + onnx_path +
                                   ": export with `prtool export`, which writes it");
  try {
    m.doc = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("manifest " + m.json_path + " is not valid JSON: " + e.what());
  }
  const std::string want = m.doc.value("onnx_sha256", std::string());
  const std::string got = sha256_file(onnx_path);
  if (want != got)
    throw std::runtime_error("manifest " + m.json_path + " describes another graph (onnx_sha256 " + want.substr(0, 16) +
                             "... != file's " + got.substr(0, 16) + "...): re-export, or pair the files again");
  for (const auto& out : m.doc.at("outputs")) m.output_names.push_back(out.at("name").get<std::string>());
  if (m.doc.contains("classnames")) m.classnames = m.doc["classnames"].get<std::vector<std::string>>();
  return m;
}

}  // namespace prtool
