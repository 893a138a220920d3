// Pillow's resampling (src/libImaging/Resample.c, 8 bits per channel), written from its
// algorithm: the same double-precision weights, the same fixed-point rounding and the same
// clipping, so that the resized pixels are the ones prtool's Python preprocessing feeds the model.
// Build with -ffp-contract=off: a fused multiply-add would change the last bit of a weight.
#include "resample.h"

#include <cmath>
#include <stdexcept>

namespace prtool {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // two spare bits: weights can sum above 1 or below 0

double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double bilinear(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

Filter filter_named(const std::string& name) {
  if (name == "bicubic") return {bicubic, 2.0};
  if (name == "bilinear") return {bilinear, 1.0};
  throw std::runtime_error("unsupported interpolation '" + name + "' (bicubic or bilinear)");
}

// Per output position: the first input index, the number of taps, and ksize fixed-point weights.
struct Taps {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

Taps precompute(int in_size, int out_size, const Filter& f) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);  // Pillow's box is float
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = f.support * filterscale;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = f.fn((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      const double fixed = w * (1 << kPrecisionBits);
      t.weights[static_cast<size_t>(xx) * t.ksize + x] = static_cast<int32_t>(w < 0 ? -0.5 + fixed : 0.5 + fixed);
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

uint8_t clip8(int32_t acc) {
  if (acc < 0) return 0;
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v > 255 ? 255 : v);
}

// One pass along x (step 3) or y (step 3 * width): out[o] = sum_k in[first + k] * w[k].
// rows/cols: the output's size; src_row0: the first input row the pass reads.
Rgb8 pass(const Rgb8& in, int out_w, int out_h, int src_row0, const Taps& t, bool horizontal) {
  Rgb8 out{out_w, out_h, std::vector<uint8_t>(static_cast<size_t>(out_w) * out_h * 3)};
  const size_t stride = horizontal ? 3 : static_cast<size_t>(in.width) * 3;
  for (int y = 0; y < out_h; ++y) {
    for (int x = 0; x < out_w; ++x) {
      const int o = horizontal ? x : y;
      const int32_t* w = &t.weights[static_cast<size_t>(o) * t.ksize];
      const uint8_t* src = horizontal
          ? &in.data[(static_cast<size_t>(y + src_row0) * in.width + t.first[o]) * 3]
          : &in.data[(static_cast<size_t>(t.first[o]) * in.width + x) * 3];
      for (int c = 0; c < 3; ++c) {
        int32_t acc = 1 << (kPrecisionBits - 1);
        for (int i = 0; i < t.count[o]; ++i) acc += static_cast<int32_t>(src[i * stride + c]) * w[i];
        out.data[(static_cast<size_t>(y) * out_w + x) * 3 + c] = clip8(acc);
      }
    }
  }
  return out;
}

}  // namespace

Rgb8 resize_like_pillow(const Rgb8& in, int width, int height, const std::string& filter) {
  if (width <= 0 || height <= 0 || in.width <= 0 || in.height <= 0) throw std::runtime_error("empty image size");
  const Filter f = filter_named(filter);
  Taps vert = precompute(in.height, height, f);
  const int row_first = vert.first[0];
  const int row_last = vert.first[height - 1] + vert.count[height - 1];
  const bool need_h = width != in.width, need_v = height != in.height;
  Rgb8 tmp;
  const Rgb8* src = &in;
  if (need_h) {  // only the rows the vertical pass reads
    for (int& first : vert.first) first -= row_first;
    tmp = pass(in, width, row_last - row_first, row_first, precompute(in.width, width, f), true);
    src = &tmp;
  }
  if (!need_v) return *src;
  return pass(*src, src->width, height, 0, vert, false);
}

}  // namespace prtool
