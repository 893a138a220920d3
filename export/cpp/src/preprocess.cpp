#include "preprocess.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace prtool {
namespace {

void require(const nlohmann::json& pre, const char* key, const std::string& expected) {
  if (pre.contains(key) && pre[key].get<std::string>() != expected)
    throw std::runtime_error(std::string("manifest preprocess.") + key + " is '" + pre[key].get<std::string>() +
                             "': this program implements only '" + expected + "'");
}

// Python's round(): to nearest, ties to even (the default floating-point rounding mode).
int round_half_even(double v) { return static_cast<int>(std::nearbyint(v)); }

}  // namespace

Preprocess preprocess_from_manifest(const nlohmann::json& manifest) {
  if (!manifest.contains("preprocess")) throw std::runtime_error("manifest has no 'preprocess' block");
  const auto& pre = manifest["preprocess"];
  require(pre, "channel_order", "RGB");
  require(pre, "layout", "NCHW");
  require(pre, "resize_mode", "shortest");
  Preprocess p;
  p.height = pre.at("image_size").at(0).get<int>();
  p.width = pre.at("image_size").at(1).get<int>();
  p.interpolation = pre.value("interpolation", std::string("bicubic"));
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = pre.at("mean").at(c).get<float>();
    p.std[c] = pre.at("std").at(c).get<float>();
  }
  return p;
}

Rgb8 resize_and_crop(const Rgb8& image, const Preprocess& pre) {
  if (image.width == pre.width && image.height == pre.height) return image;
  const double scale = std::max(static_cast<double>(pre.height) / image.height,
                                static_cast<double>(pre.width) / image.width);
  const int w = std::max(pre.width, round_half_even(image.width * scale));
  const int h = std::max(pre.height, round_half_even(image.height * scale));
  const Rgb8 resized = resize_like_pillow(image, w, h, pre.interpolation);
  const int left = (w - pre.width) / 2, top = (h - pre.height) / 2;
  Rgb8 out{pre.width, pre.height, std::vector<uint8_t>(static_cast<size_t>(pre.width) * pre.height * 3)};
  for (int y = 0; y < pre.height; ++y) {
    const uint8_t* row = &resized.data[(static_cast<size_t>(y + top) * w + left) * 3];
    std::copy(row, row + pre.width * 3, &out.data[static_cast<size_t>(y) * pre.width * 3]);
  }
  return out;
}

void to_pixel_values(const Rgb8& cropped, const Preprocess& pre, float* out) {
  const size_t plane = static_cast<size_t>(pre.width) * pre.height;
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      const float x = static_cast<float>(cropped.data[i * 3 + c]) / 255.0f;
      out[c * plane + i] = (x - pre.mean[c]) / pre.std[c];
    }
  }
}

}  // namespace prtool
