// prtool-embed: embeds images with a prtool export, preprocessing them as its manifest says.
//
//   prtool-embed MODEL.onnx IMAGE... [--backend onnxruntime|openvino] [--batch N] [--threads N]
//                [--out FILE] [--dump-pixels FILE]
//   prtool-embed --version      # {"onnxruntime": "1.32.0", "openvino": "..."}: the engines built in
//
// Writes one JSON document: per image its image_embeds, and kept_patch_indices / logits with the
// top-5 class names when the export has them. Errors: one line on stderr, exit 1 (2: bad usage).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <stdexcept>

#include "backend.h"
#include "image_io.h"
#include "manifest.h"
#include "preprocess.h"

namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string model, backend = "onnxruntime", out, dump_pixels;
  std::vector<std::string> images;
  int batch = 8, threads = 0;
};

const char* kUsage =
    "usage: prtool-embed MODEL.onnx IMAGE... [--backend onnxruntime|openvino] [--batch N] [--threads N]\n"
    "                    [--out FILE] [--dump-pixels FILE]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int parse_int(const std::string& option, const std::string& text) {
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw UsageError(option + " needs an integer, not '" + text + "'");
  return value;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "backends built in: " << prtool::available_backends() << "\n";
      std::exit(0);
    } else if (arg == "--version") {
      std::cout << prtool::backend_versions_json() << "\n";
      std::exit(0);
    } else if (arg == "--backend") {
      a.backend = value();
    } else if (arg == "--batch") {
      a.batch = parse_int(arg, value());
    } else if (arg == "--threads") {
      a.threads = parse_int(arg, value());
    } else if (arg == "--out") {
      a.out = value();
    } else if (arg == "--dump-pixels") {
      a.dump_pixels = value();
    } else if (arg.rfind("--", 0) == 0) {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) throw UsageError("give a model and at least one image");
  if (a.batch < 1) throw UsageError("--batch must be >= 1");
  a.model = positional[0];
  a.images.assign(positional.begin() + 1, positional.end());
  return a;
}

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// The JSON entry of image i of a batch: every output's row, plus the top-5 classes of the logits.
Json image_entry(const std::vector<prtool::Output>& outs, size_t i, const std::vector<std::string>& classnames) {
  Json e;
  for (const auto& o : outs) {
    const size_t row = static_cast<size_t>(o.shape.size() > 1 ? o.shape[1] : 1);
    if (!o.i64.empty()) {
      e[o.name] = std::vector<int64_t>(o.i64.begin() + i * row, o.i64.begin() + (i + 1) * row);
      continue;
    }
    std::vector<float> v(o.f32.begin() + i * row, o.f32.begin() + (i + 1) * row);
    if (o.name == "logits") {
      std::vector<size_t> order(v.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return v[x] > v[y]; });
      Json top = Json::array();
      for (size_t k = 0; k < std::min<size_t>(5, order.size()); ++k) {
        const size_t c = order[k];
        top.push_back({{"index", c}, {"class", c < classnames.size() ? classnames[c] : std::to_string(c)},
                       {"logit", v[c]}});
      }
      e["top5"] = top;
    }
    e[o.name] = v;
  }
  return e;
}

int run(const Args& args) {
  auto t0 = Clock::now();
  const prtool::Manifest manifest = prtool::load_manifest(args.model);
  const prtool::Preprocess pre = prtool::preprocess_from_manifest(manifest.doc);
  auto backend = prtool::make_backend(args.backend, args.model, args.threads);
  const double load_ms = ms_since(t0);
  const size_t per_image = static_cast<size_t>(3) * pre.height * pre.width;
  std::ofstream dump;
  if (!args.dump_pixels.empty()) dump.open(args.dump_pixels, std::ios::binary);
  Json images = Json::array();
  double pre_ms = 0, infer_ms = 0;
  for (size_t start = 0; start < args.images.size(); start += args.batch) {
    const size_t n = std::min<size_t>(args.batch, args.images.size() - start);
    std::vector<float> pixels(n * per_image);
    std::vector<std::array<int, 2>> sizes;
    t0 = Clock::now();
    for (size_t i = 0; i < n; ++i) {
      const prtool::Rgb8 img = prtool::read_image(args.images[start + i]);
      sizes.push_back({img.width, img.height});
      prtool::to_pixel_values(prtool::resize_and_crop(img, pre), pre, &pixels[i * per_image]);
    }
    pre_ms += ms_since(t0);
    if (dump) dump.write(reinterpret_cast<const char*>(pixels.data()), static_cast<std::streamsize>(pixels.size() * 4));
    t0 = Clock::now();
    const auto outs = backend->run(pixels.data(), {static_cast<int64_t>(n), 3, pre.height, pre.width});
    infer_ms += ms_since(t0);
    for (size_t i = 0; i < n; ++i) {
      Json e = image_entry(outs, i, manifest.classnames);
      e["path"] = args.images[start + i];
      e["size"] = sizes[i];
      images.push_back(std::move(e));
    }
  }
  const Json doc = {{"model", args.model}, {"manifest", manifest.json_path}, {"backend", backend->describe()},
                    {"onnx_sha256", manifest.doc["onnx_sha256"]}, {"batch", args.batch},
                    {"timing_ms", {{"load", load_ms}, {"preprocess", pre_ms}, {"infer", infer_ms}}},
                    {"images", images}};
  if (args.out.empty()) {
    std::cout << doc.dump() << "\n";
  } else {
    const std::string tmp = args.out + ".tmp";
    std::ofstream(tmp) << doc.dump() << "\n";
    if (std::rename(tmp.c_str(), args.out.c_str()) != 0) throw std::runtime_error("cannot write " + args.out);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "prtool-embed: error: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    return run(args);
  } catch (const std::exception& e) {
    std::cerr << "prtool-embed: error: " << e.what() << "\n";
    return 1;
  }
}
