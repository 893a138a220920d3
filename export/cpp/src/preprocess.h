// The manifest's preprocessing: shortest side to the model's size, center crop, /255, mean/std.
#pragma once

#include <nlohmann/json.hpp>

#include "resample.h"

namespace prtool {

struct Preprocess {
  int height = 0, width = 0;         // the model's input size
  std::string interpolation;         // "bicubic" (prtool's default) or "bilinear"
  float mean[3]{}, std[3]{};         // per RGB channel
};

// Reads the manifest's "preprocess" block; refuses a layout, channel order or resize mode this
// program does not implement rather than silently feeding the model something else.
Preprocess preprocess_from_manifest(const nlohmann::json& manifest);

// Resized (shortest side to the model's size, Pillow's rounding and filter) and center-cropped.
Rgb8 resize_and_crop(const Rgb8& image, const Preprocess& pre);

// One image as planar float32 [3, H, W], written to out: (v / 255 - mean) / std, each step in float32.
void to_pixel_values(const Rgb8& cropped, const Preprocess& pre, float* out);

}  // namespace prtool
