// Pillow's separable resampling of 8-bit RGB images, reproduced to the pixel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace prtool {

// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
struct Rgb8 {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> data;  // width * height * 3
};

// Resize like Pillow's Image.resize((width, height), filter) on an RGB image: a separable
// convolution (horizontal pass first, only over the rows the vertical pass reads), the filter's
// support widened by the downscale factor (antialiasing), weights in 22-bit fixed point, each
// pass rounded and clipped to uint8. filter: "bicubic" (a = -0.5) or "bilinear".
Rgb8 resize_like_pillow(const Rgb8& in, int width, int height, const std::string& filter);

}  // namespace prtool
