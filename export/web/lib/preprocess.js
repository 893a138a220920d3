// The manifest's preprocessing in JavaScript, pixel for pixel as prtool's Python (Pillow) does it:
// shortest side to the model's size with Pillow's separable resampling (support widened by the
// downscale factor, 22-bit fixed-point weights, each pass rounded and clipped to uint8), center
// crop, then (v / 255 - mean) / std in float32. Same arithmetic as export/cpp/src/resample.cpp.
// Browser and Node import this module alike.

const PRECISION_BITS = 22;

function bicubic(x) {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function bilinear(x) {
  if (x < 0) x = -x;
  return x < 1 ? 1 - x : 0;
}

const FILTERS = { bicubic: [bicubic, 2.0], bilinear: [bilinear, 1.0] };

// Per output position: first input index, tap count, ksize fixed-point weights.
function precompute(inSize, outSize, [fn, filterSupport]) {
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = filterSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize), count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      k[x] = fn((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      const fixed = w * (1 << PRECISION_BITS);
      weights[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + fixed : 0.5 + fixed);
    }
    first[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, first, count, weights };
}

function clip8(acc) {
  if (acc < 0) return 0;
  const v = acc >> PRECISION_BITS;
  return v > 255 ? 255 : v;
}

// One pass along x (horizontal) or y over an RGB image; rowOffset: first input row read.
function pass(img, outW, outH, rowOffset, taps, horizontal) {
  const out = new Uint8Array(outW * outH * 3);
  const stride = horizontal ? 3 : img.width * 3;
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const o = horizontal ? x : y;
      const w0 = o * taps.ksize, n = taps.count[o];
      const base = horizontal ? ((y + rowOffset) * img.width + taps.first[o]) * 3 : (taps.first[o] * img.width + x) * 3;
      for (let c = 0; c < 3; c++) {
        let acc = 1 << (PRECISION_BITS - 1);
        for (let i = 0; i < n; i++) acc += img.data[base + i * stride + c] * taps.weights[w0 + i];
        out[(y * outW + x) * 3 + c] = clip8(acc);
      }
    }
  }
  return { width: outW, height: outH, data: out };
}

// Pillow's Image.resize((width, height), filter) of an RGB image {width, height, data: Uint8Array HWC}.
export function resizeLikePillow(img, width, height, filter = "bicubic") {
  if (!(filter in FILTERS)) throw new Error(`unsupported interpolation '${filter}' (bicubic or bilinear)`);
  const f = FILTERS[filter];
  const vert = precompute(img.height, height, f);
  const rowFirst = vert.first[0];
  const rowLast = vert.first[height - 1] + vert.count[height - 1];
  let src = img;
  if (width !== img.width) {
    for (let i = 0; i < height; i++) vert.first[i] -= rowFirst;
    src = pass(img, width, rowLast - rowFirst, rowFirst, precompute(img.width, width, f), true);
  }
  return height !== img.height ? pass(src, src.width, height, 0, vert, false) : src;
}

// Python's round(): nearest, ties to even.
function roundHalfEven(v) {
  const f = Math.floor(v), d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

function checkPreprocess(pre) {
  const expect = { channel_order: "RGB", layout: "NCHW", resize_mode: "shortest" };
  for (const [key, value] of Object.entries(expect)) {
    if (key in pre && pre[key] !== value) throw new Error(`manifest preprocess.${key} is '${pre[key]}': only '${value}' is implemented`);
  }
}

// Shortest side to the model's size, then the center crop: the RGB image the model sees.
export function resizeAndCrop(img, pre) {
  checkPreprocess(pre);
  const [h, w] = pre.image_size;
  if (img.width === w && img.height === h) return img;
  const scale = Math.max(h / img.height, w / img.width);
  const nw = Math.max(w, roundHalfEven(img.width * scale)), nh = Math.max(h, roundHalfEven(img.height * scale));
  const resized = resizeLikePillow(img, nw, nh, pre.interpolation || "bicubic");
  const left = Math.floor((nw - w) / 2), top = Math.floor((nh - h) / 2);
  const data = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) data.set(resized.data.subarray(((y + top) * nw + left) * 3, ((y + top) * nw + left + w) * 3), y * w * 3);
  return { width: w, height: h, data };
}

// The cropped RGB image as planar float32 [3, H, W] written into out at offset.
export function toPixelValues(img, pre, out = new Float32Array(3 * img.width * img.height), offset = 0) {
  const plane = img.width * img.height, f = Math.fround;
  const mean = pre.mean.map(f), std = pre.std.map(f);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) out[offset + c * plane + i] = f(f(f(img.data[i * 3 + c] / 255) - mean[c]) / std[c]);
  }
  return out;
}

// RGBA (canvas ImageData, pngjs) to RGB: alpha dropped, as Pillow's convert("RGB") does.
export function rgbaToRgb(width, height, rgba) {
  const data = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < data.length; i += 3, j += 4) {
    data[i] = rgba[j];
    data[i + 1] = rgba[j + 1];
    data[i + 2] = rgba[j + 2];
  }
  return { width, height, data };
}
